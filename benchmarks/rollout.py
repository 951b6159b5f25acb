"""Rollout sampling speed: the HF path (`rollout=hf`) against vLLM (`rollout=vllm`).

Both engines sample from the same policy in one process, side by side: the default policy
(SmolLM2-135M-Instruct, the cached warm-up of the default config when there is one, with
LoRA adapters as in training), the training requests of the embedded task, completions of up
to `--max-new-tokens` tokens (40 by default, the rewrite format's budget) at temperature 1.
Each shape B x G (requests x completions per request) is sampled `--repeats` times after one
untimed call, with the same seeds for both engines; reported are the median seconds,
completions per second and completion tokens per second of each engine.

vLLM's one-off costs are timed apart: start-up (save the merged policy, build the engine)
and the weight sync after an optimizer step, for each `--sync` mode: `merged` (LoRA folded
in, every weight copied into the engine) and `adapter` (the adapter saved and handed over;
the engine then samples with LoRA kernels, so its sampling at 8 x 8 is timed too).

Last line: ``vllm_over_hf=<median vLLM seconds / median HF seconds at 8 x 8, merged sync>``
(below 1: vLLM is faster).

    python benchmarks/rollout.py                        # needs the vllm extra
    python benchmarks/rollout.py --shapes 8x8 --sync merged --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ospo.build import build_data, build_policy, load_warm_policy  # noqa: E402
from ospo.config import compose_config  # noqa: E402  (also registers the resolvers)
from ospo.rollout import HFRollout, VLLMRollout  # noqa: E402
from ospo.sft import WARMUP_MARKER, warmup_dir  # noqa: E402
from ospo.step import step_seed  # noqa: E402


def timed(engine, policy, messages, G: int, max_new: int, seeds: list[int]) -> tuple[float, int]:
    """Median seconds of one sampling call over `seeds`, and completion tokens per call."""
    seconds, tokens = [], 0
    for seed in seeds:
        t0 = time.perf_counter()
        ro = engine.generate(policy, messages, G, max_new, temperature=1.0, seed=seed)
        seconds.append(time.perf_counter() - t0)
        tokens = int(ro.completion_mask.sum())
    return statistics.median(seconds), tokens


def nudge(policy) -> None:
    """Stand-in for an optimizer step: move every trainable weight a little."""
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1e-3 * torch.randn_like(p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4x4,8x8,16x8", help="B x G shapes, comma-separated")
    ap.add_argument("--sync", default="merged,adapter", help="vLLM weight-sync modes to time")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. model.lora=null)")
    a = ap.parse_args()

    cfg = compose_config(list(a.overrides))
    data = build_data(cfg)
    init = warmup_dir(cfg)
    if (init / WARMUP_MARKER).exists():
        policy, source = load_warm_policy(cfg.model, init), f"warm-up {init}"
    else:
        policy, source = build_policy(cfg.model, data), "base model (no cached warm-up)"
    policy.eval()
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    train = data.splits["train"]
    print(f"policy: {source}; torch threads {torch.get_num_threads()}")

    hf = HFRollout()
    results: dict[tuple[str, int, int], tuple[float, int]] = {}
    for B, G in shapes:
        messages = [s.messages for s in train[:B]]
        seeds = [step_seed(0, k) for k in range(a.repeats + 1)]
        timed(hf, policy, messages, G, a.max_new_tokens, seeds[:1])  # untimed
        results["hf", B, G] = timed(hf, policy, messages, G, a.max_new_tokens, seeds[1:])

    one_off: dict[str, tuple[float, float]] = {}
    for mode in a.sync.split(","):
        engine = VLLMRollout(sync=mode, cpu_kv_cache_gib=1)
        start = engine.sync(policy, version=0)
        syncs = []
        for k in range(1, a.repeats + 1):
            nudge(policy)
            syncs.append(engine.sync(policy, version=k))
        one_off[mode] = (start, statistics.median(syncs))
        for B, G in shapes if mode == "merged" else [(8, 8)]:
            messages = [s.messages for s in train[:B]]
            seeds = [step_seed(0, k) for k in range(a.repeats + 1)]
            timed(engine, policy, messages, G, a.max_new_tokens, seeds[:1])  # untimed
            results[f"vllm-{mode}", B, G] = timed(
                engine, policy, messages, G, a.max_new_tokens, seeds[1:]
            )
        engine.close()

    print(f"\nsampling, completions of up to {a.max_new_tokens} tokens, median of {a.repeats}")
    print(f"{'engine':<16}{'B x G':>8}{'seconds':>10}{'compl/s':>10}{'tokens/s':>10}")
    for (engine, B, G), (sec, tokens) in results.items():
        print(f"{engine:<16}{f'{B}x{G}':>8}{sec:>10.2f}{B * G / sec:>10.1f}{tokens / sec:>10.1f}")
    print("\nvLLM one-off costs (seconds)")
    for mode, (start, sync) in one_off.items():
        print(f"  {mode:<8} start-up {start:7.1f}   sync after an update {sync:6.2f}")
    ratio = results["vllm-merged", 8, 8][0] / results["hf", 8, 8][0]
    print(f"vllm_over_hf={ratio:.3f}")


if __name__ == "__main__":
    main()
