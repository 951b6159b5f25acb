"""Attribution faithfulness on the embedded task (``python -m ospo.faithfulness``).

Only the embedded task (:class:`ospo.data.shop.ShopData`) knows each request's latent intent,
so only there can we check that credit lands where it should: on the phrases that name a
latent attribute. Usage::

    python -m ospo.faithfulness [--n 100] [--seed 0] [--split test] [--num-products 6000]

Steps (numbered as in :func:`evaluate`):

1. Completions: for each of the first ``n`` requests of the split, its demonstration
   (``sample.demo``: a partial, noisy list of attribute words, so right and wrong words are
   mixed; after the request in the rewrite format), or, when a sample has none, one built the
   same way (:func:`make_completion`).
2. Players: :class:`ospo.segmenter.PhraseSegmenter` (default config: one word per player, at
   most 10, unions = clauses). A segment "contains an intent word" when one of its tokens
   (:func:`ospo.retriever.tokenize`) is a token of the request's ``intent_words``.
3. Game: the training game, v(S) = BM25 NDCG@10 of the query prefix (the request, in the
   append format) followed by the kept segments (:class:`ospo.reward.NDCG` over
   :class:`ospo.retriever.BM25` indexed on the catalog, ``coalition_value_fn``).
4. Credit: exact Owen, exact Shapley, Monte-Carlo Shapley (antithetic pairs) at 8 / 32 / 128 /
   512 permutations, and a random-credit baseline (iid standard normal, seeded per request).
5. Metrics per request (pure functions below):
   * :func:`intent_share`: share of the POSITIVE credit that falls on intent segments,
     sum_{j: intent} max(phi_j, 0) / sum_j max(phi_j, 0) (undefined without positive credit);
   * :func:`chance_share`: share of segments that contain an intent word. By exchangeability
     this is exactly the expected :func:`intent_share` of iid random credit;
   * :func:`precision_at_1`: whether the top-credit segment contains an intent word (ties at
     the top count as a uniform random pick among them);
   * :func:`relative_error`: mean |phi_MC - phi_exact| / mean |phi_exact| (Monte-Carlo error
     normalised by the typical size of an exact value);
   * :func:`efficiency_gap`: |sum phi - (v(N) - v(empty))| (0 up to rounding for exact values
     and for every Monte-Carlo estimate).
   Faithfulness is averaged over the requests where every method gives some positive credit
   (the same requests for every row), with a 95% t-interval over requests.

Output: two markdown tables and, as the last line,
``faithfulness_owen=<x> faithfulness_shapley=<y> faithfulness_random=<z> mc_rel_error_32=<w>``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ospo.attribution import CountingValueFn, mc_shapley_values, owen_values, shapley_values
from ospo.metrics import format_ci, mean_ci
from ospo.retriever import tokenize

__all__ = [
    "FAITH_PERMUTATIONS",
    "MC_PERMUTATIONS",
    "attribute",
    "chance_share",
    "efficiency_gap",
    "evaluate",
    "intent_share",
    "main",
    "make_completion",
    "precision_at_1",
    "relative_error",
    "render",
    "segment_hits",
]

MC_PERMUTATIONS: tuple[int, ...] = (8, 32, 128, 512)
"""Permutation counts of the Monte-Carlo error table."""

FAITH_PERMUTATIONS: tuple[int, ...] = (8, 32, 128)
"""Permutation counts of the Monte-Carlo rows of the faithfulness table."""


# ----------------------------------------------------------------------------- metrics


def segment_hits(segment_texts: Sequence[str], intent_words: Sequence[str]) -> np.ndarray:
    """(n,) bool: segment j has a token (:func:`tokenize`) among the intent words' tokens."""
    intent = {t for word in intent_words for t in tokenize(word)}
    return np.array([any(t in intent for t in tokenize(s)) for s in segment_texts], dtype=bool)


def _as_phi(phi: Sequence[float], n: int) -> np.ndarray:
    phi = np.asarray(phi, dtype=np.float64).reshape(-1)
    if phi.shape[0] != n:
        raise ValueError(f"phi has {phi.shape[0]} values for {n} segments; expected one each")
    return phi


