"""One RL step of GRPO or OSPO, in parts (docs/design.md section 4).

    prompts (B) -> rollout (engine: hf | vllm): G completions each  Rollouts, ids/mask (N, T)
                -> score: reward of each completion                r (N,)
                -> compute_credit [OSPO]: segments, phi per completion
                   (token_entropy [entropy control]: H (N, T))
                -> baseline.advantage: advantages                   A (N, T), stats
                -> update: log-probs, loss, backward, clip, optimizer and LR steps (x mu)

`RLStep` runs the parts in this order and times each. `ospo.build.build_step` builds it from
the config for `train.py` and for every benchmark, so what they time is the step that trains;
`ospo.module.RLModule.training_step` calls it and only logs its `StepResult`. Which prompts a
step sees (`PromptSchedule`) and its sampling seed (`step_seed`) are pure functions of (seed,
step, rank), so a resumed run repeats a straight one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ospo.attribution import CountingValueFn
from ospo.baseline import Baseline
from ospo.data import Sample
from ospo.format import FormatCheck, format_ok
from ospo.interfaces import Attribution, Reward, Segmenter
from ospo.policy import Policy, Rollouts
from ospo.rollout import HFRollout


@dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled (`rl.*`). The log-prob pass divides logits by the same
    temperature, so the ratio pi / pi_old is taken on the sampling distribution."""

    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed for one rollout step, so a resumed run samples exactly what a straight run would."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class PromptSchedule:
    """Which requests each rollout step trains on: seeded epoch permutations, sharded by rank.

    Step s on rank r takes positions [(s * world + r) * B, ... + B) of the endless sequence
    made of one permutation of the training split per epoch. A pure function of (seed, step,
    rank), so resuming needs no data-loader state.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int, rank=0, world=1):
        if not samples:
            raise ValueError("the training split is empty: nothing to train on")
        self.samples, self.batch_size, self.seed = list(samples), batch_size, seed
        self.rank, self.world = rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self.samples))
        return self._perms[epoch]

    def __call__(self, step: int) -> list[Sample]:
        n = len(self.samples)
        start = (step * self.world + self.rank) * self.batch_size
        return [
            self.samples[self._perm(pos // n)[pos % n]]
            for pos in range(start, start + self.batch_size)
        ]


# ----------------------------------------------------------------------------- the parts
def score(
    reward: Reward,
    texts: Sequence[str],
    samples: Sequence[Sample],
    well_formed: Sequence[bool] | None = None,
    invalid_reward: float | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reward of each completion for its request, (N,), and its ranking metrics (NDCG@10,
    Recall@10, MRR, each (N,), ungated), from one retrieval; the coalition memo starts empty.

    With `invalid_reward` set, a completion that fails the format check (`well_formed` False:
    too long, no EOS, chat talk) gets that reward instead of its retrieval score, so stuffing
    a query with words past the format's budget is a losing move."""
    reward.clear_cache()
    r, metrics = reward.evaluate(texts, samples)  # (N,), each (N,)
    if invalid_reward is not None and well_formed is not None:
        r = np.where(np.asarray(well_formed, dtype=bool), r, float(invalid_reward))
    return r, metrics


def coalition_base(sample: Sample, keep_query: bool) -> str:
    """The text every coalition starts from, so v(empty) is its reward: the sample's query
    prefix (the request, in the append format), else the request when `keep_query`, else ""."""
    return getattr(sample, "prefix", "") or (sample.request if keep_query else "")


@dataclass
class Credit:
    """Segment credit of a batch of completions and what it cost."""

    segmentations: list = field(default_factory=list)  # one Segmentation per completion
    phis: list[np.ndarray | None] = field(default_factory=list)  # (n_i,) each; None: no credit
    coalitions: int = 0  # coalitions scored, summed over completions
    seconds: float = 0.0

    @property
    def segments(self) -> list[int]:
        """n_i, the number of players of each completion."""
        return [seg.n for seg in self.segmentations]


