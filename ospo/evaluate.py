"""Evaluation: greedy expansions of a split, their scores under several retrievers, and
`python eval.py` (a checkpoint's policy on the test split with the held-out retrievers).

The held-out retrievers are `eval.retrievers`, a mapping name -> retriever config that Hydra
composes from `conf/retriever` (`retriever@eval.retrievers.<name>: <option>` in a defaults
list, `+retriever@eval.retrievers.dense=dense` on the command line).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ospo.build import autocast_dtype, build_data, build_policy, build_reward, load_warm_policy
from ospo.data import Dataset, Sample
from ospo.format import FormatCheck, format_ok
from ospo.interfaces import Reward
from ospo.io import write_json, write_jsonl, write_text
from ospo.policy import Policy

log = logging.getLogger("ospo")


def autocast_for(cfg: DictConfig, policy: Policy):
    """The trainer's mixed precision, for generation outside the Lightning loop."""
    return autocast(cfg.trainer.get("precision", "32"), policy.device.type)


def autocast(precision: str, device_type: str = "cpu"):
    """bf16 autocast when the trainer's precision is bf16-mixed, else a no-op context."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@dataclass
class Evaluation:
    """One greedy completion per request and its scores."""

    texts: list[str]
    ended: list[bool]  # the completion stopped at EOS
    rows: dict[str, np.ndarray]  # ndcg@10, recall@10, mrr, format_ok of each request, (n,) each

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) if len(v) else 0.0 for k, v in self.rows.items()}


class GreedyEvaluator:
    """The one evaluation path: greedy completions of requests, batched, under the trainer's
    autocast, scored by a reward's retriever (NDCG@10, Recall@10, MRR) and the format check.

    It serves RL validation (`RLModule.validation_step`, one loader batch at a time), the
    warm-up check (`ospo.sft.check_warmup`), the final test scores (`ospo.rl.final_scores`,
    with every held-out retriever) and `python eval.py`. Sampling arguments (`do_sample`,
    `temperature`) are for eval.py's sampled expansions; greedy when absent.
    """

    def __init__(
        self,
        reward: Reward,
        format_check: FormatCheck,
        max_new_tokens: int,
        batch_size: int = 32,
        precision: str = "32-true",
    ):
        self.reward, self.format_check = reward, format_check
        self.max_new_tokens, self.batch_size, self.precision = max_new_tokens, batch_size, precision

    def expand(
        self, policy: Policy, samples: Sequence[Sample], desc: str = "generate", **sampling: Any
    ) -> tuple[list[str], list[bool]]:
        """One completion per request, in batches of `batch_size`: texts and EOS flags."""
        with autocast(self.precision, policy.device.type):
            return generate_all(
                policy, samples, self.batch_size, self.max_new_tokens, desc=desc, **sampling
            )

    def score(
        self,
        texts: Sequence[str],
        ended: Sequence[bool],
        samples: Sequence[Sample],
        reward: Reward | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-request ranking metrics under `reward` (default: the training reward) and
        format_ok (1.0 / 0.0), each (n,)."""
        rows = (reward or self.reward).metrics(texts, samples)
        rows["format_ok"] = np.asarray(format_ok(texts, ended, self.format_check), dtype=float)
        return rows

    def __call__(
        self, policy: Policy, samples: Sequence[Sample], desc: str = "generate", **sampling: Any
    ) -> Evaluation:
        texts, ended = self.expand(policy, samples, desc, **sampling)
        return Evaluation(texts, ended, self.score(texts, ended, samples))

    def with_retrievers(
        self,
        texts: Sequence[str],
        ended: Sequence[bool],
        samples: Sequence[Sample],
        rewards: dict[str, Reward],
    ) -> dict[str, dict[str, float]]:
        """Mean scores of the same completions under each named reward (held-out retrievers)."""
        return {
            name: Evaluation(
                list(texts), list(ended), self.score(texts, ended, samples, reward)
            ).means()
            for name, reward in rewards.items()
        }


def build_evaluator(cfg: DictConfig, reward: Reward, format_check: FormatCheck) -> GreedyEvaluator:
    """The evaluator of a run: `rl.max_new_tokens`, `eval.batch_size`, the trainer's precision."""
    return GreedyEvaluator(
        reward,
        format_check,
        cfg.rl.max_new_tokens,
        cfg.eval.batch_size,
        str(cfg.trainer.get("precision", "32")),
    )


