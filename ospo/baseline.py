"""The training method (config group `baseline`): GRPO, OSPO or a control, whole.

A `Baseline` bundles what differs between methods: the advantage estimator
(`ospo.advantage.GRPO`, `OSPO`, `RandomCredit` or `EntropyCredit`), the loss settings
(`ospo.loss.PolicyLoss`), the number of updates per batch of rollouts (`mu`) and how an empty
coalition is scored (`keep_query`).
Whether the step computes segment credit (`needs_credit`) or the policy's token entropy
(`needs_entropy`) is read from the estimator, so a config cannot ask OSPO to run without
credit, or EntropyCredit without entropy.
"""

from __future__ import annotations

from ospo.interfaces import AdvantageEstimator
from ospo.loss import PolicyLoss


class Baseline:
    """Advantage estimator + loss + update schedule of one method (docs/design.md section 2)."""

    def __init__(
        self,
        name: str,
        advantage: AdvantageEstimator,
        loss: PolicyLoss,
        mu: int = 1,
        keep_query: bool = False,
    ):
        if int(mu) < 1:
            raise ValueError(f"baseline.mu={mu}: expected at least 1 update per batch")
        self.name = str(name)
        self.advantage = advantage
        self.loss = loss
        self.mu = int(mu)
        self.keep_query = bool(keep_query)  # v(empty) = reward of the request (true) or of ""

    @property
    def needs_credit(self) -> bool:
        """Segment credit (segmenter + attribution) is computed every step for OSPO."""
        return bool(self.advantage.needs_credit)

    @property
    def needs_entropy(self) -> bool:
        """The policy's token entropy of the rollouts is computed every step (EntropyCredit)."""
        return bool(self.advantage.needs_entropy)

    def __repr__(self) -> str:
        return (
            f"Baseline({self.name!r}, advantage={type(self.advantage).__name__}, "
            f"mu={self.mu}, keep_query={self.keep_query}, beta={self.loss.beta})"
        )
