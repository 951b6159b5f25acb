"""Objects from the Hydra config: every config group's option is built here by `_target_`.

Runtime arguments (the catalog a retriever indexes, the texts a tiny tokenizer is fitted on,
the parameters an optimizer updates) are passed at the `instantiate` call, as in
lightning-hydra-template; nothing here looks at which option a group chose.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ospo.baseline import Baseline
from ospo.data import Dataset
from ospo.interfaces import Attribution, Reward, Segmenter
from ospo.policy import Policy, load_hf

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


def build_policy(model_cfg: DictConfig, data: Dataset) -> Policy:
    """The policy before any training: the `model` option."""
    return instantiate(model_cfg, texts=tokenizer_texts(data))


def load_warm_policy(model_cfg: DictConfig, path: str | Path) -> Policy:
    """A warm-up folder (merged weights) with fresh LoRA adapters if `model.lora` is set."""
    return load_hf(
        str(path),
        dtype=model_cfg.get("dtype", "float32"),
        lora=OmegaConf.to_container(model_cfg.lora) if model_cfg.get("lora") else None,
        gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing", False)),
    )


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