def held_out_rewards(cfg: DictConfig, data: Dataset) -> dict[str, Reward]:
    """A reward (the config's metric) for each held-out retriever of `eval.retrievers`."""
    return {
        name: build_reward(rcfg, cfg.reward, data.catalog)
        for name, rcfg in cfg.eval.retrievers.items()
    }


@torch.no_grad()
def generate_all(
    policy: Policy,
    samples: Sequence[Sample],
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    desc: str = "generate",
) -> tuple[list[str], list[bool]]:
    """One completion per request, batched. Returns texts and whether each ended on EOS."""
    texts, ended = [], []
    batches = range(0, len(samples), batch_size)
    for i in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2):  # one: no bar
        batch = samples[i : i + batch_size]
        ro = policy.generate(
            [s.messages for s in batch],
            num_generations=1,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
        )
        texts += ro.texts
        ended += [bool(e) for e in ro.ended]
    return texts, ended


def validation_requests(cfg: DictConfig, data: Dataset) -> list[Sample]:
    """The first ``rl.val_size`` validation requests (all when 0): the warm-up check and the
    RL validation score the same ones."""
    val = data.splits["val"]
    return val[: cfg.rl.val_size] if cfg.rl.val_size else val


def test_requests(cfg: DictConfig, data: Dataset) -> list[Sample]:
    """The first ``eval.size`` requests of ``eval.split`` (all when null)."""
    samples = data.splits[cfg.eval.split]
    return samples[: cfg.eval.size] if cfg.eval.size else samples


def load_checkpoint_policy(cfg: DictConfig, ckpt_path: str | Path, data: Dataset) -> Policy:
    """Rebuild a trained policy: its frozen base from the warm-up folder + the saved weights."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint file there")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    init = ckpt.get("ospo", {}).get("init", {})
    model_cfg = OmegaConf.create(init.get("model") or OmegaConf.to_container(cfg.model))
    precision = cfg.trainer.get("precision")
    if init.get("dir"):
        policy = load_warm_policy(model_cfg, Path(init["dir"]), precision)
    else:
        policy = build_policy(model_cfg, data, precision)
    state = {
        k.removeprefix("policy."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("policy.")
    }
    unexpected = set(state) - set(policy.state_dict())
    if unexpected:
        raise ValueError(
            f"{ckpt_path}: {len(unexpected)} weights do not fit the policy "
            f"(first: {sorted(unexpected)[0]}); was it trained with another model?"
        )
    absent = {n for n, p in policy.named_parameters() if p.requires_grad} - set(state)
    if absent:
        raise ValueError(
            f"{ckpt_path}: holds none of {len(absent)} trainable weights of the policy "
            f"(first: {sorted(absent)[0]}); the checkpoint is incomplete or of another model"
        )
    policy.load_state_dict(state, strict=False)
    return policy


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`python eval.py`: test-split scores with the training and out-of-distribution retrievers."""
    run_dir = Path(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    data = build_data(cfg)
    if cfg.ckpt_path:
        policy = load_checkpoint_policy(cfg, cfg.ckpt_path, data)
    else:
        log.info("no ckpt_path: evaluating the untrained (zero-shot) policy")
        policy = build_policy(cfg.model, data, cfg.trainer.get("precision"))
    policy.eval()
    samples = test_requests(cfg, data)
    evaluator = build_evaluator(cfg, None, instantiate(cfg.format))
    texts, ended = evaluator.expand(
        policy,
        samples,
        desc=f"{cfg.eval.split} expansions",
        do_sample=cfg.eval.do_sample,
        temperature=cfg.eval.temperature,
    )
    results: dict[str, Any] = {
        "ckpt_path": cfg.ckpt_path,
        "split": cfg.eval.split,
        "n": len(samples),
        "retrievers": evaluator.with_retrievers(texts, ended, samples, held_out_rewards(cfg, data)),
    }
    write_json(run_dir / "results.json", results)
    write_jsonl(
        run_dir / "expansions.jsonl",
        (
            {"qid": s.qid, "request": s.request, "expansion": t}
            for s, t in zip(samples, texts, strict=True)
        ),
    )
    table = results_markdown(results)
    write_text(run_dir / "results.md", table)
    print(table)
    return results


def results_markdown(results: dict[str, Any]) -> str:
    rows = results["retrievers"]
    keys = list(next(iter(rows.values())).keys()) if rows else []
    lines = [
        f"Split `{results['split']}` ({results['n']} requests), checkpoint "
        f"`{results['ckpt_path'] or 'zero-shot'}`",
        "",
        "| retriever | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
