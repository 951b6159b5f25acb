"""Rewards: a retriever's ranking of a text, judged by a ranking metric (config group ``reward``).

``NDCG`` (main metric NDCG@k) and ``Recall`` (Recall@k) share everything but the metric. A
sample's ranking is over ``sample.pool`` (product ids) when it is not None, else over the whole
catalog; NDCG's ideal DCG and Recall's denominator use ALL of the sample's judged products
(see :mod:`ospo.metrics`), ties in the ranking go to the lower catalog column.

Coalition values for attribution (docs/design.md sections 2.4 and 3), v(S) = reward of
``base_text`` followed by the completion with the players outside S taken out
(``Segmentation.coalition_text``): glue words, punctuation and unread words stay in every
coalition as context, so v(all players) is the reward of the completion's own query and the
credits add up to it minus v(empty):

* additive retrievers (BM25 family): the score row of S is
  ``base_row + sum_{j in S} segment_row_j``, where the base row scores ``base_text`` plus the
  context and the segment rows come from ``retriever.segment_scores`` (computed once per
  completion), so a whole (K, n) mask batch costs one masked sum and one top-k, with no
  retrieval per coalition. Columns that are identical in the base row and in
  every segment row (documents matching no query term) score the same in every coalition and,
  with ties broken by column order, only the first k of them can reach the top k; the rest are
  dropped before the sum.
* other retrievers (Dense): the coalition texts are built and only texts not seen before are
  scored, in one batch (the retriever caches embeddings by text).

Values are memoised by (sample qid, coalition text) in a bounded dict; the training loop calls
:meth:`Reward.clear_cache` once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ospo.attribution import ValueFn
from ospo.metrics import (
    mrr_from_scores,
    ndcg_from_scores,
    recall_from_scores,
)

if TYPE_CHECKING:
    from ospo.interfaces import Retriever


def join_texts(base_text: str, kept: str) -> str:
    """The query text of a coalition: ``base_text`` + " " + kept segments (no dangling space)."""
    if base_text and kept:
        return f"{base_text} {kept}"
    return base_text or kept


def query_text(sample: Any, completion: str) -> str:
    """The query the retriever sees for a completion: ``sample.prefix`` + completion.

    The prefix is the request in the append format (the policy writes only the words it adds)
    and empty in the rewrite format (the completion is the whole query); see
    :class:`ospo.data.Sample`."""
    return join_texts(getattr(sample, "prefix", ""), completion)


@dataclass(frozen=True)
class Judgements:
    """A sample's judgements aligned with the columns it is ranked over.

    cols: (P,) catalog columns of the pool, or None for the whole catalog (P = D).
    gain_pos / gain_val: positions (into the P columns) and gains of judged products with gain != 0.
    ideal: (G,) every judged gain of the sample (for IDCG); num_relevant: #judged with gain > 0.
    """

    cols: np.ndarray | None
    num_cols: int
    gain_pos: np.ndarray
    gain_val: np.ndarray
    ideal: np.ndarray
    num_relevant: int

    def gains(self, columns: np.ndarray | None = None) -> np.ndarray:
        """Gain of each of the P columns, or of the given subset of them.  # (P,) or (C,)"""
        g = np.zeros(self.num_cols, dtype=np.float64)
        g[self.gain_pos] = self.gain_val
        return g if columns is None else g[columns]