def intent_share(
    segment_texts: Sequence[str], phi: Sequence[float], intent_words: Sequence[str]
) -> float:
    """Share of the positive credit on intent segments (NaN when no credit is positive).

    share = sum_{j: hit_j} max(phi_j, 0) / sum_j max(phi_j, 0).
    """
    hits = segment_hits(segment_texts, intent_words)
    pos = np.clip(_as_phi(phi, hits.size), 0.0, None)  # (n,)
    total = pos.sum()
    return float(pos[hits].sum() / total) if total > 0 else math.nan


def chance_share(segment_texts: Sequence[str], intent_words: Sequence[str]) -> float:
    """Share of segments that contain an intent word (NaN for no segment).

    For exchangeable random credit (e.g. iid normal) this is exactly the expected
    :func:`intent_share` given some positive credit.
    """
    hits = segment_hits(segment_texts, intent_words)
    return float(hits.mean()) if hits.size else math.nan


def precision_at_1(
    segment_texts: Sequence[str],
    phi: Sequence[float],
    intent_words: Sequence[str],
    atol: float = 1e-12,
) -> float:
    """1 if the top-credit segment contains an intent word, else 0 (NaN for no segment).

    Segments within ``atol`` of the top credit tie; a tie counts as a uniform pick among them
    (the share of tied segments that contain an intent word).
    """
    hits = segment_hits(segment_texts, intent_words)
    if hits.size == 0:
        return math.nan
    phi = _as_phi(phi, hits.size)
    top = phi >= phi.max() - atol  # (n,)
    return float(hits[top].mean())


def relative_error(phi_estimate: Sequence[float], phi_exact: Sequence[float]) -> float:
    """mean_j |phi_est_j - phi_exact_j| / mean_j |phi_exact_j| (NaN when phi_exact is all 0)."""
    est = np.asarray(phi_estimate, dtype=np.float64)
    exact = np.asarray(phi_exact, dtype=np.float64)
    if est.shape != exact.shape:
        raise ValueError(f"shapes differ: estimate {est.shape}, exact {exact.shape}")
    scale = np.abs(exact).mean() if exact.size else 0.0
    return float(np.abs(est - exact).mean() / scale) if scale > 0 else math.nan


def efficiency_gap(phi: Sequence[float], v_full: float, v_empty: float) -> float:
    """|sum_j phi_j - (v(N) - v(empty))|: 0 for an efficient attribution."""
    return abs(float(np.sum(phi)) - (float(v_full) - float(v_empty)))


# ----------------------------------------------------------------------------- completions


def make_completion(
    sample: Any, rng: np.random.Generator, vocabulary: Sequence[str], keep: float = 0.85
) -> str:
    """The sample's demonstration, or one built like it when it has none.

    Built: each intent word kept with probability ``keep`` plus 0-2 wrong words (from
    ``vocabulary`` minus the intent words; probabilities 0.5 / 0.35 / 0.15, as the embedded
    task's demos), shuffled; after the request unless the sample has a query prefix (append).
    """
    if getattr(sample, "demo", None):
        return sample.demo
    intent = list(sample.intent_words or [])
    words = [w for w in intent if rng.random() < keep]
    wrong = sorted(set(vocabulary) - set(intent))
    count = min(int(rng.choice(3, p=[0.5, 0.35, 0.15])), len(wrong))
    words += [wrong[int(i)] for i in rng.choice(len(wrong), size=count, replace=False)]
    words = [words[int(i)] for i in rng.permutation(len(words))]
    return " ".join(words if getattr(sample, "prefix", "") else [sample.request, *words])


