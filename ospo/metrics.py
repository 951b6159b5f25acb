"""Ranking metrics: scalar versions on ranked id lists, vectorised versions on score matrices.

Scalar functions take a ranking (a sequence of doc ids, best first, assumed duplicate-free) and
the judgements of one request. Vectorised functions take a score matrix ``scores`` of shape
(K, D) (K queries or coalitions, D candidate documents) and judgements aligned with its columns;
they are what the reward uses on coalition batches.

Conventions shared by both:

* NDCG@k (as trec_eval's ``ndcg_cut``): linear gain, discount 1 / log2(rank + 1) with ranks
  counted from 1, DCG@k = sum_{r<=k} g(d_r) / log2(r + 1); the ideal DCG sorts ALL judged gains
  of the request (not only the retrieved ones) in decreasing order and cuts at k. A request
  with no positive gain scores 0.0.
* Recall@k = |relevant in top k| / |relevant|; no relevant item -> 0.0.
* MRR = 1 / rank of the first relevant document (0.0 if none is ranked, or none within k when
  a cutoff is given).
* Relevant documents are those with gain > 0 when a gains mapping is given.
* Ranking a score row: documents sorted by decreasing score; equal scores are broken by column
  order (the lower column index ranks first), i.e. a stable sort of ``-scores``. The top k is
  found without sorting whole rows (see :func:`top_k_indices`), with the same tie rule.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np


def _discounts(k: int) -> np.ndarray:
    """1 / log2(r + 1) for ranks r = 1..k.  # (k,)"""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _relevant_set(relevant: Collection[str] | Mapping[str, float]) -> set[str]:
    if isinstance(relevant, Mapping):
        return {doc for doc, gain in relevant.items() if gain > 0}
    return set(relevant)


def _check_k(k: int | None, allow_none: bool = False) -> None:
    if k is None and allow_none:
        return
    if k is None or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def ideal_dcg(gains: Sequence[float] | np.ndarray, k: int) -> float:
    """Ideal DCG@k: all judged gains sorted in decreasing order, cut at k."""
    _check_k(k)
    g = np.sort(np.asarray(gains, dtype=np.float64))[::-1][:k]  # (min(k, |gains|),)
    return float(g @ _discounts(len(g)))


def ndcg_at_k(ranking: Sequence[str], gains: Mapping[str, float], k: int) -> float:
    """NDCG@k = DCG@k / IDCG@k with linear gains (trec_eval ``ndcg_cut``).

    DCG@k = sum_{r=1}^{min(k, len(ranking))} gains[ranking[r-1]] / log2(r + 1); unjudged ids have
    gain 0. IDCG@k uses all judged gains. Returns 0.0 when no judged gain is positive.
    """
    _check_k(k)
    idcg = ideal_dcg(list(gains.values()), k)
    if idcg <= 0:
        return 0.0
    top = list(ranking[:k])
    g = np.array([gains.get(doc, 0.0) for doc in top], dtype=np.float64)  # (<=k,)
    return float(g @ _discounts(len(top))) / idcg


def recall_at_k(
    ranking: Sequence[str], relevant: Collection[str] | Mapping[str, float], k: int
) -> float:
    """Recall@k = |relevant ∩ top k| / |relevant|; 0.0 when nothing is relevant."""
    _check_k(k)
    rel = _relevant_set(relevant)
    if not rel:
        return 0.0
    return sum(doc in rel for doc in ranking[:k]) / len(rel)


def mrr(
    ranking: Sequence[str],
    relevant: Collection[str] | Mapping[str, float],
    k: int | None = None,
) -> float:
    """Reciprocal rank of the first relevant id in ``ranking`` (within the top k if k is given)."""
    _check_k(k, allow_none=True)
    rel = _relevant_set(relevant)
    top = ranking if k is None else ranking[:k]
    for rank, doc in enumerate(top, start=1):
        if doc in rel:
            return 1.0 / rank
    return 0.0


# ---------------------------------------------------------------------------------------------
# Vectorised versions on (K, D) score matrices.


