"""Saving and loading a policy's weights: merged full weights or LoRA adapters.

A merged save is a plain Hugging Face folder (config, safetensors, tokenizer, generation
config) that `ospo.policy.loading.load_hf` opens: the warm-up cache is one. An adapter save
holds only the LoRA weights, for a policy built with the same LoRA set-up.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ospo.io import atomic_dir

if TYPE_CHECKING:
    from ospo.policy import Policy

POLICY_MARKER = "ospo_policy.json"  # {"kind": "full" | "lora"}: what a saved folder holds


def merged_state_dict(policy: Policy, lora: bool = True) -> dict[str, Tensor]:
    """State dict of the causal LM with the LoRA deltas added to their base weights, under
    the plain model's key names (the live model is not modified); `lora=False` leaves the
    deltas out (the frozen base). Without LoRA: the model's own state dict."""
    lm = policy.causal_lm
    full = policy.full_precision  # frozen weights kept in a lower dtype (`store_frozen`)
    if not policy.is_peft:
        return {k: full.get(k, v).detach() for k, v in lm.state_dict().items()}
    deltas = {}
    with torch.no_grad():
        for name, module in lm.named_modules() if lora else []:
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters:
                    deltas[name] = sum(module.get_delta_weight(a) for a in adapters)
    merged = {}
    for key, value in lm.state_dict().items():
        if "lora_" in key:
            continue
        value = full.get(key, value)
        key = key.replace(".base_layer.", ".")
        module_name, _, leaf = key.rpartition(".")
        if leaf == "weight" and module_name in deltas:
            value = value + deltas[module_name].to(value.dtype)
        merged[key] = value.detach()
    return merged


def save(policy: Policy, path: str | os.PathLike, merged: bool = True, lora: bool = True) -> Path:
    """Save the policy atomically (`ospo.io.atomic_dir`).

    Default: the full weights, LoRA deltas merged in, as an HF folder (config, safetensors,
    tokenizer) that `load_hf` opens and `load` reads back. `merged=False` on a LoRA policy
    saves only the adapter (`load` into a policy with the same LoRA config); `lora=False`
    saves the frozen base without the deltas (what a vLLM engine serving the adapter loads).
    """
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        kind = "lora" if policy.is_peft and not merged else "full"
        if kind == "lora" or not policy.is_peft:
            policy.model.save_pretrained(tmp)
        else:
            lm = policy.causal_lm
            state = merged_state_dict(policy, lora=lora)
            if _tied(lm):  # from_pretrained re-ties the output layer to the embeddings
                state.pop(_output_weight_key(lm), None)
            state = {k: v.contiguous().cpu() for k, v in state.items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            lm.config.save_pretrained(tmp)
        if kind == "full":  # a generation config that stops where the policy stops
            generation = copy.deepcopy(policy.causal_lm.generation_config)
            eos = policy.eos_token_ids
            generation.eos_token_id = eos[0] if len(eos) == 1 else list(eos)
            generation.pad_token_id = policy.pad_token_id
            generation.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / POLICY_MARKER).write_text(json.dumps({"kind": kind}))
    return Path(path)


def load(policy: Policy, path: str | os.PathLike) -> Policy:
    """Load weights saved by `save` into this policy in place: an adapter into the same LoRA
    setup; full weights into a plain policy of the same architecture."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / POLICY_MARKER
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a saved policy (no ospo_policy.json)")
    kind = json.loads(meta_file.read_text())["kind"]
    if kind == "lora":
        from peft import set_peft_model_state_dict

        if not policy.is_peft:
            raise ValueError(f"{path} holds a LoRA adapter but this policy has no LoRA")
        state = load_file(path / "adapter_model.safetensors", device=str(policy.device))
        result = set_peft_model_state_dict(policy.model, state)
        bad = [k for k in result.unexpected_keys if "lora_" in k]
        if bad:
            raise ValueError(f"adapter keys do not match this policy: {bad[:5]}")
        return policy
    if policy.is_peft:
        raise ValueError(
            f"{path} holds full (merged) weights but this policy is LoRA-wrapped: open it "
            "with load_hf(path, lora=...) instead"
        )
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    state = {}
    for f in files:
        state.update(load_file(f, device=str(policy.device)))
    missing, unexpected = policy.model.load_state_dict(state, strict=False)
    tied = {_output_weight_key(policy.model)} if _tied(policy.model) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"state dict in {path} does not match: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return policy


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _output_weight_key(model) -> str:
    """State-dict key of the output layer's weight (e.g. "lm_head.weight")."""
    head = model.get_output_embeddings()
    return next(f"{n}.weight" for n, m in model.named_modules() if m is head)