def attribute(
    value_fn: Callable[[np.ndarray], np.ndarray],
    unions: Sequence[Sequence[int]],
    rng_seed: Sequence[int],
    permutations: Sequence[int] = MC_PERMUTATIONS,
) -> dict[str, Any]:
    """Every credit of one completion (step 4) and its game's v(N), v(empty).

    Returns ``phi`` (method -> (n,)), ``coalitions`` (method -> distinct coalitions scored),
    ``v_full``, ``v_empty``. Methods: "owen", "shapley", "mc<P>" per P, "random".
    ``rng_seed`` seeds the Monte-Carlo permutations and the random credit.
    """
    n = sum(len(u) for u in unions)
    ends = value_fn(np.array([np.zeros(n, dtype=bool), np.ones(n, dtype=bool)]))  # (2,)
    phi: dict[str, np.ndarray] = {}
    coalitions: dict[str, int] = {}

    def run(name: str, method: Callable[[CountingValueFn], np.ndarray]) -> None:
        counter = CountingValueFn(value_fn)
        phi[name] = method(counter)
        coalitions[name] = counter.rows

    run("owen", lambda fn: owen_values(fn, unions))
    run("shapley", lambda fn: shapley_values(fn, n))
    for p in permutations:
        rng = np.random.default_rng([*rng_seed, 2, p])
        run(f"mc{p}", lambda fn, p=p, rng=rng: mc_shapley_values(fn, n, p, rng))
    phi["random"] = np.random.default_rng([*rng_seed, 1]).standard_normal(n)  # (n,)
    coalitions["random"] = 0
    return {"phi": phi, "coalitions": coalitions, "v_empty": ends[0], "v_full": ends[1]}


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    n: int = 100,
    seed: int = 0,
    split: str = "test",
    num_products: int = 6000,
    data: Any = None,
    data_seed: int = 0,
) -> dict[str, Any]:
    """Steps 1-5 on the first ``n`` requests of ``split`` (see the module docstring).

    ``data``: a built data set with latent intents (default: ``ShopData(seed=data_seed,
    num_products=num_products)``). Returns ``rows`` (one dict per request) and the summary
    statistics that :func:`render` prints.
    """
    from ospo.retriever import BM25
    from ospo.reward import NDCG
    from ospo.segmenter import PhraseSegmenter

    start = time.perf_counter()
    if data is None:
        from ospo.data.shop import ShopData

        data = ShopData(seed=data_seed, num_products=num_products)
    samples = data.split(split)[:n]
    if not samples:
        raise ValueError(f"split {split!r} has no request (asked for n={n})")
    if any(not s.intent_words for s in samples):
        raise ValueError(
            f"split {split!r} has samples without intent_words: faithfulness needs a data set "
            "with latent intents (the embedded task, ospo.data.shop.ShopData)"
        )
    retriever = BM25()
    retriever.index(data.catalog)
    reward = NDCG(retriever, k=10)
    segmenter = PhraseSegmenter()
    vocabulary = sorted({w for s in data.split(split) for w in s.intent_words or []})
    methods = ["owen", "shapley", *(f"mc{p}" for p in MC_PERMUTATIONS), "random"]
    rows = []
    for i, sample in enumerate(samples):
        # 1-2. completion and players
        text = make_completion(sample, np.random.default_rng([seed, 0, i]), vocabulary)
        seg = segmenter(text, reads=retriever.reads)
        if seg.n == 0:
            continue
        texts = seg.texts(text)
        # 3-4. game and credits
        value_fn = reward.coalition_value_fn(text, seg, sample, base_text=sample.prefix)
        out = attribute(value_fn, seg.unions, (seed, i))
        # 5. metrics
        phi = out["phi"]
        rows.append(
            {
                "qid": sample.qid,
                "text": text,
                "segments": texts,
                "n": seg.n,
                "v_full": float(out["v_full"]),
                "v_empty": float(out["v_empty"]),
                "chance": chance_share(texts, sample.intent_words),
                "share": {m: intent_share(texts, phi[m], sample.intent_words) for m in methods},
                "p_at_1": {m: precision_at_1(texts, phi[m], sample.intent_words) for m in methods},
                "error": {m: relative_error(phi[m], phi["shapley"]) for m in methods},
                "efficiency": {
                    m: efficiency_gap(phi[m], out["v_full"], out["v_empty"])
                    for m in methods
                    if m != "random"
                },
                "coalitions": out["coalitions"],
            }
        )
    return summarise(rows, n_asked=n, split=split, seconds=time.perf_counter() - start)