def compute_credit(
    texts: Sequence[str],
    samples: Sequence[Sample],
    segmenter: Segmenter,
    attribution: Attribution,
    reward: Reward,
    keep_query: bool,
    scored: Sequence[bool] | None = None,
) -> Credit:
    """Segment each completion and attribute its reward to the segments.

    Players are the spans the training retriever reads (`reward.retriever.reads`). v(S) is the
    reward of `coalition_base` (the request in the append format or with `keep_query`, else "")
    followed by the completion with the players outside S taken out, every other word kept as
    context (`Segmentation.coalition_text`). So v(all) is the completion's retrieval reward and
    sum(phi) = r - v(empty), except with `keep_query` in the rewrite format, whose base the
    reward's query does not hold. Each completion's coalitions are scored in one batched call
    (`reward.coalition_value_fn`).

    `scored` (N,) False marks a completion that gets no credit: its phi is None, no coalition
    is scored, and the estimators give it the sequence advantage A_i. The step passes the
    format check's verdict when the gate is on: a gated completion's reward is
    `invalid_reward` whatever its words retrieve, so its failure (too long, no EOS) belongs to
    the whole sequence and no word's retrieval value explains it.
    """
    t0 = time.perf_counter()
    credit = Credit()
    reads = getattr(reward.retriever, "reads", None)
    for i, (text, sample) in enumerate(zip(texts, samples, strict=True)):
        seg = segmenter(text, reads=reads)
        credit.segmentations.append(seg)
        if scored is not None and not scored[i]:
            credit.phis.append(None)
            continue
        base = coalition_base(sample, keep_query)
        value_fn = CountingValueFn(reward.coalition_value_fn(text, seg, sample, base_text=base))
        phi = attribution(value_fn, seg.unions)  # (n_i,)
        credit.phis.append(np.asarray(phi, dtype=np.float64))
        credit.coalitions += value_fn.rows
    credit.seconds = time.perf_counter() - t0
    return credit


def token_entropy(policy: Policy, ro: Rollouts, sampling: Sampling, group_size: int) -> Tensor:
    """Per-token entropy of the policy's sampling distribution at each completion position,
    (N, T), without gradient (for estimators with `needs_entropy`, e.g. EntropyCredit)."""
    with torch.no_grad():
        _, entropy = policy.token_logprobs(
            ro.prompt_ids,
            ro.prompt_mask,
            ro.completion_ids,
            ro.completion_mask,
            group_size=group_size,
            temperature=sampling.temperature,
            with_entropy=True,
        )
    return entropy  # (N, T)


def backward(loss: Tensor) -> None:
    """Plain autograd; in training, Lightning's `manual_backward` takes its place."""
    loss.backward()


