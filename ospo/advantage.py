"""Advantage estimators: GRPO (sequence-level credit), OSPO (segment-level credit) and two
controls, RandomCredit (OSPO on shuffled credit) and EntropyCredit (GTPO-style entropy credit).

Config group `baseline` (grpo, ospo, random_credit, entropy). The maths follows docs/design.md
section 2, which reads the OSPO paper (Nath et al., arXiv 2601.08403) as potential-based
redistribution: segment credits act as a potential over prefixes, so moving a completion's
advantage between its tokens while keeping the mean leaves the optimal policy unchanged.

Pipeline for one batch (N = B * G completions, prompt-major: rows g*G .. g*G+G-1 form a group):

1. `group_advantages`: A_i = (r_i - mean_g r) / (std_g r + eps)             # (N,)
2. `token_segments`:    token t of completion i takes phi of its segment   # (T_i,)
   `token_mass`:        m_t = 1 per token, or each segment's mass spread over its tokens
3. continuous weightings (`shift_advantages`, the default `relative`):
                        A_{i,t} = A_i + lambda * g_i * m_t (c_t - cbar) / s
                        g_i = |A_i| (relative) or 1 (additive), s a fixed credit scale
   min-max weightings (`credit_weights`: prop | rank | hybrid | signed), then
   `redistribute`:      A_{i,t} = A_i * u_t / mean_t(u_t)
   either way mean_t A_{i,t} = A_i
4. optional clipping of A_{i,t} to +-kappa * std_i(A_i)

`GRPO` stops after step 1 (every valid token gets A_i); `OSPO` runs all four steps.
`RandomCredit` runs OSPO's four steps on each completion's phi shuffled among its segments;
`EntropyCredit` replaces steps 2-3 by the policy's token entropy (`entropy_weights`).
Every estimator logs `cos_to_grpo`, the cosine between its token advantages and GRPO's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
MIN_MAX_WEIGHTINGS = ("prop", "rank", "hybrid", "signed")
SHIFT_WEIGHTINGS = ("relative", "additive")
WEIGHTINGS = SHIFT_WEIGHTINGS + MIN_MAX_WEIGHTINGS
MASSES = ("token", "segment")
NEGATIVES = ("entropy", "inverse")

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


def token_segments(token_spans, seg_spans) -> tuple[np.ndarray, np.ndarray]:
    """The segment each completion token belongs to (docs/design.md section 2.6).

    token_spans: T [start, end) character spans of the completion's tokens (tokenizer offsets).
    seg_spans:   n [start, end) character spans of the segments, in the same text.
    A token belongs to the segment it overlaps most (ties: the earlier segment). Zero-width
    tokens (EOS, span (x, x)) and tokens overlapping no segment are uncovered. Vectorised as one
    (T, n) overlap matrix.

    Returns segment index (T,) int64 (0 where uncovered) and covered (T,) bool.
    """
    tok = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)  # (T, 2)
    seg = np.asarray(seg_spans, dtype=np.int64).reshape(-1, 2)  # (n, 2)
    num_tokens = tok.shape[0]
    if seg.shape[0] == 0 or num_tokens == 0:
        return np.zeros(num_tokens, dtype=np.int64), np.zeros(num_tokens, dtype=bool)
    overlap = np.minimum(tok[:, 1:2], seg[None, :, 1]) - np.maximum(tok[:, 0:1], seg[None, :, 0])
    overlap = np.clip(overlap, 0, None)  # (T, n) characters shared by token t and segment j
    best = overlap.argmax(axis=1)  # (T,) first segment with the largest overlap
    covered = overlap[np.arange(num_tokens), best] > 0  # (T,)
    return np.where(covered, best, 0), covered


def token_credit(token_spans, seg_spans, phi) -> tuple[Tensor, Tensor]:
    """Map segment credits phi (n,) onto completion tokens: a token takes the credit of its
    segment (`token_segments`); uncovered tokens get credit 0.

    Returns credit (T,) float32 and covered (T,) bool.
    """
    values = np.asarray(phi, dtype=np.float64).reshape(-1)  # (n,)
    n = np.asarray(seg_spans, dtype=np.int64).reshape(-1, 2).shape[0]
    if values.shape[0] != n:
        raise ValueError(f"phi has {values.shape[0]} values but there are {n} segments")
    best, covered = token_segments(token_spans, seg_spans)  # (T,), (T,)
    credit = np.where(covered, values[best] if n else 0.0, 0.0)  # (T,)
    return torch.from_numpy(credit).to(torch.float32), torch.from_numpy(covered)


def token_mass(segment, covered, mode: str = "token") -> Tensor:
    """How much of a segment's credit each of its tokens carries, m_t (mean 1 over covered
    tokens, 0 on uncovered ones).

    * `token`:   m_t = 1: a segment of k tokens moves k times a one-token segment's advantage.
    * `segment`: m_t = (T_cov / n_cov) / k_j for token t of segment j (k_j its tokens, n_cov the
                 segments with a covered token): every segment, whatever its token count,
                 carries the same total mass, so the segment (a word, under the default
                 segmenter) is the unit of credit. The continuous weightings scale their
                 credit-driven shift by m_t (a segment's tokens together move as much as a
                 one-token segment of the same credit); the min-max ones scale the weight
                 u_t (a segment's tokens together carry one token's share of A_i).

    segment, covered: (T,) from `token_segments`. Returns m (T,) float64.
    """
    _check_choice("mass", mode, MASSES)
    seg = torch.as_tensor(np.asarray(segment, dtype=np.int64)).reshape(-1)  # (T,)
    cov = torch.as_tensor(np.asarray(covered, dtype=bool)).reshape(-1)  # (T,)
    m = cov.to(torch.float64)  # (T,)
    if mode == "token" or not cov.any():
        return m
    counts = torch.bincount(seg[cov])  # (n,) covered tokens per segment
    used = int((counts > 0).sum())
    m[cov] = (int(cov.sum()) / used) / counts[seg[cov]].to(torch.float64)
    return m


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
    _check_choice("weighting", mode, MIN_MAX_WEIGHTINGS)
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


def shift_advantages(
    advantage: float,
    credit,
    covered,
    mode: str = "relative",
    strength: float = 8.0,
    credit_scale: float = 1.0,
    mass=None,
) -> Tensor:
    """Token advantages that move continuously with the credit (docs/design.md section 2.7):

        A_{i,t} = A_i + strength * g_i * m_t * (c_t - cbar) / credit_scale
        cbar    = sum_t m_t c_t / sum_t m_t  (covered tokens), so mean_t A_{i,t} = A_i

    * `relative`: g_i = |A_i|: every token of a completion is pushed the way A_i says, more on
      the segments with high credit; a bad completion's blame falls most on its low-credit
      segments (and a segment far above the mean can turn positive). A zero A_i gives zeros.
    * `additive`: g_i = 1, potential-style shaping in A_i's units per unit of credit; even a
      completion with A_i = 0 (a flat group) moves credit between its tokens.

    `credit_scale` s is fixed (the reward's scale, 1.0 for NDCG or recall), never the
    completion's own credit spread, so a credit change of delta moves a token's advantage by
    at most strength * g_i * max(m) * delta / s: continuous, and uniform credit gives exactly
    A_i on every token. Uncovered tokens (m_t = 0, or a non-finite credit) keep A_i.

    credit, covered: (T,); mass: (T,) m_t (`token_mass`; None: 1 per covered token).
    Returns (T,) float32, computed in float64.
    """
    _check_choice("weighting", mode, SHIFT_WEIGHTINGS)
    if not credit_scale > 0:
        raise ValueError(f"credit_scale must be positive, got {credit_scale}")
    c = torch.as_tensor(credit).to(torch.float64).reshape(-1)  # (T,)
    cov = torch.as_tensor(covered).to(torch.bool).reshape(-1) & torch.isfinite(c)  # (T,)
    if cov.shape != c.shape:
        raise ValueError(f"credit has shape {tuple(c.shape)} but covered {tuple(cov.shape)}")
    m = cov.to(torch.float64) if mass is None else torch.as_tensor(mass).to(torch.float64)
    m = torch.where(cov, m.reshape(-1), torch.zeros_like(c))  # (T,)
    out = torch.full(c.shape, float(advantage), dtype=torch.float64)  # (T,)
    if not m.sum() > 0:
        return out.to(torch.float32)
    c = torch.where(cov, c, torch.zeros_like(c))
    cbar = (m * c).sum() / m.sum()
    gain = abs(float(advantage)) if mode == "relative" else 1.0
    out += strength * gain * m * (c - cbar) / credit_scale
    return out.to(torch.float32)


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


def entropy_weights(
    entropy, advantage: float = 1.0, negative: str = "entropy", inverse_eps: float = 0.1
) -> Tensor:
    """Token weights from the policy's per-token entropy H_t (GTPO-style, docs/design.md 2.9).

    * A_i >= 0, or `negative="entropy"`:   u_t = H_t
    * A_i < 0 and `negative="inverse"`:     u_t = 1 / (H_t + inverse_eps)     (GTPO)
    `redistribute` then normalises u to mean 1. H_t is clamped at 0 (float rounding can give
    tiny negatives). All ones when H is all zero, not finite anywhere, or uniform (spread within
    a 1e-6 relative tolerance), so such a completion keeps GRPO's A_i exactly.

    entropy: (T,) entropy of completion i's valid tokens. Returns u (T,) float32.
    """
    _check_choice("negative", negative, NEGATIVES)
    if not inverse_eps > 0:
        raise ValueError(f"inverse_eps must be positive, got {inverse_eps}")
    h = torch.as_tensor(entropy).detach().cpu().to(torch.float64).reshape(-1)  # (T,)
    u = torch.ones_like(h)  # (T,)
    if h.numel() == 0 or not torch.isfinite(h).all():
        return u.to(torch.float32)
    h = h.clamp(min=0.0)
    lo, hi = h.min(), h.max()
    if hi <= 0 or hi - lo <= _UNIFORM_RTOL * max(1.0, float(hi)):
        return u.to(torch.float32)
    if advantage < 0 and negative == "inverse":
        return (1.0 / (h + inverse_eps)).to(torch.float32)
    return h.to(torch.float32)


# 5. Diagnostics -----------------------------------------------------------------------------


def cos_to_grpo(advantages, grpo_advantages, mask) -> float:
    """Cosine similarity between token advantages and GRPO's uniform ones, over valid tokens.

        cos = sum_{(i,t) valid} A_{i,t} * A_i
              / (sqrt(sum_{(i,t) valid} A_{i,t}^2) * sqrt(sum_{(i,t) valid} A_i^2))

    over the valid tokens of the whole batch (padding is ignored). `grpo_advantages` is either
    the sequence advantages A_i (N,), broadcast to every valid token, or GRPO's (N, T) output.
    1.0 means the estimator moved no advantage between tokens (up to a positive scale); lower
    values measure how far the redistribution turned the update away from GRPO's.
    Degenerate cases: identical vectors give exactly 1.0 (so also both all zero, e.g. a batch
    whose groups all have equal rewards); otherwise a zero vector gives 0.0. Computed in
    float64, clamped to [-1, 1].

    advantages: (N, T); grpo_advantages: (N,) or (N, T); mask: (N, T), nonzero = valid.
    """
    valid = torch.as_tensor(mask).detach().cpu() != 0  # (N, T)
    a = torch.as_tensor(advantages).detach().cpu().to(torch.float64)  # (N, T)
    g = torch.as_tensor(grpo_advantages).detach().cpu().to(torch.float64)
    if g.dim() == 1 and g.shape[0] == valid.shape[0]:
        g = g[:, None].expand(valid.shape)  # (N, T)
    if a.shape != valid.shape or g.shape != valid.shape:
        raise ValueError(
            f"advantages {tuple(a.shape)} and grpo_advantages {tuple(g.shape)} must match "
            f"the mask's shape {tuple(valid.shape)} (grpo_advantages may also be (N,))"
        )
    x, y = a[valid], g[valid]  # (V,) valid tokens only
    if torch.equal(x, y):
        return 1.0
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float((x @ y / (nx * ny)).clamp(-1.0, 1.0))


# 6. Estimators ------------------------------------------------------------------------------


def reward_stats(r: Tensor, adv: Tensor, group_size: int) -> dict[str, float]:
    """The stats every estimator returns and `RLModule` logs: frac_reward_zero_std,
    reward_mean, reward_std (unbiased), adv_abs_mean and adv_std of the sequence advantages.
    r, adv: (N,)."""
    return {
        "frac_reward_zero_std": frac_zero_std(r, group_size),
        "reward_mean": float(r.mean()) if r.numel() else 0.0,
        "reward_std": float(_std(r, dim=0).reshape(())) if r.numel() else 0.0,
        "adv_abs_mean": float(adv.abs().mean()) if adv.numel() else 0.0,
        "adv_std": float(_std(adv, dim=0).reshape(())) if adv.numel() else 0.0,
    }


def _clip(out: Tensor, valid: Tensor, adv: Tensor, kappa: float | None) -> tuple[Tensor, float]:
    """Clamp token advantages (N, T) to +-kappa * std(A_i) (unbiased; skipped when N = 1 or
    kappa is None). Returns the clipped advantages and the fraction of valid tokens clipped."""
    if kappa is None or adv.numel() < 2:
        return out, 0.0
    bound = kappa * float(adv.std())
    clipped = valid & (out.abs() > bound)  # (N, T)
    frac = float(clipped.sum()) / max(int(valid.sum()), 1)
    return out.clamp(-bound, bound), frac


def _clip_and_stats(
    out: Tensor, valid: Tensor, r: Tensor, adv: Tensor, group_size: int, fallbacks: int, kappa
) -> tuple[Tensor, dict[str, float]]:
    """The shared tail of the redistributing estimators (OSPO, its controls): the optional
    clip, then GRPO's stats plus frac_fallback, frac_clipped and cos_to_grpo (after clipping).
    out, valid: (N, T); r, adv: (N,)."""
    out, frac_clipped = _clip(out, valid, adv, kappa)
    stats = reward_stats(r, adv, group_size)
    stats["frac_fallback"] = fallbacks / max(r.numel(), 1)
    stats["frac_clipped"] = frac_clipped
    stats["cos_to_grpo"] = cos_to_grpo(out, adv, valid)
    return out, stats


def _check_kappa(clip_kappa: float | None) -> None:
    if clip_kappa is not None and not clip_kappa > 0:
        raise ValueError(f"clip_kappa must be positive or None, got {clip_kappa}")


class GRPO:
    """Sequence-level credit: every valid token of completion i gets A_i
    (docs/design.md section 2.1).

    Returns the (N, T) advantages and their stats: frac_reward_zero_std, reward_mean,
    reward_std, adv_abs_mean, adv_std and cos_to_grpo (1.0 by definition) as python floats.
    Needs no segment credit and no entropy."""

    needs_credit = False
    needs_entropy = False

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
        stats = reward_stats(r, adv, group_size)
        stats["cos_to_grpo"] = cos_to_grpo(out, adv, mask)
        return out.to(mask.device), stats


class _PerCompletion:
    """The skeleton every token-credit estimator shares (OSPO, its controls, EntropyCredit):
    GRPO's A_i per group, then each completion's valid tokens from `_row` (None: the
    completion falls back to A_i on every token, counted in `frac_fallback`), then the optional
    clip and the stats. Subclasses check their extra inputs in `_inputs`."""

    needs_credit = False
    needs_entropy = False
    scale: str
    eps: float
    clip_kappa: float | None

    def __call__(
        self, rewards, group_size: int, completion_mask: Tensor, **extra
    ) -> tuple[Tensor, dict[str, float]]:
        r = _as_rewards(rewards)  # (N,)
        mask = torch.as_tensor(completion_mask)
        _check_mask(mask, r.numel())
        inputs = self._inputs(r.numel(), mask, **extra)
        adv = group_advantages(r, group_size, self.scale, self.eps)  # (N,)
        valid = mask.cpu() != 0  # (N, T)
        out = torch.zeros(valid.shape, dtype=torch.float32)  # (N, T)
        fallbacks = 0
        for i in range(r.numel()):
            a = float(adv[i])
            row = self._row(i, a, valid[i], inputs)  # (T_i,) or None
            if row is None:
                out[i, valid[i]] = a
                fallbacks += 1
            else:
                out[i, valid[i]] = row
        out, stats = _clip_and_stats(out, valid, r, adv, group_size, fallbacks, self.clip_kappa)
        return out.to(mask.device), stats

    def _inputs(self, n_rows: int, mask: Tensor, **extra) -> Any:
        raise NotImplementedError

    def _row(self, i: int, a: float, valid: Tensor, inputs: Any) -> Tensor | None:
        raise NotImplementedError


class OSPO(_PerCompletion):
    """Segment-level credit by potential-based redistribution (docs/design.md sections 2.6-2.8).

    Per completion: GRPO's A_i, then token_credit and token_mass, then either
    `shift_advantages` (weighting `relative` or `additive`, continuous in the credit) or
    credit_weights -> redistribute (the min-max weightings `prop`, `rank`, `hybrid`,
    `signed`), over the valid tokens, so the mean token advantage stays A_i. A completion
    falls back to GRPO's uniform A_i when it has no segments, or its phi is missing (no credit
    was computed, e.g. a gated completion), all zero or not finite. With `clip_kappa`, token advantages are clipped (after redistribution, on every
    row) to +-clip_kappa * std of the batch's A_i (unbiased std; skipped when it is undefined);
    clipping may break the exact mean. Returns the (N, T) advantages and GRPO's stats
    (cos_to_grpo after clipping) plus frac_fallback and frac_clipped. Needs the segment credit
    of every completion, no entropy.

    `transform_phis` is the hook through which subclasses change the credit before it is used
    (identity here; `RandomCredit` shuffles it).
    """

    needs_credit = True
    needs_entropy = False

    def __init__(
        self,
        scale: str = "group",
        eps: float = 1e-4,
        weighting: str = "relative",
        alpha: float = 0.7,
        clip_kappa: float | None = None,
        strength: float = 8.0,
        credit_scale: float = 1.0,
        mass: str = "token",
    ):
        _check_choice("scale", scale, SCALES)
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("mass", mass, MASSES)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if not strength >= 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        if not credit_scale > 0:
            raise ValueError(f"credit_scale must be positive, got {credit_scale}")
        _check_kappa(clip_kappa)
        self.scale = scale
        self.eps = eps
        self.weighting = weighting
        self.alpha = alpha
        self.clip_kappa = clip_kappa
        self.strength = strength
        self.credit_scale = credit_scale
        self.mass = mass

    def __call__(
        self,
        rewards,
        group_size: int,
        completion_mask: Tensor,
        token_spans: Sequence[Sequence[tuple[int, int]]],
        segmentations: Sequence,
        phis: Sequence,
        **extra,
    ) -> tuple[Tensor, dict[str, float]]:
        """Token advantages (N, T) and stats; the credit may also be passed by position."""
        credit = {"token_spans": token_spans, "segmentations": segmentations, "phis": phis}
        return super().__call__(rewards, group_size, completion_mask, **credit, **extra)

    def _inputs(
        self,
        n_rows: int,
        mask: Tensor,
        token_spans: Sequence[Sequence[tuple[int, int]]] = (),
        segmentations: Sequence = (),
        phis: Sequence = (),
        **_,
    ) -> tuple[Sequence, Sequence, Sequence]:
        """token_spans, segmentations and phis (after `transform_phis`), one per completion."""
        for name, items in (
            ("token_spans", token_spans),
            ("segmentations", segmentations),
            ("phis", phis),
        ):
            if len(items) != n_rows:
                raise ValueError(
                    f"{name} has {len(items)} entries, expected one per reward ({n_rows})"
                )
        return token_spans, segmentations, self.transform_phis(phis)

    def _row(self, i: int, a: float, valid: Tensor, inputs) -> Tensor | None:
        token_spans, segmentations, phis = inputs
        if len(token_spans[i]) != int(valid.sum()):
            raise ValueError(
                f"completion {i}: {len(token_spans[i])} token spans but "
                f"{int(valid.sum())} valid tokens in completion_mask"
            )
        seg = segmentations[i]
        seg_spans = [] if seg is None else list(seg.spans)
        phi = None if phis[i] is None else np.asarray(phis[i], dtype=np.float64).reshape(-1)
        if phi is not None and phi.size != len(seg_spans):
            raise ValueError(
                f"completion {i}: phi has {phi.size} values but {len(seg_spans)} segments"
            )
        if not seg_spans or phi is None or not np.isfinite(phi).all() or not np.any(phi):
            return None
        return self.token_advantages(a, token_spans[i], seg_spans, phi)

    def token_advantages(self, a: float, token_spans, seg_spans, phi: np.ndarray) -> Tensor:
        """A_{i,t} of one completion's valid tokens from its A_i and segment credit.  # (T_i,)"""
        segment, covered = token_segments(token_spans, seg_spans)  # (T_i,), (T_i,)
        credit = np.where(covered, phi[segment], 0.0)  # (T_i,)
        mass = token_mass(segment, covered, self.mass)  # (T_i,)
        if self.weighting in SHIFT_WEIGHTINGS:
            return shift_advantages(
                a, credit, covered, self.weighting, self.strength, self.credit_scale, mass
            )
        u = credit_weights(credit, covered, self.weighting, self.alpha, a).to(torch.float64)
        if self.mass != "token":  # a segment's weight spread over its tokens
            cov = torch.from_numpy(covered)
            u[cov] = u[cov] * mass[cov]
            u[~cov] = u[cov].mean()
        return redistribute(a, u)

    def transform_phis(self, phis: Sequence) -> Sequence:
        """The segment credits the redistribution uses, one entry (n_i,) or None per completion.
        OSPO uses them as they are."""
        return phis


