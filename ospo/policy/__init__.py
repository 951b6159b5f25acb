"""The policy: a causal LM with its tokenizer and chat template (config group `model`).

`Policy` holds the model and knows its structure (peft wrapper, backbone, output layer, EOS
ids) and its chat prompts; the work is done by one module per job, which its methods call:

* `ospo.policy.sampling`: `generate`, B prompts -> N = B * G completions with token spans;
* `ospo.policy.logprobs`: `token_logprobs`, per-token log-probs (N, T) for the loss;
* `ospo.policy.saving`: `save` / `load` / `merged_state_dict`, merged weights or adapters;
* `ospo.policy.loading`: the loaders the `model` options name (`load_smollm2`, `build_tiny`,
  `load_hf`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ospo.policy import logprobs, sampling, saving
from ospo.policy.sampling import Rollouts, token_char_spans


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
            eos_token_ids = eos_ids(tokenizer, self.causal_lm)
        self.eos_token_ids: list[int] = sorted({int(i) for i in eos_token_ids})
        if not self.eos_token_ids:
            raise ValueError("no EOS token id: the tokenizer and generation config name none")
        # state-dict key (of `causal_lm`) -> the full-precision value of a frozen weight that
        # `store_frozen` keeps in a lower dtype; merged saves read these
        self.full_precision: dict[str, Tensor] = {}

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

    # ---- the jobs, one module each: these functions take the policy as `self` ------------
    generate = sampling.generate  # B prompts -> N = B * G completions with token spans
    token_logprobs = logprobs.token_logprobs  # per-token log-probs (N, T), optional entropy
    merged_state_dict = saving.merged_state_dict  # LoRA deltas folded into the base weights
    save = saving.save  # atomically: merged weights (default) or the adapter
    load = saving.load  # weights written by `save`, in place

    def store_frozen(self, dtype: torch.dtype) -> int:
        """Store the frozen weights of the linear layers in `dtype`, the autocast dtype.

        Under autocast a linear layer casts its float32 weight to bf16 on every call, and
        autocast caches the cast only for weights that require grad: the frozen base weights
        under LoRA are cast again at every forward (17 forwards per 16-token rollout).
        Casting them once gives the same bf16 operands, so every output is bit-identical;
        the float32 values are kept in `full_precision` for merged saves. The output layer
        (the log-prob pass runs it in float32) and weights shared with an embedding are left
        alone. Returns the number of weights cast.
        """
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        keep = {id(self.lm_head.weight), id(self.causal_lm.get_input_embeddings().weight)}
        cast = 0
        for name, module in self.causal_lm.named_modules():
            weight = getattr(module, "weight", None)
            if (
                not isinstance(module, torch.nn.Linear | Conv1D)
                or weight is None
                or weight.requires_grad
                or id(weight) in keep
                or weight.dtype == dtype
            ):
                continue
            self.full_precision[f"{name}.weight"] = weight.data
            module.weight.data = weight.data.to(dtype)
            cast += 1
        return cast

    @contextlib.contextmanager
    def full_precision_frozen(self):
        """Run with the float32 values of the weights `store_frozen` cast, e.g. to use the
        policy outside autocast (a bf16 weight there meets float32 inputs)."""
        modules = dict(self.causal_lm.named_modules())
        low = {}
        for key, full in self.full_precision.items():
            module = modules[key.rpartition(".")[0]]
            low[key], module.weight.data = module.weight.data, full
        try:
            yield self
        finally:
            for key, data in low.items():
                modules[key.rpartition(".")[0]].weight.data = data

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _checkpointing(self) -> bool:
        """Gradient checkpointing drops KV caches in training mode: no prompt sharing then."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.backbone.modules())


def eos_ids(tokenizer, model) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models end a turn
    on a token other than the tokenizer's EOS)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


# The loaders build Policy objects, so they are imported once the class exists.
from ospo.policy.loading import (  # noqa: E402
    CHATML_TEMPLATE,
    build_tiny,
    convert_smollm2,
    default_cache_dir,
    disable_dropout,
    load_hf,
    load_smollm2,
    to_dtype,
)

__all__ = [
    "CHATML_TEMPLATE",
    "Policy",
    "Rollouts",
    "build_tiny",
    "convert_smollm2",
    "default_cache_dir",
    "disable_dropout",
    "eos_ids",
    "load_hf",
    "load_smollm2",
    "to_dtype",
    "token_char_spans",
]
