"""An advantage estimator of your own, trained with by a config override (README: "Your own
token credit"):

    python train.py baseline=grpo label=position \\
        baseline.advantage._target_=examples.position_credit.PositionCredit \\
        +baseline.advantage.gamma=0.8

`PositionCredit` gives the earlier tokens of a completion more of its advantage, on the idea
that the first words a query expansion commits to condition the rest:

    A_{i,t} = A_i * gamma^t / mean_t'(gamma^t')      over completion i's valid tokens t

so each completion keeps its mean token advantage A_i (which completion is better is GRPO's
call, the estimator only moves advantage between its tokens), and gamma = 1 is GRPO exactly.

The contract (`ospo.interfaces.AdvantageEstimator`, docs/design.md section 2.10):
* class attributes `needs_credit` and `needs_entropy` say what the step computes for it: with
  `needs_credit = True` it is also called with `token_spans` (N lists of (start, end)
  character spans of the valid tokens), `segmentations` (N `ospo.segmenter.Segmentation`)
  and `phis` (N arrays (n_i,) of segment credit, None where a completion got none); with
  `needs_entropy = True`, with `entropy` (N, T), the policy's token entropy;
* `__call__(rewards (N,), group_size G, completion_mask (N, T), **extra)` returns the token
  advantages (N, T) float, zero on padding, on the mask's device, and a dict of floats with at
  least `ospo.advantage.reward_stats`'s keys and `cos_to_grpo`.
Rows are prompt-major: rows g*G .. g*G+G-1 answer request g.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ospo.advantage import cos_to_grpo, group_advantages, redistribute, reward_stats


class PositionCredit:
    """Token credit decaying with the position in the completion (gamma^t)."""

    needs_credit = False
    needs_entropy = False

    def __init__(self, scale: str = "group", eps: float = 1e-4, gamma: float = 0.8):
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        self.scale, self.eps, self.gamma = scale, eps, gamma

    def __call__(
        self, rewards, group_size: int, completion_mask: Tensor, **_
    ) -> tuple[Tensor, dict[str, float]]:
        r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)  # (N,)
        adv = group_advantages(r, group_size, self.scale, self.eps)  # (N,)
        valid = completion_mask.cpu() != 0  # (N, T)
        out = torch.zeros(valid.shape, dtype=torch.float32)  # (N, T)
        for i in range(len(adv)):
            t = torch.arange(int(valid[i].sum()), dtype=torch.float64)  # (T_i,)
            out[i, valid[i]] = redistribute(float(adv[i]), self.gamma**t)  # mean A_i
        stats = reward_stats(r, adv, group_size)
        stats["cos_to_grpo"] = cos_to_grpo(out, adv, valid)
        return out.to(completion_mask.device), stats