def summarise(
    rows: list[dict[str, Any]], n_asked: int, split: str, seconds: float = math.nan
) -> dict[str, Any]:
    """Means and 95% t-intervals over requests of the per-request metrics."""
    if not rows:
        raise ValueError("no request with at least one segment: nothing to summarise")
    methods = list(rows[0]["share"])
    used = [r for r in rows if all(math.isfinite(r["share"][m]) for m in methods)]
    faith = {m: mean_ci([r["share"][m] for r in used]) for m in methods}
    p_at_1 = {m: mean_ci([r["p_at_1"][m] for r in used]) for m in methods}
    mc = {}
    for m in [m for m in methods if m != "random"]:
        errors = [r["error"][m] for r in rows]
        mc[m] = {
            "error": mean_ci(errors),
            "defined": int(np.isfinite(errors).sum()),
            "coalitions": float(np.mean([r["coalitions"][m] for r in rows])),
            "efficiency": float(max(r["efficiency"][m] for r in rows)),
        }
    return {
        "split": split,
        "n_asked": n_asked,
        "rows": rows,
        "used": len(used),
        "segments": float(np.mean([r["n"] for r in rows])),
        "v_full": float(np.mean([r["v_full"] for r in rows])),
        "v_empty": float(np.mean([r["v_empty"] for r in rows])),
        "chance": mean_ci([r["chance"] for r in used]),
        "faithfulness": faith,
        "p_at_1": p_at_1,
        "mc": mc,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- rendering


def _name(method: str) -> str:
    if method.startswith("mc"):
        return f"Monte-Carlo Shapley, {method[2:]} permutations"
    return {"owen": "exact Owen", "shapley": "exact Shapley", "random": "random (iid normal)"}[
        method
    ]


def render(result: dict[str, Any]) -> str:
    """The two markdown tables and the final ``faithfulness_owen=...`` line."""
    rows, used = result["rows"], result["used"]
    lines = [
        f"## Attribution faithfulness ({result['split']} split, BM25 NDCG@10, phrase players)",
        "",
        f"{len(rows)} requests with segments (of {result['n_asked']} asked), "
        f"{result['segments']:.2f} segments each on average, mean v(N) = "
        f"{result['v_full']:.3f}, mean v(empty) = {result['v_empty']:.3f}. Faithfulness is "
        f"averaged over the {used} requests where every method gives some positive credit; "
        "mean ± 95% t-interval half-width over requests.",
        "",
        "| credit | positive credit on intent segments | precision@1 (top segment has intent) |",
        "|---|---:|---:|",
    ]
    shown = ["owen", "shapley", *(f"mc{p}" for p in FAITH_PERMUTATIONS), "random"]
    for m in shown:
        lines.append(
            f"| {_name(m)} | {format_ci(result['faithfulness'][m], 3)} | {format_ci(result['p_at_1'][m], 3)} |"
        )
    lines.append(
        f"| chance (share of segments with an intent word) | {format_ci(result['chance'], 3)} | "
        f"{format_ci(result['chance'], 3)} |"
    )
    lines += [
        "",
        "## Monte-Carlo Shapley against exact Shapley",
        "",
        "Relative error = mean |phi_MC - phi_exact| / mean |phi_exact| per request, mean ± 95% "
        "t-interval over the requests with a non-zero exact phi; efficiency gap = max over "
        "requests of |sum phi - (v(N) - v(empty))|.",
        "",
        "| attribution | coalitions scored (mean) | relative error vs exact Shapley | requests "
        "| max efficiency gap |",
        "|---|---:|---:|---:|---:|",
    ]
    order = ["shapley", "owen", *(f"mc{p}" for p in MC_PERMUTATIONS)]
    for m in order:
        s = result["mc"][m]
        lines.append(
            f"| {_name(m)} | {s['coalitions']:.1f} | {format_ci(s['error'], 4)} | {s['defined']} | "
            f"{s['efficiency']:.1e} |"
        )
    lines += [
        "",
        "(exact Owen's row is its distance to exact Shapley, not a Monte-Carlo error: the two "
        "values differ by design.)",
        "",
        f"ran in {result['seconds']:.1f} s",
        (
            f"faithfulness_owen={result['faithfulness']['owen'][0]:.4f} "
            f"faithfulness_shapley={result['faithfulness']['shapley'][0]:.4f} "
            f"faithfulness_random={result['faithfulness']['random'][0]:.4f} "
            f"mc_rel_error_32={result['mc']['mc32']['error'][0]:.4f}"
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m ospo.faithfulness",
        description="Does attribution credit the phrases that name the latent intent?",
    )
    parser.add_argument("--n", type=int, default=100, help="requests of the split to use")
    parser.add_argument("--seed", type=int, default=0, help="Monte-Carlo and random credit")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--num-products", type=int, default=6000, help="embedded catalog size")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the embedded task")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    result = evaluate(args.n, args.seed, args.split, args.num_products, data_seed=args.data_seed)
    print(render(result), end="")
    return result


if __name__ == "__main__":
    main()