_SAMPLE_STRIDE = 16  # a wide matrix's k-th-value bound comes from every 16th column


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best documents of each row, best first.  # (K, min(k, D))

    Order: decreasing score, ties broken by increasing column index (deterministic, identical
    to ``np.argsort(-scores, axis=1, kind="stable")[:, :k]``).

    Wide matrices (D >= 16 * max(k, 64)) first bound each row's k-th largest value from below
    by the k-th largest value L of a column sample (every 16th column): the top k of a row lies
    among its scores > L, plus, when fewer than k scores exceed L, the lowest-index columns
    scoring exactly L. Only those candidates are partitioned, which avoids a partition of the
    whole (K, D) matrix; the result is exact whatever the sample.
    """
    _check_k(k)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (K, D) matrix, got shape {scores.shape}")
    num_rows, num_docs = scores.shape
    if num_docs < _SAMPLE_STRIDE * max(k, 64) or num_rows == 0:
        return _top_k_direct(scores, k)
    # 1. L = k-th largest value of a column sample  <=  the row's k-th largest value
    sample = scores[:, ::_SAMPLE_STRIDE]  # (K, m), m >= k
    bound = np.partition(sample, sample.shape[1] - k, axis=1)[:, sample.shape[1] - k]  # (K,)
    # 2. candidates: scores > L, packed left in each row (column order kept), padded with -inf
    above = scores > bound[:, None]  # (K, D)
    rows, cols = np.nonzero(above)  # row-major: columns increase within a row
    counts = np.bincount(rows, minlength=num_rows)  # (K,)
    width = max(int(counts.max()), k)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))  # (K,)
    slot = np.arange(rows.size) - starts[rows]  # position of each candidate in its row
    packed = np.full((num_rows, width), -np.inf, dtype=np.float64)  # (K, W)
    packed[rows, slot] = scores[rows, cols]
    packed_cols = np.zeros((num_rows, width), dtype=np.int64)  # (K, W)
    packed_cols[rows, slot] = cols
    # 3. exact top k among the candidates (ties by slot = by column)
    top = np.take_along_axis(packed_cols, _top_k_direct(packed, k), axis=1)  # (K, k)
    # 4. rows with fewer than k scores above L: the k-th value is L; fill with the first ties
    for r in np.flatnonzero(counts < k):
        have = counts[r]
        top[r, have:] = np.flatnonzero(scores[r] == bound[r])[: k - have]
    return top


def _top_k_direct(scores: np.ndarray, k: int) -> np.ndarray:
    """top_k_indices by one argpartition of the whole matrix (same order and tie rule)."""
    num_rows, num_docs = scores.shape
    if k >= num_docs or num_rows == 0:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    # 1. the k-th largest value t of each row
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (K, k) unordered
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)  # (K, 1)
    # 2. keep every score > t, then the lowest-index columns among those == t until k are kept
    above = scores > kth  # (K, D)
    need = k - above.sum(axis=1, keepdims=True)  # (K, 1)
    tied = scores == kth  # (K, D)
    keep = above | (tied & (np.cumsum(tied, axis=1) <= need))  # (K, D), exactly k per row
    cols = np.nonzero(keep)[1].reshape(num_rows, k)  # (K, k), increasing column order
    # 3. sort the k kept columns by score; stable, so ties stay in column order
    vals = np.take_along_axis(scores, cols, axis=1)  # (K, k)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def ndcg_from_scores(
    scores: np.ndarray,
    gains: np.ndarray,
    k: int,
    ideal_gains: np.ndarray | None = None,
) -> np.ndarray:
    """NDCG@k of each row's ranking.  # (K,)

    scores: (K, D); gains: (D,) gain of each column; ideal_gains: every judged gain of the
    request (default ``gains``), so judged documents outside the D columns still count in IDCG.
    """
    scores = np.asarray(scores)
    gains = np.asarray(gains, dtype=np.float64)
    _check_columns(scores, gains)
    idcg = ideal_dcg(gains if ideal_gains is None else ideal_gains, k)
    if idcg <= 0 or scores.shape[0] == 0:
        return np.zeros(scores.shape[0], dtype=np.float64)
    top = top_k_indices(scores, k)  # (K, k')
    return (gains[top] @ _discounts(top.shape[1])) / idcg


def recall_from_scores(
    scores: np.ndarray,
    relevant: np.ndarray,
    k: int,
    num_relevant: int | None = None,
) -> np.ndarray:
    """Recall@k of each row.  # (K,)

    relevant: (D,) bool; num_relevant: the denominator (default ``relevant.sum()``; pass the
    request's full count when relevant documents may lie outside the D columns).
    """
    scores = np.asarray(scores)
    relevant = np.asarray(relevant, dtype=bool)
    _check_columns(scores, relevant)
    total = int(relevant.sum()) if num_relevant is None else int(num_relevant)
    if total <= 0 or scores.shape[0] == 0:
        return np.zeros(scores.shape[0], dtype=np.float64)
    top = top_k_indices(scores, k)  # (K, k')
    return relevant[top].sum(axis=1) / total


def mrr_from_scores(scores: np.ndarray, relevant: np.ndarray, k: int | None = None) -> np.ndarray:
    """Reciprocal rank of the first relevant column of each row's ranking.  # (K,)

    Without sorting: the first relevant document is the relevant column with the highest score
    (lowest index among ties); its rank is 1 + #(scores above it) + #(equal scores at a lower
    column index). With k, ranks beyond k give 0.
    """
    _check_k(k, allow_none=True)
    scores = np.asarray(scores)
    relevant = np.asarray(relevant, dtype=bool)
    _check_columns(scores, relevant)
    out = np.zeros(scores.shape[0], dtype=np.float64)
    if not relevant.any() or scores.shape[0] == 0:
        return out
    rel_cols = np.flatnonzero(relevant)  # (R,)
    rel_scores = scores[:, rel_cols]  # (K, R)
    first = rel_cols[np.argmax(rel_scores, axis=1)]  # (K,) argmax returns the lowest index
    best = scores[np.arange(scores.shape[0]), first][:, None]  # (K, 1)
    earlier = np.arange(scores.shape[1])[None, :] < first[:, None]  # (K, D)
    rank = 1 + (scores > best).sum(axis=1) + ((scores == best) & earlier).sum(axis=1)  # (K,)
    out = 1.0 / rank
    if k is not None:
        out[rank > k] = 0.0
    return out


def _check_columns(scores: np.ndarray, per_column: np.ndarray) -> None:
    if scores.ndim != 2 or per_column.shape != (scores.shape[1],):
        raise ValueError(
            f"expected scores (K, D) and a (D,) judgement vector, got {scores.shape} and "
            f"{per_column.shape}"
        )


# ----------------------------------------------------------------------------- over seeds


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided t-interval, n) of the finite values.

    half = t_{(1+level)/2, n-1} * s / sqrt(n), s = sample std (ddof=1); NaN when n < 2.
    Mean is NaN when there is no finite value.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, n
    half = t_quantile(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, half, n


def format_ci(stat: tuple[float, float, int], digits: int = 4, signed: bool = False) -> str:
    """A `mean_ci` triple as 'mean ± half' ('mean ± n/a' for one value, 'n/a' for none);
    `signed` writes the mean with its sign."""
    mean, half, n = stat
    if n == 0 or not math.isfinite(mean):
        return "n/a"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if not math.isfinite(half):
        return f"{m} ± n/a"
    return f"{m} ± {half:.{digits}f}"
