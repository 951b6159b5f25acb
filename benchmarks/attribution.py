"""Time exact Owen attribution of one completion against BM25 NDCG@10 (docs/design.md section 3).

A completion of 8 segments in 2 unions of 4 is attributed with exact Owen values
(``ospo.attribution.owen_values``) over a seeded synthetic catalog (default 10,000 products,
titles of ~15 words from a Zipf-distributed vocabulary of a few thousand words), reward =
NDCG@10 over the full catalog.

* project path: ``NDCG(BM25()).coalition_value_fn`` (segment score rows once, then one masked
  sum + one top-k for the whole coalition batch) + ``owen_values``; the reward's memo and the
  retriever's term-vector cache are cleared before every repetition (cold), and also reported
  warm (term vectors cached, as in training where completions repeat words).
* naive path: each coalition's joined text scored separately with
  ``rank_bm25.BM25Okapi.get_scores`` (index built once, outside the timing), ranked with a
  stable argsort, NDCG@10 with ``ospo.metrics.ndcg_at_k``, the same Owen combination.

The two paths use different BM25 variants (Lucene vs Okapi/ATIRE idf), so their values differ;
their agreement is reported as the Spearman rank correlation of the Owen values per completion.

Last line: ``ms_per_completion=<x> speedup_vs_rank_bm25=<y>`` (median cold project time; naive
median / project median).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np
from rank_bm25 import BM25Okapi
from scipy.stats import spearmanr

from ospo.attribution import owen_num_coalitions, owen_values
from ospo.metrics import ndcg_at_k
from ospo.retriever import BM25, tokenize
from ospo.reward import NDCG, join_texts
from ospo.segmenter import Segmentation

SEGMENTS, UNION_SIZE, WORDS_PER_SEGMENT = 8, 4, 2


def make_vocab(rng: np.random.Generator, size: int) -> list[str]:
    """Distinct pronounceable pseudo-words (none is a stop word: all have >= 4 letters)."""
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < size:
        syl = rng.integers(2, 4)
        words.add(
            "".join(rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(syl))
        )
    return sorted(words)


def make_catalog(rng: np.random.Generator, vocab: list[str], num: int, title_len: int):
    """Product id -> title; word frequencies follow a Zipf-like law 1 / rank^1.05."""
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()
    lengths = rng.integers(title_len - 5, title_len + 6, size=num)
    return {
        f"P{i:06d}": " ".join(vocab[w] for w in rng.choice(len(vocab), n, p=p))
        for i, n in enumerate(lengths)
    }


def make_completion(rng: np.random.Generator, catalog: dict[str, str]):
    """A completion built from words of 3 target products (+ noise), its gains and segmentation.

    Gains: the targets E=1.0; products sharing words with them get S=0.1 / C=0.01 at random.
    """
    ids = list(catalog)
    targets = rng.choice(len(ids), 3, replace=False)
    pool_words = [w for t in targets for w in catalog[ids[t]].split()]
    noise_words = catalog[ids[rng.integers(len(ids))]].split()
    segments = []
    for s in range(SEGMENTS):
        source = noise_words if s % 4 == 3 else pool_words
        segments.append(" ".join(rng.choice(source, WORDS_PER_SEGMENT)))
    text, spans, pos = "", [], 0
    for seg in segments:
        spans.append((pos, pos + len(seg)))
        text += seg + ", "
        pos = len(text)
    segmentation = Segmentation(
        spans=spans, unions=[list(range(0, UNION_SIZE)), list(range(UNION_SIZE, SEGMENTS))]
    )
    gains = {ids[t]: 1.0 for t in targets}
    for j in rng.choice(len(ids), 6, replace=False):
        gains.setdefault(ids[j], float(rng.choice([0.1, 0.01, 0.0])))
    return text, segmentation, gains


def naive_value_fn(okapi: BM25Okapi, doc_ids: list[str], text, segmentation, gains, k: int):
    """One rank_bm25 retrieval per coalition, scalar NDCG@k."""

    def value_fn(masks: np.ndarray) -> np.ndarray:
        out = np.zeros(len(masks))
        for i, mask in enumerate(masks):
            query = join_texts("", segmentation.coalition_text(text, mask))
            scores = okapi.get_scores(tokenize(query))  # (D,)
            ranking = [doc_ids[c] for c in np.argsort(-scores, kind="stable")[:k]]
            out[i] = ndcg_at_k(ranking, gains, k)
        return out

    return value_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--vocab", type=int, default=3_000)
    parser.add_argument("--title-len", type=int, default=15)
    parser.add_argument("--completions", type=int, default=5)
    parser.add_argument("--reps", type=int, default=40, help="repetitions per completion")
    parser.add_argument("--naive-reps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    vocab = make_vocab(rng, args.vocab)
    catalog = make_catalog(rng, vocab, args.products, args.title_len)
    completions = [make_completion(rng, catalog) for _ in range(args.completions)]
    doc_ids = list(catalog)

    t0 = time.perf_counter()
    retriever = BM25()
    retriever.index(catalog)
    t_index = time.perf_counter() - t0
    reward = NDCG(retriever, k=args.k)
    t0 = time.perf_counter()
    okapi = BM25Okapi([tokenize(t) for t in catalog.values()])
    t_okapi = time.perf_counter() - t0
    unions = completions[0][1].unions
    print(
        f"catalog: {args.products} products, vocab {args.vocab}, seed {args.seed}; "
        f"index bm25s {t_index:.2f}s, rank_bm25 {t_okapi:.2f}s; completion: {SEGMENTS} segments "
        f"in unions {unions}, {owen_num_coalitions(unions)} coalitions"
    )

    def project(c: int, sample: SimpleNamespace) -> np.ndarray:
        text, segmentation, _ = completions[c]
        value_fn = reward.coalition_value_fn(text, segmentation, sample)
        return owen_values(value_fn, segmentation.unions)

    cold, warm, naive, rhos = [], [], [], []
    for c, (text, segmentation, gains) in enumerate(completions):
        sample = SimpleNamespace(qid=f"q{c}", gains=gains, pool=None)
        reward.judgements(sample)  # per-sample column map: built once per sample in training
        for _ in range(args.reps):
            reward.clear_cache()
            retriever.clear_cache()
            t0 = time.perf_counter()
            phi = project(c, sample)
            cold.append(time.perf_counter() - t0)
        for _ in range(args.reps):
            reward.clear_cache()
            t0 = time.perf_counter()
            project(c, sample)
            warm.append(time.perf_counter() - t0)
        for _ in range(args.naive_reps):
            value_fn = naive_value_fn(okapi, doc_ids, text, segmentation, gains, args.k)
            t0 = time.perf_counter()
            phi_naive = owen_values(value_fn, segmentation.unions)
            naive.append(time.perf_counter() - t0)
        rho = spearmanr(phi, phi_naive).statistic
        rhos.append(rho)
        print(
            f"completion {c}: v(N)={reward.score_texts([text], [sample])[0]:.3f} "
            f"phi={np.round(phi, 3).tolist()} naive={np.round(phi_naive, 3).tolist()} "
            f"spearman={rho:.2f}"
        )

    ms = 1e3 * statistics.median(cold)
    ms_warm = 1e3 * statistics.median(warm)
    ms_naive = 1e3 * statistics.median(naive)
    valid = [r for r in rhos if np.isfinite(r)]
    print(
        f"project path: median {ms:.2f} ms cold ({len(cold)} runs), {ms_warm:.2f} ms with warm "
        f"term cache; naive rank_bm25 path: median {ms_naive:.1f} ms ({len(naive)} runs); "
        f"mean Spearman(project, naive) = {np.mean(valid) if valid else float('nan'):.2f} "
        f"over {len(valid)} completions"
    )
    print(f"ms_per_completion={ms:.3f} speedup_vs_rank_bm25={ms_naive / ms:.0f}")


if __name__ == "__main__":
    main()
