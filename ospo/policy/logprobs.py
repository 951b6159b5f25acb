"""Per-token log-probs of completions under the policy: the pass the loss differentiates.

One backbone pass over [prompt; completion[:-1]], positions from the attention mask (left
padding does not shift them); only the T hidden states that predict completion tokens go
through the output layer (and of those only the valid ones, not the padding after EOS), in
float32 even under bf16 autocast. With `group_size=G` each prompt goes through the backbone
once and its KV cache serves its G completions (docs/design.md section 3).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from ospo.policy import Policy

# Above this many logits (valid tokens * V) token_logprobs works in chunks of tokens, recomputing
# each chunk's logits in the backward pass instead of keeping them all (2**27 floats = 512 MiB).
_MAX_LOGITS = 2**27


def token_logprobs(
    policy: Policy,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    with_entropy: bool = False,
    *,
    temperature: float = 1.0,
    group_size: int = 1,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(c_t | prompt, c_<t) for every completion token, (N, T), zero on padding.

    One forward pass of the backbone over [prompt; completion[:-1]] with the attention mask
    and position_ids = cumsum(mask) - 1 (so left padding does not shift positions); the
    output layer sees only the T hidden states that predict completion tokens. Logits are
    divided by `temperature` (match the sampling temperature to score the sampling
    distribution). With `with_entropy`, also returns H_t = -sum_v p_v log p_v, (N, T).

    `group_size=G` (rows g*G..g*G+G-1 share one prompt, as `generate` returns them): the
    prompt goes through the backbone once per request and its KV cache serves the G
    completions; gradients from the G rows add up in the shared pass. Same values as the
    plain pass up to float rounding; falls back to it when the rows do not repeat.
    """
    N, P = prompt_ids.shape
    T = completion_ids.shape[1]
    if completion_ids.shape[0] != N or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"shape mismatch: prompt_ids {tuple(prompt_ids.shape)}, prompt_mask "
            f"{tuple(prompt_mask.shape)}, completion_ids {tuple(completion_ids.shape)}"
        )
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} != completion_ids "
            f"{tuple(completion_ids.shape)}"
        )
    dev = policy.device
    prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
    completion_ids, completion_mask = completion_ids.to(dev), completion_mask.to(dev)
    unique = None
    if not policy._checkpointing():
        unique = _unique_prompts(prompt_ids, prompt_mask, group_size)
    if unique is None:
        ids = torch.cat([prompt_ids, completion_ids], 1)[:, : P + T - 1]  # (N, L)
        mask = torch.cat([prompt_mask, completion_mask], 1)[:, : P + T - 1]  # (N, L)
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # (N, L)
        hidden = policy.backbone(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (N, L, H)
        hidden = hidden[:, P - 1 :]  # (N, T, H): the states that predict completion tokens
    else:
        cache, prompt_hidden = prompt_cache(policy, *unique, group_size)  # (B, P, H)
        first = prompt_hidden[:, -1:].repeat_interleave(group_size, 0)  # (N, 1, H)
        mask = torch.cat([prompt_mask, completion_mask[:, :-1]], 1)  # (N, P + T - 1)
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)[:, P:]  # (N, T - 1)
        hidden = first
        if T > 1:
            rest = policy.backbone(
                input_ids=completion_ids[:, :-1],
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_keyword(policy): cache},
            ).last_hidden_state  # (N, T - 1, H)
            hidden = torch.cat([first, rest], 1)  # (N, T, H)
    valid = completion_mask.to(dev).bool()  # (N, T)
    h_all, tgt_all = hidden[valid], completion_ids[valid]  # (M, H), (M,): valid tokens only
    M = tgt_all.shape[0]
    V = policy.lm_head.weight.shape[0]
    rows = max(1, _MAX_LOGITS // max(1, V))
    scale = 1.0 / float(temperature)
    logps, ents = [], []
    for r0 in range(0, M, rows):
        h, tgt = h_all[r0 : r0 + rows], tgt_all[r0 : r0 + rows]
        if rows < M and torch.is_grad_enabled() and h.requires_grad:
            out = checkpoint(
                _head_logprobs, policy.lm_head, h, tgt, scale, with_entropy, use_reentrant=False
            )
        else:
            out = _head_logprobs(policy.lm_head, h, tgt, scale, with_entropy)
        logps.append(out[0])
        ents.append(out[1])
    logp = _scatter(valid, logps)  # (N, T), 0 on padding
    if not with_entropy:
        return logp
    return logp, _scatter(valid, ents)


def _scatter(valid: Tensor, chunks: list[Tensor]) -> Tensor:
    """Values of the M valid tokens, (M,) in chunks, put back into an (N, T) tensor of zeros."""
    out = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    if chunks:
        out = out.masked_scatter(valid, torch.cat(chunks).to(torch.float32))
    return out


def prompt_cache(policy: Policy, p_ids: Tensor, p_mask: Tensor, group_size: int):
    """Backbone over B unique prompts: its KV cache repeated to N = B * G rows, and the
    last hidden states (B, P, H)."""
    position_ids = (p_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, P)
    out = policy.backbone(
        input_ids=p_ids, attention_mask=p_mask, position_ids=position_ids, use_cache=True
    )
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(group_size)  # each layer (N, heads, P, d)
    return cache, out.last_hidden_state


def cache_keyword(policy: Policy) -> str:
    """The keyword that passes a KV cache to the backbone and to `generate`: `cache` from
    transformers 5.20 on, `past_key_values` before (the vllm extra pins transformers < 5.20)."""
    params = inspect.signature(policy.backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _unique_prompts(ids: Tensor, mask: Tensor, group_size: int) -> tuple[Tensor, Tensor] | None:
    """The (B, P) prompts when each run of `group_size` rows repeats one prompt, else None."""
    if group_size < 2 or ids.shape[0] % group_size or ids.shape[1] < 2:
        return None
    p_ids, p_mask = ids[::group_size], mask[::group_size]  # (B, P)
    same = torch.equal(p_ids.repeat_interleave(group_size, 0), ids) and torch.equal(
        p_mask.repeat_interleave(group_size, 0), mask
    )
    return (p_ids, p_mask) if same else None


def _head_logprobs(
    lm_head: torch.nn.Module, hidden: Tensor, targets: Tensor, scale: float, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    """log_softmax(lm_head(h) * scale) gathered at targets, (m,); entropy (m,) or empty.
    hidden: (m, H), targets: (m,)."""
    # The output layer runs in the weights' dtype (float32 on CPU) even under bf16 autocast:
    # log-prob ratios of a few per cent decide PPO clipping; bf16 logits are good to ~0.05.
    with torch.autocast(hidden.device.type, enabled=False):
        logits = lm_head(hidden.to(lm_head.weight.dtype)).float()  # (m, V)
    if scale != 1.0:
        logits = logits * scale
    lse = logits.logsumexp(-1)  # (m,)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (m,)
    if not with_entropy:
        return logp, logp.new_zeros(0)
    probs = logits.softmax(-1)  # (m, V)
    entropy = lse - (probs * logits).sum(-1)  # H = lse - E_p[logit], (m,)
    return logp, entropy
