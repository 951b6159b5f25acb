"""Objects from the Hydra config: every config group's option is built here by `_target_`.

Runtime arguments (the catalog a retriever indexes, the texts a tiny tokenizer is fitted on,
the parameters an optimizer updates) are passed at the `instantiate` call, as in
lightning-hydra-template; nothing here looks at which option a group chose.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ospo.baseline import Baseline
from ospo.data import Dataset
from ospo.interfaces import Attribution, Reward, Segmenter
from ospo.policy import Policy, load_hf
from ospo.step import RLStep, Sampling

log = logging.getLogger("ospo")


def build_data(cfg: DictConfig) -> Dataset:
    """The `data` option, with its sizes logged."""
    t0 = time.perf_counter()
    data = instantiate(cfg.data)
    sizes = {k: len(v) for k, v in data.splits.items()}
    log.info(
        "data %s: %d products, splits %s (%.1f s)",
        data.name,
        len(data.catalog),
        sizes,
        time.perf_counter() - t0,
    )
    return data


def build_reward(
    retriever_cfg: DictConfig, reward_cfg: DictConfig, catalog: dict[str, str]
) -> Reward:
    """A retriever indexed on the catalog, wrapped by the reward metric."""
    retriever = instantiate(retriever_cfg)
    retriever.index(catalog)
    return instantiate(reward_cfg, retriever=retriever)


def tokenizer_texts(data: Dataset) -> list[str]:
    """The task's texts: catalog, then training demonstrations and requests (the corpus a
    tokenizer built in-process is fitted on; pretrained loaders ignore it)."""
    texts = list(data.catalog.values())
    texts += [s.demo for s in data.splits["train"] if s.demo]
    texts += [s.request for s in data.splits["train"]]
    return texts


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype autocast runs linear layers in under a trainer precision: bf16 for
    `bf16-mixed`, else None (full precision, or weights already in their training dtype)."""
    return torch.bfloat16 if str(precision) == "bf16-mixed" else None


def _for_precision(policy: Policy, precision: str | None) -> Policy:
    """Frozen linear weights stored in the autocast dtype (`Policy.store_frozen`): the same
    outputs, without casting them again at every forward."""
    dtype = autocast_dtype(precision)
    if dtype is not None:
        policy.store_frozen(dtype)
    return policy


def build_policy(model_cfg: DictConfig, data: Dataset, precision: str | None = None) -> Policy:
    """The policy before any training: the `model` option, ready for the trainer's
    `precision`."""
    return _for_precision(instantiate(model_cfg, texts=tokenizer_texts(data)), precision)


def load_warm_policy(
    model_cfg: DictConfig, path: str | Path, precision: str | None = None
) -> Policy:
    """A warm-up folder (merged weights) with fresh LoRA adapters if `model.lora` is set,
    ready for the trainer's `precision`."""
    policy = load_hf(
        str(path),
        dtype=model_cfg.get("dtype", "float32"),
        lora=OmegaConf.to_container(model_cfg.lora) if model_cfg.get("lora") else None,
        gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing", False)),
        attn_implementation=model_cfg.get("attn_implementation"),
    )
    return _for_precision(policy, precision)


def build_baseline(cfg: DictConfig) -> Baseline:
    """The method: advantage estimator, loss, mu and keep_query (`baseline` option)."""
    return instantiate(cfg.baseline)


def build_credit(cfg: DictConfig, baseline: Baseline) -> tuple[Segmenter, Attribution]:
    """Segmenter and attribution. They colour the validation credit table of every run; when
    the method trains on credit, an exact attribution that cannot afford the segmenter's worst
    case (and may not fall back) fails here, before any model loads."""
    segmenter = instantiate(cfg.segmenter)
    attribution = instantiate(cfg.attribution)
    if baseline.needs_credit and segmenter.max_segments is not None:
        attribution.validate_budget(segmenter.max_segments)
    return segmenter, attribution


def build_step(cfg: DictConfig, policy: Policy, reward: Reward) -> RLStep:
    """The RL step that trains, from the config: the method (`baseline`), its sampling
    (`rl.max_new_tokens`, `rl.temperature`, `rl.top_p`, G = `rl.num_generations`), segmenter
    and attribution, a frozen reference copy of `policy` when the loss has a KL term, the
    format check and its gate (`rl.invalid_reward`) and the rollout engine (`rollout`).

    `ospo.rl.run_train` and every benchmark build their step here, so a benchmark times the
    step that trains."""
    baseline = build_baseline(cfg)
    segmenter, attribution = build_credit(cfg, baseline)
    ref = None
    if baseline.loss.needs_reference:  # a frozen copy of the starting policy
        ref = copy.deepcopy(policy).requires_grad_(False)
    rl = cfg.rl
    return RLStep(
        policy,
        reward,
        baseline,
        Sampling(rl.max_new_tokens, rl.temperature, rl.top_p),
        rl.num_generations,
        segmenter=segmenter,
        attribution=attribution,
        ref_policy=ref,
        format_check=instantiate(cfg.format),
        invalid_reward=rl.invalid_reward,
        engine=instantiate(cfg.rollout),
    )


def build_trainer(cfg: DictConfig, run_dir: Path, single: bool = False, **kw) -> pl.Trainer:
    """The `trainer` option with run-specific arguments; `single` forces one process (the
    warm-up and evaluation run outside DDP)."""
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if single:
        tcfg.update(devices=1, strategy="auto")
    tcfg.update(kw)
    tcfg.setdefault("default_root_dir", str(run_dir))
    return instantiate(tcfg)


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
