"""Evaluation: greedy expansions of a split, their scores under several retrievers, and
`python eval.py` (a checkpoint's policy on the test split with the held-out retrievers).

The held-out retrievers are `eval.retrievers`, a mapping name -> retriever config that Hydra
composes from `conf/retriever` (`retriever@eval.retrievers.<name>: <option>` in a defaults
list, `+retriever@eval.retrievers.dense=dense` on the command line).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ospo.build import build_data, build_policy, build_reward, load_warm_policy
from ospo.data import Dataset, Sample
from ospo.format import FormatCheck, format_ok_rate
from ospo.interfaces import Reward
from ospo.io import write_json, write_jsonl, write_text
from ospo.policy import Policy

log = logging.getLogger("ospo")


def autocast_for(cfg: DictConfig, policy: Policy):
    """The trainer's mixed precision, for generation outside the Lightning loop."""
    bf16 = str(cfg.trainer.get("precision", "32")).startswith("bf16")
    return torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16)


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
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
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


def score_all(
    texts: Sequence[str],
    samples: Sequence[Sample],
    reward: Reward,
    format_check: FormatCheck,
    ended: Sequence[bool],
) -> dict[str, float]:
    """Mean ranking metrics and format_ok rate of one completion per request."""
    metrics = reward.metrics(texts, samples)
    out = {k: float(np.mean(v)) for k, v in metrics.items()}
    out["format_ok"] = format_ok_rate(texts, ended, format_check)
    return out


def validation_requests(cfg: DictConfig, data: Dataset) -> list[Sample]:
    """The first ``rl.val_size`` validation requests (all when 0): the warm-up check and the
    RL validation score the same ones."""
    val = data.splits["val"]
    return val[: cfg.rl.val_size] if cfg.rl.val_size else val


def expand(
    cfg: DictConfig, policy: Policy, samples: Sequence[Sample], desc: str, **sampling: Any
) -> tuple[list[str], list[bool]]:
    """One expansion of each request, in batches of ``eval.batch_size`` under the trainer's
    autocast; ``sampling`` (do_sample, temperature) goes to :func:`generate_all` (greedy when
    empty)."""
    with autocast_for(cfg, policy):
        return generate_all(
            policy, samples, cfg.eval.batch_size, cfg.rl.max_new_tokens, desc=desc, **sampling
        )


def expand_split(
    cfg: DictConfig, policy: Policy, data: Dataset, desc: str, **sampling: Any
) -> tuple[list[Sample], list[str], list[bool]]:
    """The first ``eval.size`` requests of ``eval.split`` and one :func:`expand` of each."""
    samples = data.splits[cfg.eval.split]
    samples = samples[: cfg.eval.size] if cfg.eval.size else samples
    return samples, *expand(cfg, policy, samples, desc, **sampling)


def score_with_retrievers(
    retrievers: DictConfig,
    reward_cfg: DictConfig,
    data: Dataset,
    texts: Sequence[str],
    samples: Sequence[Sample],
    ended: Sequence[bool],
    format_check: FormatCheck,
) -> dict[str, dict[str, float]]:
    """:func:`score_all` under each retriever config of ``retrievers`` (name -> config)."""
    return {
        name: score_all(
            texts, samples, build_reward(rcfg, reward_cfg, data.catalog), format_check, ended
        )
        for name, rcfg in retrievers.items()
    }


def load_checkpoint_policy(cfg: DictConfig, ckpt_path: str | Path, data: Dataset) -> Policy:
    """Rebuild a trained policy: its frozen base from the warm-up folder + the saved weights."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint file there")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    init = ckpt.get("ospo", {}).get("init", {})
    model_cfg = OmegaConf.create(init.get("model") or OmegaConf.to_container(cfg.model))
    if init.get("dir"):
        policy = load_warm_policy(model_cfg, Path(init["dir"]))
    else:
        policy = build_policy(model_cfg, data)
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
        policy = build_policy(cfg.model, data)
    policy.eval()
    samples, texts, ended = expand_split(
        cfg,
        policy,
        data,
        desc=f"{cfg.eval.split} expansions",
        do_sample=cfg.eval.do_sample,
        temperature=cfg.eval.temperature,
    )
    format_check = instantiate(cfg.format)
    results: dict[str, Any] = {
        "ckpt_path": cfg.ckpt_path,
        "split": cfg.eval.split,
        "n": len(samples),
        "retrievers": score_with_retrievers(
            cfg.eval.retrievers, cfg.reward, data, texts, samples, ended, format_check
        ),
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