class Reward:
    """Reward = ranking metric of the retriever's ranking of a text (main metric: NDCG@k).

    Subclasses pick the main metric with ``metric`` ("ndcg" or "recall").
    """

    metric: str = "ndcg"

    def __init__(self, retriever: Retriever, k: int = 10, max_cache: int = 200_000) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self.metric not in ("ndcg", "recall"):
            raise ValueError(f"metric must be 'ndcg' or 'recall', got {self.metric!r}")
        self.retriever = retriever
        self.k = int(k)
        self.max_cache = int(max_cache)
        self._memo: dict[tuple[str, str], float] = {}
        self._judged: dict[str, Judgements] = {}
        self._col_of: dict[str, int] | None = None
        self._col_src: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return f"{self.metric}@{self.k}"

    def clear_cache(self) -> None:
        """Forget memoised coalition values (call once per training step)."""
        self._memo.clear()

    # -- judgements ------------------------------------------------------------------------
    def _columns(self) -> dict[str, int]:
        doc_ids = self.retriever.doc_ids
        if not doc_ids:
            raise RuntimeError(
                f"{type(self.retriever).__name__} has no index: call .index(catalog) before "
                "computing rewards"
            )
        src = (id(doc_ids), len(doc_ids))
        if self._col_of is None or self._col_src != src:
            self._col_of = {d: i for i, d in enumerate(doc_ids)}
            self._col_src = src
            self._judged.clear()
            self._memo.clear()
        return self._col_of

    def judgements(self, sample: Any) -> Judgements:
        """Columns and gains of a sample (cached by ``sample.qid``)."""
        col_of = self._columns()
        qid = getattr(sample, "qid", None)
        if qid is not None and qid in self._judged:
            return self._judged[qid]
        gains: Mapping[str, float] = sample.gains
        pool = getattr(sample, "pool", None)
        for pid in gains:
            if pid not in col_of:
                raise ValueError(
                    f"sample {qid!r}: product id {pid!r} in its gains is not in the retriever's "
                    f"index ({len(col_of)} products)"
                )
        if pool is None:
            cols = None
            pos_of = col_of
            num_cols = len(col_of)
        else:
            pool_ids = list(dict.fromkeys(pool))
            if not pool_ids:
                raise ValueError(f"sample {qid!r}: its pool is empty; use None for the catalog")
            for pid in pool_ids:
                if pid not in col_of:
                    raise ValueError(
                        f"sample {qid!r}: product id {pid!r} in its pool is not in the "
                        f"retriever's index ({len(col_of)} products)"
                    )
            cols = np.array([col_of[pid] for pid in pool_ids], dtype=np.int64)  # (P,)
            pos_of = {pid: i for i, pid in enumerate(pool_ids)}
            num_cols = len(pool_ids)
        ranked = [(pos_of[pid], g) for pid, g in gains.items() if g != 0 and pid in pos_of]
        judged = Judgements(
            cols=cols,
            num_cols=num_cols,
            gain_pos=np.array([p for p, _ in ranked], dtype=np.int64),
            gain_val=np.array([g for _, g in ranked], dtype=np.float64),
            ideal=np.array(list(gains.values()), dtype=np.float64),
            num_relevant=sum(1 for g in gains.values() if g > 0),
        )
        if qid is not None:
            self._judged[qid] = judged
        return judged

    # -- metrics on score rows ---------------------------------------------------------------
    def _main(
        self, scores: np.ndarray, judged: Judgements, columns: np.ndarray | None = None
    ) -> np.ndarray:
        """Main metric of each row of ``scores`` (K, C): C = the P columns, or ``columns``."""
        gains = judged.gains(columns)  # (C,)
        if self.metric == "ndcg":
            return ndcg_from_scores(scores, gains, self.k, ideal_gains=judged.ideal)
        return recall_from_scores(scores, gains > 0, self.k, num_relevant=judged.num_relevant)

    @staticmethod
    def _restrict(scores: np.ndarray, judged: Judgements) -> np.ndarray:
        return scores if judged.cols is None else scores[:, judged.cols]  # (Q, P)

    @staticmethod
    def _key(sample: Any) -> str | None:
        return getattr(sample, "qid", None)

    def _remember(self, key: tuple[str, str], value: float) -> None:
        if len(self._memo) >= self.max_cache:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = value

    # -- public API --------------------------------------------------------------------------
    def score_texts(self, texts: Sequence[str], samples: Sequence[Any]) -> np.ndarray:
        """Main-metric reward of each completion for its sample: the retriever ranks
        :func:`query_text` (the sample's prefix + the completion).  # (N,)"""
        texts = list(texts)
        if len(texts) != len(samples):
            raise ValueError(f"got {len(texts)} texts for {len(samples)} samples; need one each")
        return self.score_queries(
            [query_text(s, t) for t, s in zip(texts, samples, strict=True)], samples
        )

    def score_queries(self, texts: Sequence[str], samples: Sequence[Any]) -> np.ndarray:
        """Main-metric reward of each whole query text (no prefix added), e.g. the raw
        request.  # (N,)"""
        texts = list(texts)
        if len(texts) != len(samples):
            raise ValueError(f"got {len(texts)} texts for {len(samples)} samples; need one each")
        out = np.zeros(len(texts), dtype=np.float64)
        todo: list[int] = []
        for i, (text, sample) in enumerate(zip(texts, samples, strict=True)):
            known = self._recalled(sample, text)
            if known is None:
                todo.append(i)
            else:
                out[i] = known
        if not todo:
            return out
        scores = self.retriever.score([texts[i] for i in todo])  # (M, D)
        for row, i in enumerate(todo):
            out[i] = self._value(scores[row : row + 1], samples[i], texts[i])
        return out

    def _recalled(self, sample: Any, text: str) -> float | None:
        """The memoised value of `text` for `sample`, or None."""
        key = self._key(sample)
        return None if key is None else self._memo.get((key, text))

    def _value(self, scores: np.ndarray, sample: Any, text: str) -> float:
        """Main metric of one score row (1, D) for its sample, remembered by (qid, text)."""
        judged = self.judgements(sample)
        value = float(self._main(self._restrict(scores, judged), judged)[0])
        key = self._key(sample)
        if key is not None:
            self._remember((key, text), value)
        return value

    def evaluate(
        self, texts: Sequence[str], samples: Sequence[Any], k: int = 10
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Reward (N,) and :meth:`metrics` of each completion from ONE retrieval of its query.

        The training step's reward and its logged NDCG@k / Recall@k / MRR come from the same
        score rows; the rewards fill the coalition memo as :meth:`score_texts` does.
        """
        texts = list(texts)
        if len(texts) != len(samples):
            raise ValueError(f"got {len(texts)} texts for {len(samples)} samples; need one each")
        queries = [query_text(s, t) for t, s in zip(texts, samples, strict=True)]
        scores = self.retriever.score(queries) if queries else None  # (N, D)
        rewards = np.zeros(len(queries), dtype=np.float64)  # (N,)
        for i, (query, sample) in enumerate(zip(queries, samples, strict=True)):
            known = self._recalled(sample, query)
            rewards[i] = self._value(scores[i : i + 1], sample, query) if known is None else known
        return rewards, self._metrics_from_scores(scores, samples, k)

    def metrics(
        self, texts: Sequence[str], samples: Sequence[Any], k: int = 10
    ) -> dict[str, np.ndarray]:
        """NDCG@k, Recall@k and MRR (no cutoff) of each completion's query
        (:func:`query_text`).  # each (N,)"""
        texts = list(texts)
        if len(texts) != len(samples):
            raise ValueError(f"got {len(texts)} texts for {len(samples)} samples; need one each")
        texts = [query_text(s, t) for t, s in zip(texts, samples, strict=True)]
        scores = self.retriever.score(texts) if texts else None  # (N, D)
        return self._metrics_from_scores(scores, samples, k)

    def _metrics_from_scores(
        self, scores: np.ndarray | None, samples: Sequence[Any], k: int
    ) -> dict[str, np.ndarray]:
        """NDCG@k, Recall@k and MRR of each score row (N, D) for its sample.  # each (N,)"""
        out = {name: np.zeros(len(samples)) for name in (f"ndcg@{k}", f"recall@{k}", "mrr")}
        for i, sample in enumerate(samples):
            judged = self.judgements(sample)
            row = self._restrict(scores[i : i + 1], judged)  # (1, P)
            gains = judged.gains()  # (P,)
            out[f"ndcg@{k}"][i] = ndcg_from_scores(row, gains, k, ideal_gains=judged.ideal)[0]
            out[f"recall@{k}"][i] = recall_from_scores(row, gains > 0, k, judged.num_relevant)[0]
            out["mrr"][i] = mrr_from_scores(row, gains > 0)[0]
        return out

    def coalition_value_fn(
        self, text: str, segmentation: Any, sample: Any, base_text: str = ""
    ) -> ValueFn:
        """value_fn(masks (K, n) bool) -> (K,) rewards of ``base_text`` + the coalition's text.

        ``segmentation.spans`` index into ``text``; the text of a mask row is
        ``segmentation.coalition_text(text, mask)`` (the players outside it taken out, the
        context kept); the coalition's query is :func:`join_texts` (base_text, that text), so
        with ``base_text = sample.prefix`` the full coalition's query is :func:`query_text`.
        """
        n = len(segmentation.spans)
        judged = self.judgements(sample)
        key = self._key(sample)
        if getattr(self.retriever, "additive", False):
            compute = self._additive_values(text, segmentation, judged, base_text)
        else:
            compute = self._text_values(judged)

        def value_fn(masks: np.ndarray) -> np.ndarray:
            masks = np.asarray(masks, dtype=bool)
            if masks.ndim != 2 or masks.shape[1] != n:
                raise ValueError(f"masks must have shape (K, {n}), got {masks.shape}")
            queries = [join_texts(base_text, segmentation.coalition_text(text, m)) for m in masks]
            values = np.zeros(len(queries), dtype=np.float64)  # (K,)
            todo = []
            for i, q in enumerate(queries):
                if key is not None and (key, q) in self._memo:
                    values[i] = self._memo[(key, q)]
                else:
                    todo.append(i)
            if todo:
                values[todo] = compute(masks[todo], [queries[i] for i in todo])
                if key is not None:
                    for i in todo:
                        self._remember((key, queries[i]), float(values[i]))
            return values

        return value_fn

    # -- coalition value back-ends -----------------------------------------------------------
    def _additive_values(
        self, text: str, segmentation: Any, judged: Judgements, base_text: str
    ) -> Callable[[np.ndarray, list[str]], np.ndarray]:
        """Masked sums of [base row; segment rows] over the columns that can reach the top k.
        The base row scores ``base_text`` and the context (the empty coalition's text)."""
        segments = segmentation.texts(text)
        context = join_texts(base_text, segmentation.coalition_text(text, [False] * len(segments)))
        rows = self.retriever.segment_scores([context, *segments])  # (n+1, D)
        rows = self._restrict(rows, judged)  # (n+1, P)
        # columns equal to the row-wise minimum everywhere score identically in every
        # coalition; keep only the first k of them (ties go to the lower column)
        keep = ~(rows == rows.min(axis=1, keepdims=True)).all(axis=0)  # (P,) not background
        keep[np.flatnonzero(~keep)[: self.k]] = True
        cand = None
        if keep.sum() < 0.75 * keep.size:  # worth a copy
            cand = np.flatnonzero(keep)  # (C,) increasing
            rows = rows[:, cand]  # (n+1, C)
        base = rows[0]  # (C,)
        seg = np.ascontiguousarray(rows[1:])  # (n, C)

        def compute(masks: np.ndarray, _queries: list[str]) -> np.ndarray:
            # 0/1 weights make every product exact and each column is summed in the same
            # order, so equal columns stay exactly equal (ties stay ties)
            scores = masks.astype(np.float32) @ seg  # (K, n) @ (n, C) -> (K, C)
            scores += base
            return self._main(scores, judged, cand)

        return compute

    def _text_values(self, judged: Judgements) -> Callable[[np.ndarray, list[str]], np.ndarray]:
        """Score each distinct coalition text once, in one batch."""

        def compute(_masks: np.ndarray, queries: list[str]) -> np.ndarray:
            unique = list(dict.fromkeys(queries))
            scores = self._restrict(self.retriever.score(unique), judged)  # (U, P)
            values = self._main(scores, judged)  # (U,)
            pos = {q: i for i, q in enumerate(unique)}
            return values[[pos[q] for q in queries]]

        return compute


class NDCG(Reward):
    """Reward = NDCG@k of the ranking (graded gains, config ``reward=ndcg``)."""

    metric = "ndcg"


class Recall(Reward):
    """Reward = Recall@k of the ranking (config ``reward=recall``)."""

    metric = "recall"
