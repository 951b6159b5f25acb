"""Clipped policy-gradient loss shared by GRPO and OSPO (docs/design.md section 2.2).

Per valid token, with rho = pi_theta / pi_old = exp(logp - old_logp):

    loss_t = -min(rho * A_t, clip(rho, 1 - eps_low, 1 + eps_high) * A_t) + beta * KL_k3
    KL_k3  = exp(ref - logp) - (ref - logp) - 1        (Schulman's k3 estimator, >= 0)

GRPO passes A_t = A_i on every token of completion i, OSPO its redistributed A_{i,t}.
Aggregation over the (N, T) tokens:
* `token_mean`:          sum over valid tokens / number of valid tokens (DAPO),
* `seq_mean_token_mean`: mean over sequences of each sequence's token mean (original GRPO),
* `token_sum_norm`:      sum over valid tokens / (N * max_completion_length) (Dr.GRPO).
Metric names follow TRL's GRPO trainer (clip_ratio, clip_ratio_low, clip_ratio_high).
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}"
        )


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
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate loss (+ beta * KL_k3) aggregated over valid tokens.

    logp, old_logp, advantages, mask (and ref_logp, entropy when given): (N, T).
    Gradients flow through `logp` only (old_logp, ref_logp and advantages are detached).
    KL_k3 enters the loss when beta > 0 (ref_logp then required); it is reported as a metric
    whenever ref_logp is given. Returns (scalar loss, metrics); metrics are python floats:
    clip_ratio_low (valid tokens with rho < 1 - eps_low and A < 0), clip_ratio_high
    (rho > 1 + eps_high and A > 0), clip_ratio (their sum), ratio_mean, and kl / entropy
    (means over valid tokens) when computed.
    """
    _check_aggregation(aggregation)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low} and {eps_high}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference model's log-probs)")
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
    log_ratio = logp - old_logp.detach()  # (N, T)
    rho = torch.exp(log_ratio)  # (N, T)
    surrogate = torch.minimum(rho * adv, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv)
    per_token = -surrogate  # (N, T)
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
        valid = m > 0  # (N, T)
        low = valid & (rho < 1 - eps_low) & (adv < 0)
        high = valid & (rho > 1 + eps_high) & (adv > 0)
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
    return loss, metrics


def entropy_from_logits(logits: Tensor, chunk_size: int = 8) -> Tensor:
    """Entropy H = -sum_v p_v log p_v, log p = z - logsumexp(z), of each next-token distribution.

    logits: (N, T, V). Processed `chunk_size` rows of N at a time in float32 to bound the
    memory of the softmax; -inf logits (masked vocabulary) contribute 0. Returns (N, T) float32.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (N, T, V), got {tuple(logits.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = []
    for chunk in logits.split(chunk_size, dim=0):
        z = chunk.float()  # (n, T, V)
        top = z.detach().amax(dim=-1, keepdim=True)  # (n, T, 1)
        z = z - torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # max logit -> 0
        logz = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, T, 1)
        logp = z - logz  # (n, T, V)
        p = logp.exp()
        logp = torch.where(p > 0, logp, torch.zeros_like(logp))  # 0 * -inf -> 0, finite grads
        out.append(-(p * logp).sum(dim=-1))  # (n, T)
    if not out:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    return torch.cat(out, dim=0)


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
    ):
        _check_aggregation(aggregation)
        self.eps_low, self.eps_high, self.beta = eps_low, eps_high, beta
        self.aggregation = aggregation
        self.max_completion_length = max_completion_length

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
        )