def update(
    policy: Policy,
    ro: Rollouts,
    advantages: Tensor,
    baseline: Baseline,
    optimizer,
    scheduler,
    *,
    sampling: Sampling,
    group_size: int,
    ref_policy: Policy | None = None,
    backward: Callable[[Tensor], None] = backward,
    clip: Callable[[Any], None] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`baseline.mu` policy updates on one batch of rollouts; returns the last loss and metrics.

    With mu > 1 the log-probs before the first update are kept as pi_old for the ratio; with
    beta > 0 a frozen reference policy gives the KL term. Each update: log-probs and entropy
    (N, T) with one prompt pass per request (`group_size`), the loss, `backward` (Lightning's
    `manual_backward` in training), `clip`, optimizer step, scheduler step.
    """
    args = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    shared = {"group_size": group_size, "temperature": sampling.temperature}
    mask = ro.completion_mask.float()  # (N, T)
    old_logp = ref_logp = None
    if baseline.mu > 1:
        with torch.no_grad():
            old_logp = policy.token_logprobs(*args, **shared)  # (N, T)
    if baseline.loss.needs_reference:
        with torch.no_grad():
            ref_logp = ref_policy.token_logprobs(*args, **shared)  # (N, T)
    for _ in range(baseline.mu):
        logp, entropy = policy.token_logprobs(*args, with_entropy=True, **shared)  # (N, T) x2
        loss, metrics = baseline.loss(
            logp,
            logp.detach() if old_logp is None else old_logp,
            advantages,
            mask,
            ref_logp=ref_logp,
            entropy=entropy.detach(),
        )
        optimizer.zero_grad()
        backward(loss)
        if clip is not None:
            clip(optimizer)
        optimizer.step()
        scheduler.step()
    return loss, metrics


# ----------------------------------------------------------------------------- the step
@dataclass
class StepResult:
    """Everything one step produced, for logging and for the benchmarks."""

    samples: list[Sample]  # N = B * G, the request of each completion
    rollouts: Rollouts
    rewards: np.ndarray  # (N,)
    well_formed: list[bool]  # (N,) passed the format check
    metrics: dict[str, np.ndarray]  # ndcg@10, recall@10, mrr of each completion, (N,) each
    credit: Credit  # empty for GRPO
    advantages: Tensor  # (N, T)
    advantage_stats: dict[str, float]
    loss: Tensor
    loss_metrics: dict[str, float]
    seconds: dict[str, float]  # step, sync, generate, reward, credit, advantage, update


class RLStep:
    """rollout -> score -> [credit] -> advantages -> update, timed part by part.

    `engine` samples the rollouts (`ospo.rollout`; the policy's own `generate` by default);
    before each rollout it catches up with the optimizer steps taken so far (`updates`).
    `format_check` marks each completion well-formed or not (logged; with `invalid_reward`
    set, an ill-formed completion's reward is replaced by it, see `score`)."""

    def __init__(
        self,
        policy: Policy,
        reward: Reward,
        baseline: Baseline,
        sampling: Sampling,
        num_generations: int,
        segmenter: Segmenter | None = None,
        attribution: Attribution | None = None,
        ref_policy: Policy | None = None,
        format_check: FormatCheck | None = None,
        invalid_reward: float | None = None,
        engine: HFRollout | None = None,
    ):
        if baseline.needs_credit and (segmenter is None or attribution is None):
            raise ValueError(f"{baseline.name} needs a segmenter and an attribution for credit")
        if baseline.loss.needs_reference and ref_policy is None:
            raise ValueError(f"baseline.loss.beta={baseline.loss.beta} > 0 needs a ref_policy")
        self.policy, self.reward, self.baseline = policy, reward, baseline
        self.sampling, self.num_generations = sampling, num_generations
        self.segmenter, self.attribution, self.ref_policy = segmenter, attribution, ref_policy
        self.format_check, self.invalid_reward = format_check, invalid_reward
        self.engine = engine if engine is not None else HFRollout()
        self.updates = 0  # optimizer steps taken through this object

    def __call__(
        self,
        prompts: Sequence[Sample],
        seed: int,
        optimizer,
        scheduler,
        backward: Callable[[Tensor], None] = backward,
        clip: Callable[[Any], None] | None = None,
    ) -> StepResult:
        G = self.num_generations
        samples = [s for s in prompts for _ in range(G)]  # N = B * G, prompt-major
        seconds: dict[str, float] = {}
        t_step = t0 = time.perf_counter()

        # 1. rollouts, by an engine brought up to date with the last update
        seconds["sync"] = self.engine.sync(self.policy, self.updates)
        t0 = time.perf_counter()
        ro = self.engine(self.policy, prompts, G, self.sampling, seed)
        seconds["generate"] = time.perf_counter() - t0

        # 2. reward
        t0 = time.perf_counter()
        ok = format_ok(ro.texts, ro.ended, self.format_check)  # (N,) bool
        rewards, metrics = score(self.reward, ro.texts, samples, ok, self.invalid_reward)
        seconds["reward"] = time.perf_counter() - t0

        # 3. credit (OSPO)
        credit, extra = Credit(), {}
        if self.baseline.needs_credit:
            credit = compute_credit(
                ro.texts,
                samples,
                self.segmenter,
                self.attribution,
                self.reward,
                self.baseline.keep_query,
                scored=ok if self.invalid_reward is not None else None,
            )
            extra = {
                "token_spans": ro.token_spans,
                "segmentations": credit.segmentations,
                "phis": credit.phis,
            }
        if self.baseline.needs_entropy:  # token entropies of the sampling policy (controls)
            t0 = time.perf_counter()
            extra["entropy"] = token_entropy(self.policy, ro, self.sampling, G)  # (N, T)
            credit.seconds += time.perf_counter() - t0
        seconds["credit"] = credit.seconds

        # 4. advantages
        t0 = time.perf_counter()
        adv, adv_stats = self.baseline.advantage(rewards, G, ro.completion_mask, **extra)
        adv = adv.to(ro.completion_mask.float())  # (N, T)
        seconds["advantage"] = time.perf_counter() - t0

        # 5. policy updates
        t0 = time.perf_counter()
        loss, loss_metrics = update(
            self.policy,
            ro,
            adv,
            self.baseline,
            optimizer,
            scheduler,
            sampling=self.sampling,
            group_size=G,
            ref_policy=self.ref_policy,
            backward=backward,
            clip=clip,
        )
        self.updates += self.baseline.mu
        seconds["update"] = time.perf_counter() - t0
        seconds["step"] = time.perf_counter() - t_step
        return StepResult(
            samples, ro, rewards, ok, metrics, credit, adv, adv_stats, loss, loss_metrics, seconds
        )
