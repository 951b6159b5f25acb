"""How good is SmolLM2 at the embedded task before any training?

    python -m ospo.zeroshot [--n 50] [--seed 0] [--temperature 1.0]

On the first `n` test requests of `ShopData()` it compares, by BM25 NDCG@10 and format-ok
rate: the raw request, the demonstrations, the oracle (request + intent words) and SmolLM2's
zero-shot expansions (one sampled, one greedy per request). The last line is machine-readable:

    zeroshot_ndcg@10=<x> zeroshot_format_ok=<y> raw_ndcg@10=<..> demo_ndcg@10=<..> oracle_ndcg@10=<..>
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ospo.evaluate import generate_all
from ospo.format import FormatCheck
from ospo.reward import query_text


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Zero-shot SmolLM2 on the embedded task.")
    parser.add_argument("--n", type=int, default=50, help="first n test requests")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--cache-dir", default=None, help="SmolLM2 cache (default $OSPO_CACHE)")
    parser.add_argument("--examples", type=int, default=3, help="print this many examples")
    args = parser.parse_args(argv)

    from ospo.data.shop import ShopData
    from ospo.policy import load_smollm2
    from ospo.retriever import BM25
    from ospo.reward import NDCG

    t0 = time.perf_counter()
    data = ShopData()
    samples = data.split("test")[: args.n]
    retriever = BM25()
    retriever.index(data.catalog)
    reward = NDCG(retriever, k=10)
    policy = load_smollm2(cache_dir=args.cache_dir)
    policy.eval()
    print(
        f"data + BM25 + SmolLM2 ready in {time.perf_counter() - t0:.1f}s; {len(samples)} requests"
    )

    torch.manual_seed(args.seed)
    sampled, sampled_ended = generate_all(
        policy,
        samples,
        args.batch_size,
        args.max_new_tokens,
        do_sample=True,
        temperature=args.temperature,
        desc=f"sampled T={args.temperature}",
    )
    greedy, greedy_ended = generate_all(
        policy, samples, args.batch_size, args.max_new_tokens, do_sample=False, desc="greedy"
    )

    check = FormatCheck()
    done = [True] * len(samples)
    # name -> (texts the format check reads, their EOS flags, whole query texts)
    rows = {
        "raw request": ([s.request for s in samples], done, [s.request for s in samples]),
        "demonstrations": (
            [s.demo or s.request for s in samples],
            done,
            [query_text(s, s.demo) if s.demo else s.request for s in samples],
        ),
        "oracle (request + intent)": (
            [" ".join(s.intent_words or []) for s in samples],
            done,
            [f"{s.request} {' '.join(s.intent_words or [])}".strip() for s in samples],
        ),
        "SmolLM2 zero-shot sampled": (
            sampled,
            sampled_ended,
            [query_text(s, t) for s, t in zip(samples, sampled, strict=True)],
        ),
        "SmolLM2 zero-shot greedy": (
            greedy,
            greedy_ended,
            [query_text(s, t) for s, t in zip(samples, greedy, strict=True)],
        ),
    }
    results = {}
    print(f"\n{'':28s} {'NDCG@10':>8s} {'format_ok':>10s}")
    for name, (texts, ended, queries) in rows.items():
        ndcg = float(np.mean(reward.score_queries(queries, samples))) if samples else 0.0
        ok = check.rate(texts, ended)
        results[name] = (ndcg, ok)
        print(f"{name:28s} {ndcg:8.3f} {ok:10.1%}")

    for s, a, g in list(zip(samples, sampled, greedy, strict=True))[: args.examples]:
        print(f"\nrequest: {s.request}\n  sampled: {a!r}\n  greedy:  {g!r}")
        print(f"  sampled format: {check.reasons(a) or 'ok'}; greedy: {check.reasons(g) or 'ok'}")

    summary = {
        "zeroshot_ndcg@10": results["SmolLM2 zero-shot sampled"][0],
        "zeroshot_format_ok": results["SmolLM2 zero-shot sampled"][1],
        "greedy_ndcg@10": results["SmolLM2 zero-shot greedy"][0],
        "greedy_format_ok": results["SmolLM2 zero-shot greedy"][1],
        "raw_ndcg@10": results["raw request"][0],
        "demo_ndcg@10": results["demonstrations"][0],
        "oracle_ndcg@10": results["oracle (request + intent)"][0],
    }
    last = (
        "zeroshot_ndcg@10",
        "zeroshot_format_ok",
        "raw_ndcg@10",
        "demo_ndcg@10",
        "oracle_ndcg@10",
    )
    print()
    print(" ".join(f"{k}={summary[k]:.3f}" for k in last))
    return summary


if __name__ == "__main__":
    main()
