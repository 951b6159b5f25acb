"""Clipped policy-gradient loss shared by every method (docs/design.md section 2.2).

Per valid token t of completion i, with the importance ratio r_{i,t} of `importance_level`:

    token:     r_{i,t} = pi_theta / pi_old = exp(logp_{i,t} - old_logp_{i,t})       (PPO, GRPO)
    sequence:  s_i     = exp(mean over valid t of (logp_{i,t} - old_logp_{i,t}))     (GSPO)
               r_{i,t} = sg[s_i] * pi_theta(y_{i,t}) / sg[pi_theta(y_{i,t})]         (GSPO-token)

    loss_t = -keep_t * min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t) + beta * KL_k3
    KL_k3  = exp(ref - logp) - (ref - logp) - 1        (Schulman's k3 estimator, >= 0)

sg = stop-gradient. GRPO passes A_t = A_i on every token of completion i, OSPO and the controls
their redistributed A_{i,t}. At sequence level r_{i,t} has the value s_i on every token, so the
clip acts per completion, while d r_{i,t} / d logp_{i,t} = s_i: token t's gradient
-s_i * A_{i,t} * grad logp_{i,t} follows its own advantage (GSPO-token, Zheng et al. 2025,
arXiv 2507.18071). With A_{i,t} = A_i it equals GSPO, whose ratio s_i is differentiated whole
(TRL's importance_sampling_level="sequence").
keep_t = 1, or with top_entropy_quantile q < 1, keep_t = [H_t >= the (1 - q) quantile of the
batch's valid-token entropies] (Wang et al. 2025, arXiv 2506.01939; TRL's top_entropy_quantile).
Aggregation over the (N, T) tokens (masked tokens still count in the denominators):
* `token_mean`:          sum over valid tokens / number of valid tokens (DAPO),
* `seq_mean_token_mean`: mean over sequences of each sequence's token mean (original GRPO),
* `token_sum_norm`:      sum over valid tokens / (N * max_completion_length) (Dr.GRPO).
Metric names follow TRL's GRPO trainer (clip_ratio, clip_ratio_low, clip_ratio_high).
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")


def _check_options(aggregation: str, importance_level: str, top_entropy_quantile: float) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}"
        )
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"unknown importance_level {importance_level!r}; expected one of "
            f"{', '.join(IMPORTANCE_LEVELS)}"
        )
    if not 0 < top_entropy_quantile <= 1:
        raise ValueError(
            f"top_entropy_quantile must be in (0, 1] (1.0 = every token), got {top_entropy_quantile}"
        )


def importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """The ratio r_{i,t} of each token, (N, T), differentiable through `logp` only.

    token: exp(logp - old_logp). sequence: exp(sg[log s_i] + logp - sg[logp]), whose value is
    s_i = exp(mean over valid tokens of logp - old_logp) on every token of completion i and
    whose derivative in logp_{i,t} is s_i (GSPO-token). A completion without valid tokens gets
    s_i = 1; padding never enters s_i.
    """
    log_ratio = logp - old_logp.detach()  # (N, T)
    if level == "token":
        return torch.exp(log_ratio)
    valid = mask > 0  # (N, T)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)  # (N, 1)
    log_s = torch.where(valid, log_ratio, 0).sum(dim=1, keepdim=True) / count  # (N, 1)
    return torch.exp(log_s.detach() + logp - logp.detach())  # (N, T)


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Valid tokens whose entropy is at or above the (1 - quantile) quantile of the valid
    tokens' entropies (linear interpolation, `torch.quantile`), (N, T) bool. With quantile = 0.5
    the lower half is dropped; ties at the threshold are kept. Under DDP each process takes the
    quantile of its own batch."""
    valid = mask > 0  # (N, T)
    h = entropy.detach().float()  # (N, T)
    if not valid.any():
        return valid
    threshold = torch.quantile(h[valid], 1 - quantile)
    return valid & (h >= threshold)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    aggregation: str = "token_mean",
    max_completion_length: int | None = None,
    entropy: Tensor | None = None,
    importance_level: str = "token",
    top_entropy_quantile: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate loss (+ beta * KL_k3) aggregated over valid tokens.

    logp, old_logp, advantages, mask (and ref_logp, entropy when given): (N, T).
    Gradients flow through `logp` only (old_logp, ref_logp, advantages, entropy are detached).
    `importance_level` picks the ratio (module docstring): token (PPO) or sequence (GSPO-token).
    KL_k3 enters the loss when beta > 0 (ref_logp then required); it is reported as a metric
    whenever ref_logp is given. `top_entropy_quantile` q < 1 (entropy then required) keeps the
    policy term of the high-entropy tokens only (`high_entropy_mask`); as in TRL the KL term
    stays on every valid token, so the low-entropy tokens are still held near the reference,
    and the aggregation's denominators still count every valid token. q = 1 is the plain loss.
    Returns (scalar loss, metrics); metrics are python floats over the valid tokens:
    clip_ratio_low (fraction whose policy term is clipped from below: kept, r < 1 - eps_low and
    A < 0), clip_ratio_high (kept, r > 1 + eps_high and A > 0), clip_ratio (their sum),
    ratio_mean (mean of r), kl / entropy (means) when computed, and entropy_mask_ratio (fraction
    kept) when q < 1. At sequence level r = s_i on every token of completion i: the clip ratios
    are the fraction of tokens in clipped completions (the GSPO paper's clipped-token fraction)
    and ratio_mean is the length-weighted mean of s_i.
    """
    _check_options(aggregation, importance_level, top_entropy_quantile)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low} and {eps_high}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference model's log-probs)")
    if top_entropy_quantile < 1 and entropy is None:
        raise ValueError(
            f"top_entropy_quantile={top_entropy_quantile} < 1 needs entropy (the policy's "
            "per-token entropy)"
        )
    named = {"old_logp": old_logp, "advantages": advantages, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    if entropy is not None:
        named["entropy"] = entropy
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (N, T), got {tuple(logp.shape)}")
    for name, x in named.items():
        if x.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(logp.shape)}")

    m = mask.to(logp.dtype)  # (N, T)
    adv = advantages.detach().to(logp.dtype)  # (N, T)
    rho = importance_ratio(logp, old_logp, mask, importance_level)  # (N, T)
    surrogate = torch.minimum(rho * adv, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv)
    per_token = -surrogate  # (N, T)
    keep = m > 0  # (N, T): tokens with a policy term
    if top_entropy_quantile < 1:
        keep = high_entropy_mask(entropy, mask, top_entropy_quantile)
        per_token = per_token * keep.to(logp.dtype)
    kl = None
    if ref_logp is not None:
        delta = ref_logp.detach() - logp  # (N, T)
        kl = torch.exp(delta) - delta - 1  # (N, T) k3 estimator
        if beta > 0:
            per_token = per_token + beta * kl

    n_valid = m.sum().clamp(min=1)
    if aggregation == "token_mean":
        loss = (per_token * m).sum() / n_valid
    elif aggregation == "seq_mean_token_mean":
        loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    else:
        length = logp.shape[1] if max_completion_length is None else max_completion_length
        if length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {length}")
        loss = (per_token * m).sum() / (logp.shape[0] * length)

    with torch.no_grad():
        low = keep & (rho < 1 - eps_low) & (adv < 0)  # (N, T)
        high = keep & (rho > 1 + eps_high) & (adv > 0)  # (N, T)
        count = float(n_valid)
        metrics = {
            "clip_ratio_low": float(low.sum()) / count,
            "clip_ratio_high": float(high.sum()) / count,
            "ratio_mean": float((rho * m).sum()) / count,
        }
        metrics["clip_ratio"] = metrics["clip_ratio_low"] + metrics["clip_ratio_high"]
        if kl is not None:
            metrics["kl"] = float((kl * m).sum()) / count
        if entropy is not None:
            metrics["entropy"] = float((entropy.to(m.dtype) * m).sum()) / count
        if top_entropy_quantile < 1:
            metrics["entropy_mask_ratio"] = float(keep.sum()) / count
    return loss, metrics


class PolicyLoss:
    """The loss settings of a method (`baseline.loss`), applied by `policy_loss`.

    `needs_reference` says whether the step must score a frozen reference policy (beta > 0).
    """

    def __init__(
        self,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        beta: float = 0.0,
        aggregation: str = "token_mean",
        max_completion_length: int | None = None,
        importance_level: str = "token",
        top_entropy_quantile: float = 1.0,
    ):
        _check_options(aggregation, importance_level, top_entropy_quantile)
        self.eps_low, self.eps_high, self.beta = eps_low, eps_high, beta
        self.aggregation = aggregation
        self.max_completion_length = max_completion_length
        self.importance_level = importance_level
        self.top_entropy_quantile = float(top_entropy_quantile)

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logp: Tensor | None = None,
        entropy: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """`policy_loss` with these settings; all tensors (N, T)."""
        return policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            beta=self.beta,
            ref_logp=ref_logp,
            aggregation=self.aggregation,
            max_completion_length=self.max_completion_length,
            entropy=entropy,
            importance_level=self.importance_level,
            top_entropy_quantile=self.top_entropy_quantile,
        )
