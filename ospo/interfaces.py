"""The typed interfaces between the parts of a step, one per config group that has options.

A reward's path through the code, read with these: a `Retriever` ranks the catalog for a text;
a `Reward` turns that ranking into a number per completion and, for OSPO, into a value
function over coalitions of a completion's segments (from a `Segmenter`); an `Attribution`
turns that value function into segment credit phi; an `AdvantageEstimator` turns rewards (and
credit) into per-token advantages, which the loss weighs (`ospo.loss.PolicyLoss`). The classes
that implement them are the `_target_`s of `conf/retriever`, `conf/reward`, `conf/segmenter`,
`conf/attribution` and `conf/baseline/*.yaml: advantage`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from ospo.attribution import ValueFn
from ospo.data import Sample
from ospo.segmenter import Segmentation


@runtime_checkable
class Retriever(Protocol):
    """Ranks a catalog for query texts (`ospo.retriever.BM25`, `BM25Plus`, `BM25L`,
    `QueryLikelihood`, `TfidfCosine`, `Dense`)."""

    additive: bool  # score(text) == sum of its segments' segment_scores rows (BM25 family, QLD)
    doc_ids: list[str]  # product id of each score column

    def index(self, catalog: Mapping[str, str]) -> None:
        """Index product id -> text; columns follow the catalog's order."""

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Scores of every product for each text: (len(texts), D)."""

    def reads(self, text: str) -> bool:
        """Whether a query's score depends on `text` (only such spans become players)."""

    def clear_cache(self) -> None:
        """Forget cached per-term vectors or embeddings."""


@runtime_checkable
class Reward(Protocol):
    """A retriever's ranking judged by a metric (`ospo.reward.NDCG`, `Recall`)."""

    retriever: Retriever
    k: int

    def score_texts(self, texts: Sequence[str], samples: Sequence[Sample]) -> np.ndarray:
        """Main-metric reward of each completion (query = sample.prefix + text): (N,)."""

    def score_queries(self, texts: Sequence[str], samples: Sequence[Sample]) -> np.ndarray:
        """Main-metric reward of each whole query text (no prefix added): (N,)."""

    def metrics(
        self, texts: Sequence[str], samples: Sequence[Sample], k: int = 10
    ) -> dict[str, np.ndarray]:
        """NDCG@k, Recall@k and MRR of each text: each (N,)."""

    def coalition_value_fn(
        self, text: str, segmentation: Segmentation, sample: Sample, base_text: str = ""
    ) -> ValueFn:
        """v(S) for the coalitions S of `text`'s segments: reward of base_text + kept segments."""

    def clear_cache(self) -> None:
        """Forget memoised coalition values (called once per step)."""


@runtime_checkable
class Segmenter(Protocol):
    """Splits a completion into players and unions (`ospo.segmenter.PhraseSegmenter`, ...)."""

    max_segments: int | None  # players are merged past this many

    def __call__(self, text: str, reads: Callable[[str], bool] | None = None) -> Segmentation:
        """Character spans of the players and their partition into unions; with `reads`,
        only spans for which it is true are players (the rest of the text is context)."""


@runtime_checkable
class Attribution(Protocol):
    """Segment credit from coalition values (`ospo.attribution.Owen`, `Shapley`, `ShapleyMC`)."""

    def __call__(self, value_fn: ValueFn, unions: Sequence[Sequence[int]]) -> np.ndarray:
        """phi (n,): each player's share of v(all) - v(empty)."""

    def validate_budget(self, max_segments: int) -> int:
        """Worst-case coalitions for `max_segments` players; raises if over a hard budget."""


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Rewards (and credit) -> per-token advantages: the public extension point for token
    credit (docs/design.md section 2.10). The project's own estimators (`ospo.advantage.GRPO`,
    `OSPO`, the controls `RandomCredit`, `EntropyCredit`) implement it, and so does any class
    named by `baseline.advantage._target_` (example: `examples/position_credit.py`).

    Called once per rollout step, by `ospo.step.RLStep`, with N = B * G completions in
    prompt-major rows (rows g*G .. g*G+G-1 answer request g):
    * rewards (N,): the reward the step trains on (format gate applied);
    * group_size: G; completion_mask (N, T): 1 on valid completion tokens (EOS included);
    * with `needs_credit`: token_spans (N lists of [start, end) character spans of the valid
      tokens in the completion text), segmentations (N `ospo.segmenter.Segmentation`) and
      phis (N arrays (n_i,) of segment credit, None for a completion that got none, e.g. one
      the format gate zeroed);
    * with `needs_entropy`: entropy (N, T), the sampling policy's token entropy, no gradient.
    Returns advantages (N, T) float on the mask's device, zero on padding, and a dict of floats
    holding at least `ospo.advantage.reward_stats`'s keys and `cos_to_grpo`, which the module
    logs. Keeping each completion's mean token advantage at its group-relative A_i keeps which
    completion is better GRPO's call (every estimator shipped does).
    """

    needs_credit: bool  # True: call with token_spans, segmentations and phis
    needs_entropy: bool  # True: call with entropy, the policy's (N, T) token entropy (no grad)

    def __call__(
        self, rewards: Any, group_size: int, completion_mask: Tensor, **credit: Any
    ) -> tuple[Tensor, dict[str, float]]:
        """Advantages (N, T), zero on padding, and their stats for logging."""