class RandomCredit(OSPO):
    """Control: OSPO's redistribution on credit shuffled among each completion's segments.

    phi'_i = phi_i[pi_i],  pi_i a uniform random permutation of completion i's n_i segments,

    then exactly OSPO (same weighting, alpha, clip, fall-backs). The weights u_t keep OSPO's
    values per segment, only their assignment to segments is random: whatever OSPO gains over
    this control is due to *which* segments get the credit, not to the spread of the token
    advantages. The Generator `self.rng` is seeded once at construction and advances per call
    (one permutation per completion with a phi, in row order), like `ospo.attribution`'s
    (save `rng.bit_generator.state` to resume). Needs the segment credit (`needs_credit`).
    """

    def __init__(
        self,
        scale: str = "group",
        eps: float = 1e-4,
        weighting: str = "relative",
        alpha: float = 0.7,
        clip_kappa: float | None = None,
        strength: float = 8.0,
        credit_scale: float = 1.0,
        mass: str = "token",
        seed: int = 0,
    ):
        super().__init__(scale, eps, weighting, alpha, clip_kappa, strength, credit_scale, mass)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def transform_phis(self, phis: Sequence) -> list:
        """Each phi (n_i,) permuted by `self.rng.permutation(n_i)`; None stays None."""
        out = []
        for phi in phis:
            if phi is None:
                out.append(None)
                continue
            values = np.asarray(phi, dtype=np.float64).reshape(-1)  # (n_i,)
            out.append(values[self.rng.permutation(values.size)])
        return out


