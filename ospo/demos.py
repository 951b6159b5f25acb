"""Demonstrations by rejection sampling, for data sets that have none (ESCI, H&M).

The supervised warm-up imitates one good expansion per request. The embedded task writes its
own; real data sets have only requests and judgements, so we let the policy propose
expansions and keep the ones the reward likes:

1. sample `num_samples` expansions per request from the policy;
2. score each with the reward (`reward.score_texts(texts, samples)`), and the raw request too;
3. keep, per request, the highest-reward expansion that passes the format check and clears the
   threshold: reward - raw_reward > threshold when `relative_to_raw`, else reward >= threshold;
4. write one JSONL line {"qid", "demo", "reward"} per kept request (atomically), which
   `ospo.data.load_demos` / `attach_demos` read back (`data.demos_path=<file>`).

Command line (Hydra overrides of the training config pick the data, model and reward):

    python -m ospo.demos --out demos.jsonl data=esci data.root=/data/esci [--limit 500]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ospo.data import Sample
from ospo.format import FormatCheck, format_ok
from ospo.io import write_jsonl

log = logging.getLogger(__name__)


def best_demo(
    texts: Sequence[str],
    rewards: np.ndarray,
    ok: Sequence[bool],
    raw_reward: float,
    threshold: float = 0.0,
    relative_to_raw: bool = True,
) -> int | None:
    """Index of the highest-reward acceptable text, or None.

    Acceptable: `ok` (format) and reward - raw_reward > threshold (`relative_to_raw`) or
    reward >= threshold (absolute). Ties go to the earliest text.
    """
    rewards = np.asarray(rewards, dtype=np.float64)  # (G,)
    if not (len(texts) == len(rewards) == len(ok)):
        raise ValueError(
            f"texts ({len(texts)}), rewards ({len(rewards)}) and ok ({len(ok)}) differ in length"
        )
    if relative_to_raw:
        clears = rewards - raw_reward > threshold
    else:
        clears = rewards >= threshold
    keep = clears & np.asarray(ok, dtype=bool) & np.array([bool(t.strip()) for t in texts])
    if not keep.any():
        return None
    return int(np.argmax(np.where(keep, rewards, -np.inf)))


def rejection_sample_demos(
    policy,
    reward,
    samples: Sequence[Sample],
    num_samples: int = 8,
    threshold: float = 0.0,
    relative_to_raw: bool = True,
    format_check: Callable[[str, bool], bool] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Sample expansions, keep the best acceptable one per request, write them as JSONL.

    `policy` is an `ospo.policy.Policy`; `reward` has `score_texts(texts, samples) -> (N,)`;
    `format_check(text, ended) -> bool` defaults to `FormatCheck()`. `batch_size` counts
    requests per generate call (each gives `num_samples` completions).

    Returns counts: {"requests", "with_demo", "format_ok", "cleared", "mean_raw_reward",
    "mean_demo_reward", "path", "demos"} where "demos" maps qid -> demo text.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1")
    check = format_check if format_check is not None else FormatCheck()
    samples = list(samples)
    rows, demos = [], {}
    n_format_ok = n_cleared = 0
    raw_all, demo_rewards = [], []
    batches = range(0, len(samples), batch_size)
    for b0 in tqdm(batches, desc="demos", unit="batch", disable=not progress):
        batch = samples[b0 : b0 + batch_size]
        rollouts = policy.generate(
            [s.messages for s in batch],
            num_generations=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
        )
        repeated = [s for s in batch for _ in range(num_samples)]  # prompt-major, as rollouts
        rewards = np.asarray(reward.score_texts(rollouts.texts, repeated), dtype=np.float64)
        raw = np.asarray(reward.score_queries([s.request for s in batch], batch), dtype=np.float64)
        ended = rollouts.ended.tolist() if rollouts.ended is not None else [True] * len(rewards)
        ok = format_ok(rollouts.texts, ended, check)
        for j, sample in enumerate(batch):
            rows_j = slice(j * num_samples, (j + 1) * num_samples)
            texts_j, rewards_j, ok_j = rollouts.texts[rows_j], rewards[rows_j], ok[rows_j]
            n_format_ok += sum(ok_j)
            if relative_to_raw:
                n_cleared += int((rewards_j - raw[j] > threshold).sum())
            else:
                n_cleared += int((rewards_j >= threshold).sum())
            raw_all.append(raw[j])
            best = best_demo(texts_j, rewards_j, ok_j, raw[j], threshold, relative_to_raw)
            if best is None:
                continue
            demo = texts_j[best].strip()
            demos[sample.qid] = demo
            demo_rewards.append(rewards_j[best])
            rows.append({"qid": sample.qid, "demo": demo, "reward": float(rewards_j[best])})
    if path is not None:
        write_jsonl(path, rows)
    total = len(samples) * num_samples
    stats = {
        "requests": len(samples),
        "with_demo": len(rows),
        "format_ok": n_format_ok / total if total else 0.0,
        "cleared": n_cleared / total if total else 0.0,
        "mean_raw_reward": float(np.mean(raw_all)) if raw_all else 0.0,
        "mean_demo_reward": float(np.mean(demo_rewards)) if demo_rewards else 0.0,
        "path": str(path) if path is not None else None,
        "demos": demos,
    }
    log.info(
        "rejection sampling: %d/%d requests got a demo (format_ok %.1f%%, cleared %.1f%% of %d "
        "samples; mean reward raw %.3f, demos %.3f)%s",
        stats["with_demo"],
        stats["requests"],
        100 * stats["format_ok"],
        100 * stats["cleared"],
        total,
        stats["mean_raw_reward"],
        stats["mean_demo_reward"],
        f" -> {path}" if path is not None else "",
    )
    return stats


def main(argv: list[str] | None = None) -> dict:
    """Compose the training config with the given overrides, then rejection-sample demos for
    the chosen split with the configured (untrained) policy, retriever, reward and format."""
    parser = argparse.ArgumentParser(
        description="Rejection-sample warm-up demonstrations (JSONL of qid/demo/reward).",
        epilog="Example: python -m ospo.demos --out esci_demos.jsonl data=esci "
        "data.root=/data/esci",
    )
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=None, help="first N requests only")
    parser.add_argument("--num-samples", type=int, default=8, help="expansions per request")
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument(
        "--absolute",
        action="store_true",
        help="keep rewards >= threshold (default: reward - raw request's reward > threshold)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: rl's")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per generate call")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=esci")
    args = parser.parse_args(argv)

    import torch
    from hydra.utils import instantiate

    from ospo.build import build_data, build_policy, build_reward
    from ospo.config import compose_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose_config(args.overrides)
    torch.manual_seed(int(cfg.seed))
    t0 = time.perf_counter()
    data = build_data(cfg)
    samples = data.split(args.split)
    samples = samples[: args.limit] if args.limit else samples
    reward = build_reward(cfg.retriever, cfg.reward, data.catalog)
    policy = build_policy(cfg.model, data)
    policy.eval()
    log.info("ready in %.1fs: %d %s requests", time.perf_counter() - t0, len(samples), args.split)
    stats = rejection_sample_demos(
        policy,
        reward,
        samples,
        num_samples=args.num_samples,
        threshold=args.threshold,
        relative_to_raw=not args.absolute,
        format_check=instantiate(cfg.format),
        max_new_tokens=args.max_new_tokens or int(cfg.rl.max_new_tokens),
        temperature=args.temperature,
        batch_size=args.batch_size,
        path=args.out,
    )
    print(
        f"demos={stats['with_demo']}/{stats['requests']} format_ok={stats['format_ok']:.3f} "
        f"mean_demo_reward={stats['mean_demo_reward']:.4f} "
        f"mean_raw_reward={stats['mean_raw_reward']:.4f} -> {args.out}"
    )
    return stats


__all__ = ["best_demo", "main", "rejection_sample_demos"]


if __name__ == "__main__":
    main()
