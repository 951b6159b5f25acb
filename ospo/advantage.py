"""Advantage estimators: GRPO (sequence-level credit) and OSPO (segment-level credit).

Config group `baseline` (grpo, ospo). The maths follows docs/design.md section 2, which reads the
OSPO paper (Nath et al., arXiv 2601.08403) as potential-based redistribution: segment credits
act as a potential over prefixes, so moving a completion's advantage between its tokens while
keeping the mean leaves the optimal policy unchanged.

Pipeline for one batch (N = B * G completions, prompt-major: rows g*G .. g*G+G-1 form a group):

1. `group_advantages`: A_i = (r_i - mean_g r) / (std_g r + eps)             # (N,)
2. `token_credit`:      token t of completion i takes phi of its segment   # (T_i,)
3. `credit_weights`:    credits -> weights u_t >= 0 (prop | rank | hybrid | signed)
4. `redistribute`:      A_{i,t} = A_i * u_t / mean_t(u_t)                  # mean_t A_{i,t} = A_i
5. optional clipping of A_{i,t} to +-kappa * std_i(A_i)

`GRPO` stops after step 1 (every valid token gets A_i); `OSPO` runs all five steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
WEIGHTINGS = ("prop", "rank", "hybrid", "signed")

# Credits whose spread (max - min) is below this fraction of max(1, |credit|) count as uniform,
# so float noise in otherwise equal Owen values cannot turn into a 0/1 min-max weighting.
_UNIFORM_RTOL = 1e-6


def _check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(choices)}")


def _as_rewards(rewards) -> Tensor:
    """Rewards as a float32 CPU tensor of shape (N,); rejects NaN/inf."""
    if isinstance(rewards, Tensor):
        r = rewards.detach().cpu()
    else:
        r = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
    r = r.to(torch.float32).reshape(-1)  # (N,)
    if not torch.isfinite(r).all():
        raise ValueError(f"rewards must be finite, got {r.tolist()}")
    return r


# 1. Sequence advantages ---------------------------------------------------------------------


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages A_i (docs/design.md section 2.1).

    A_i = r_i - mean_g(r), then divided by `std_g(r) + eps` (scale="group"), by the std of all
    N rewards + eps (scale="batch"), or not at all (scale="none", Dr.GRPO). The std is the
    unbiased (sample, N-1) estimate, as `torch.std` in TRL's GRPO trainer; a std that is
    undefined (a single value) counts as 0. A group whose rewards are all equal gets exactly
    0, never NaN.

    rewards: (N,) array or tensor, prompt-major (rows g*G .. g*G+G-1 are one group).
    Returns a float32 CPU tensor (N,).
    """
    _check_choice("scale", scale, SCALES)
    r = _as_rewards(rewards)  # (N,)
    if group_size < 1 or r.numel() % group_size != 0:
        raise ValueError(
            f"group_size must be a positive divisor of the number of rewards {r.numel()}, "
            f"got {group_size}"
        )
    grouped = r.reshape(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    flat = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    centred = torch.where(flat, torch.zeros_like(centred), centred)  # exact zeros, no rounding
    if scale == "group":
        std = _std(grouped, dim=1)  # (B, 1)
        adv = centred / (std + eps)
    elif scale == "batch":
        adv = centred / (_std(r, dim=0) + eps)
    else:
        adv = centred
    return adv.reshape(-1)  # (N,)


def _std(x: Tensor, dim: int) -> Tensor:
    """Unbiased std along `dim` (keepdim); 0 where it is undefined (one element)."""
    if x.shape[dim] < 2:
        return torch.zeros_like(x.sum(dim=dim, keepdim=True))
    return x.std(dim=dim, keepdim=True)


def frac_zero_std(rewards, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (TRL: `frac_reward_zero_std`).

    Such groups carry no learning signal under GRPO (all their advantages are 0)."""
    r = _as_rewards(rewards)
    if group_size < 1 or r.numel() % group_size != 0:
        raise ValueError(
            f"group_size must be a positive divisor of the number of rewards {r.numel()}, "
            f"got {group_size}"
        )
    if r.numel() == 0:
        return 0.0
    grouped = r.reshape(-1, group_size)  # (B, G)
    flat = grouped.max(dim=1).values == grouped.min(dim=1).values  # (B,)
    return float(flat.float().mean())


# 2. Token credit ----------------------------------------------------------------------------


def token_credit(token_spans, seg_spans, phi) -> tuple[Tensor, Tensor]:
    """Map segment credits phi (n,) onto completion tokens (docs/design.md section 2.6).

    token_spans: T [start, end) character spans of the completion's tokens (tokenizer offsets).
    seg_spans:   n [start, end) character spans of the segments, in the same text.
    A token takes the credit of the segment it overlaps most (ties: the earlier segment).
    Zero-width tokens (EOS, span (x, x)) and tokens overlapping no segment are uncovered and
    get credit 0. Vectorised as one (T, n) overlap matrix.

    Returns credit (T,) float32 and covered (T,) bool.
    """
    tok = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)  # (T, 2)
    seg = np.asarray(seg_spans, dtype=np.int64).reshape(-1, 2)  # (n, 2)
    values = np.asarray(phi, dtype=np.float64).reshape(-1)  # (n,)
    if values.shape[0] != seg.shape[0]:
        raise ValueError(f"phi has {values.shape[0]} values but there are {seg.shape[0]} segments")
    num_tokens = tok.shape[0]
    if seg.shape[0] == 0 or num_tokens == 0:
        return torch.zeros(num_tokens, dtype=torch.float32), torch.zeros(
            num_tokens, dtype=torch.bool
        )
    overlap = np.minimum(tok[:, 1:2], seg[None, :, 1]) - np.maximum(tok[:, 0:1], seg[None, :, 0])
    overlap = np.clip(overlap, 0, None)  # (T, n) characters shared by token t and segment j
    best = overlap.argmax(axis=1)  # (T,) first segment with the largest overlap
    covered = overlap[np.arange(num_tokens), best] > 0  # (T,)
    credit = np.where(covered, values[best], 0.0)  # (T,)
    return torch.from_numpy(credit).to(torch.float32), torch.from_numpy(covered)


# 3. Weights ---------------------------------------------------------------------------------


def credit_weights(
    credit, covered, mode: str, alpha: float = 0.7, advantage: float = 1.0
) -> Tensor:
    """Turn token credits into weights u_t >= 0 (docs/design.md section 2.7).

    Over the covered tokens, with c the credit:
    * `prop`:   (c - min c) / (max c - min c). The lowest-credit segment gets weight 0 by
                design (its tokens then carry no advantage); `hybrid` keeps a floor.
    * `rank`:   rank of c among the distinct covered credit values (1 = lowest; ties share a
                rank) divided by the number of distinct values, so in (0, 1], top credit -> 1.
    * `hybrid`: alpha * prop + (1 - alpha); floor 1 - alpha.
    * `signed`: hybrid on -c when `advantage` < 0 (weights (max c - c) / (max c - min c), so
                blame goes to the segments that hurt), plain hybrid when `advantage` >= 0.
    Uniform credit (spread within a 1e-6 relative tolerance) gives all ones in every mode.
    Uncovered tokens, and covered tokens with a non-finite credit, get the neutral weight: the
    mean weight of the other covered tokens, so they keep A_i after `redistribute`. No covered
    token -> all ones.

    credit: (T,), covered: (T,) bool. Returns u (T,) float32.
    """
    _check_choice("weighting", mode, WEIGHTINGS)
    if mode in ("hybrid", "signed") and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] for weighting {mode!r}, got {alpha}")
    c_all = torch.as_tensor(credit).to(torch.float64).reshape(-1)  # (T,)
    cov = torch.as_tensor(covered).to(torch.bool).reshape(-1) & torch.isfinite(c_all)  # (T,)
    if cov.shape != c_all.shape:
        raise ValueError(f"credit has shape {tuple(c_all.shape)} but covered {tuple(cov.shape)}")
    u = torch.ones_like(c_all)  # (T,)
    if not cov.any():
        return u.to(torch.float32)
    c = c_all[cov]  # (T_cov,)
    if mode == "signed":
        c = -c if advantage < 0 else c
        mode = "hybrid"
    lo, hi = c.min(), c.max()
    if hi - lo <= _UNIFORM_RTOL * max(1.0, float(lo.abs()), float(hi.abs())):
        return u.to(torch.float32)
    if mode == "rank":
        distinct, inverse = torch.unique(c, sorted=True, return_inverse=True)
        w = (inverse + 1).to(torch.float64) / distinct.numel()
    else:
        w = (c - lo) / (hi - lo)
        if mode == "hybrid":
            w = alpha * w + (1.0 - alpha)
    u[cov] = w
    u[~cov] = w.mean()
    return u.to(torch.float32)


# 4. Redistribution --------------------------------------------------------------------------


def redistribute(advantage: float, u) -> Tensor:
    """A_{i,t} = A_i * u_t / mean_t(u_t) over one completion's valid tokens
    (docs/design.md section 2.7).

    The mean token advantage equals A_i (up to float rounding) and uniform u gives exactly
    A_i on every token (GRPO). If mean(u) is not positive or u is not finite, every token gets
    A_i. Computed in float64, returned float32 (T,)."""
    w = torch.as_tensor(u).to(torch.float64).reshape(-1)  # (T,)
    if w.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    m = w.mean()
    if not torch.isfinite(w).all() or not m > 0:
        return torch.full(w.shape, float(advantage), dtype=torch.float32)
    return (float(advantage) * (w / m)).to(torch.float32)


# 5. Estimators ------------------------------------------------------------------------------


def _reward_stats(r: Tensor, adv: Tensor, group_size: int) -> dict[str, float]:
    return {
        "frac_reward_zero_std": frac_zero_std(r, group_size),
        "reward_mean": float(r.mean()) if r.numel() else 0.0,
        "reward_std": float(_std(r, dim=0).reshape(())) if r.numel() else 0.0,
        "adv_abs_mean": float(adv.abs().mean()) if adv.numel() else 0.0,
        "adv_std": float(_std(adv, dim=0).reshape(())) if adv.numel() else 0.0,
    }


class GRPO:
    """Sequence-level credit: every valid token of completion i gets A_i
    (docs/design.md section 2.1).

    Returns the (N, T) advantages and their stats: frac_reward_zero_std, reward_mean,
    reward_std, adv_abs_mean and adv_std (python floats). Needs no segment credit."""

    needs_credit = False

    def __init__(self, scale: str = "group", eps: float = 1e-4):
        _check_choice("scale", scale, SCALES)
        self.scale = scale
        self.eps = eps

    def __call__(
        self, rewards, group_size: int, completion_mask: Tensor, **_
    ) -> tuple[Tensor, dict[str, float]]:
        r = _as_rewards(rewards)  # (N,)
        mask = torch.as_tensor(completion_mask)
        _check_mask(mask, r.numel())
        adv = group_advantages(r, group_size, self.scale, self.eps)  # (N,)
        out = adv[:, None] * (mask.cpu() != 0).to(torch.float32)  # (N, T), 0 on padding
        return out.to(mask.device), _reward_stats(r, adv, group_size)


class OSPO:
    """Segment-level credit by potential-based redistribution (docs/design.md sections 2.6-2.8).

    Per completion: GRPO's A_i, then token_credit -> credit_weights -> redistribute over the
    valid tokens, so the mean token advantage stays A_i. A completion falls back to GRPO's
    uniform A_i when its reward is 0, it has no segments, or its phi is missing, all zero or
    not finite. With `clip_kappa`, token advantages are clipped (after redistribution, on every
    row) to +-clip_kappa * std of the batch's A_i (unbiased std; skipped when it is undefined);
    clipping may break the exact mean. Returns the (N, T) advantages and GRPO's stats plus
    frac_fallback and frac_clipped. Needs the segment credit of every completion.
    """

    needs_credit = True

    def __init__(
        self,
        scale: str = "group",
        eps: float = 1e-4,
        weighting: str = "hybrid",
        alpha: float = 0.7,
        clip_kappa: float | None = None,
    ):
        _check_choice("scale", scale, SCALES)
        _check_choice("weighting", weighting, WEIGHTINGS)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if clip_kappa is not None and not clip_kappa > 0:
            raise ValueError(f"clip_kappa must be positive or None, got {clip_kappa}")
        self.scale = scale
        self.eps = eps
        self.weighting = weighting
        self.alpha = alpha
        self.clip_kappa = clip_kappa

    def __call__(
        self,
        rewards,
        group_size: int,
        completion_mask: Tensor,
        token_spans: Sequence[Sequence[tuple[int, int]]],
        segmentations: Sequence,
        phis: Sequence,
        **_,
    ) -> tuple[Tensor, dict[str, float]]:
        r = _as_rewards(rewards)  # (N,)
        mask = torch.as_tensor(completion_mask)
        n_rows = r.numel()
        _check_mask(mask, n_rows)
        for name, items in (
            ("token_spans", token_spans),
            ("segmentations", segmentations),
            ("phis", phis),
        ):
            if len(items) != n_rows:
                raise ValueError(
                    f"{name} has {len(items)} entries, expected one per reward ({n_rows})"
                )
        adv = group_advantages(r, group_size, self.scale, self.eps)  # (N,)
        valid = mask.cpu() != 0  # (N, T)
        out = torch.zeros(valid.shape, dtype=torch.float32)  # (N, T)
        fallbacks = 0
        for i in range(n_rows):
            pos = valid[i].nonzero().squeeze(1)  # (T_i,) valid positions
            if len(token_spans[i]) != pos.numel():
                raise ValueError(
                    f"completion {i}: {len(token_spans[i])} token spans but "
                    f"{pos.numel()} valid tokens in completion_mask"
                )
            seg = segmentations[i]
            seg_spans = [] if seg is None else list(seg.spans)
            phi = None if phis[i] is None else np.asarray(phis[i], dtype=np.float64).reshape(-1)
            if phi is not None and phi.size != len(seg_spans):
                raise ValueError(
                    f"completion {i}: phi has {phi.size} values but {len(seg_spans)} segments"
                )
            a = float(adv[i])
            if (
                r[i] == 0
                or not seg_spans
                or phi is None
                or not np.isfinite(phi).all()
                or not np.any(phi)
            ):
                out[i, pos] = a
                fallbacks += 1
                continue
            credit, covered = token_credit(token_spans[i], seg_spans, phi)  # (T_i,), (T_i,)
            u = credit_weights(credit, covered, self.weighting, self.alpha, a)  # (T_i,)
            out[i, pos] = redistribute(a, u)
        frac_clipped = 0.0
        if self.clip_kappa is not None and n_rows > 1:
            bound = self.clip_kappa * float(adv.std())
            clipped = valid & (out.abs() > bound)
            frac_clipped = float(clipped.sum()) / max(int(valid.sum()), 1)
            out = out.clamp(-bound, bound)
        stats = _reward_stats(r, adv, group_size)
        stats["frac_fallback"] = fallbacks / max(n_rows, 1)
        stats["frac_clipped"] = frac_clipped
        return out.to(mask.device), stats


def _check_mask(mask: Tensor, n_rows: int) -> None:
    if mask.dim() != 2 or mask.shape[0] != n_rows:
        raise ValueError(
            f"completion_mask must have shape (N={n_rows}, T), got {tuple(mask.shape)}"
        )