class EntropyCredit(_PerCompletion):
    """Control: token credit from the policy's entropy, GTPO-style (docs/design.md 2.9).

    Per completion, over its valid tokens, with H_t the policy's entropy at token t:

        u_t = H_t                                  (A_i >= 0; A_i < 0 with negative="entropy")
        u_t = 1 / (H_t + inverse_eps)              (A_i < 0 with negative="inverse", GTPO)
        A_{i,t} = A_i * u_t / mean_t(u_t)          (`redistribute`: mean_t A_{i,t} = A_i)

    then the same optional clip as OSPO. A completion whose entropy is all zero, uniform or
    not finite keeps GRPO's uniform A_i (`frac_fallback`); uniform entropy gives GRPO exactly.

    Negative advantages: `negative="entropy"` (default) weighs both signs by H_t, so the update
    of every completion concentrates on its high-entropy ("forking") tokens, as in the
    high-entropy-minority results of Wang et al. 2025 (arXiv 2506.01939). It is the default
    because its weights are bounded by log(vocabulary size), while 1 / H_t grows without
    bound as H_t -> 0 and would
    put most of a negative completion's blame on near-deterministic tokens (closing tags, EOS),
    whose log-prob gradient is near 0 anyway, making the result hinge on `inverse_eps`.
    `negative="inverse"` is GTPO's choice (Tan et al. 2025, arXiv 2508.04349): a failed
    completion's blame goes to its confident tokens, sparing the exploratory ones; its
    `inverse_eps` (nats) bounds the weight ratio at (max H + inverse_eps) / inverse_eps.

    Called with `entropy` (N, T), the policy's per-token entropy of the rollouts, computed by
    the step without gradient (`needs_entropy`); needs no segment credit. Stats: as OSPO's.
    """

    needs_credit = False
    needs_entropy = True

    def __init__(
        self,
        scale: str = "group",
        eps: float = 1e-4,
        negative: str = "entropy",
        inverse_eps: float = 0.1,
        clip_kappa: float | None = None,
    ):
        _check_choice("scale", scale, SCALES)
        _check_choice("negative", negative, NEGATIVES)
        if not inverse_eps > 0:
            raise ValueError(f"inverse_eps must be positive, got {inverse_eps}")
        _check_kappa(clip_kappa)
        self.scale = scale
        self.eps = eps
        self.negative = negative
        self.inverse_eps = inverse_eps
        self.clip_kappa = clip_kappa

    def _inputs(self, n_rows: int, mask: Tensor, entropy: Tensor | None = None, **_) -> Tensor:
        """The entropy (N, T) in float64 on the CPU."""
        if entropy is None:
            raise ValueError(
                "EntropyCredit needs entropy=<(N, T) per-token policy entropy of the rollouts> "
                "(the step passes it when baseline.needs_entropy), got none"
            )
        h = torch.as_tensor(entropy).detach().cpu().to(torch.float64)  # (N, T)
        if h.shape != mask.shape:
            raise ValueError(
                f"entropy has shape {tuple(h.shape)}, expected the completion_mask's "
                f"{tuple(mask.shape)}"
            )
        return h

    def _row(self, i: int, a: float, valid: Tensor, h: Tensor) -> Tensor | None:
        u = entropy_weights(h[i][valid], a, self.negative, self.inverse_eps)  # (T_i,)
        return None if bool((u == 1).all()) else redistribute(a, u)


def _check_mask(mask: Tensor, n_rows: int) -> None:
    if mask.dim() != 2 or mask.shape[0] != n_rows:
        raise ValueError(
            f"completion_mask must have shape (N={n_rows}, T), got {tuple(mask.shape)}"
        )
