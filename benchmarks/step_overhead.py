"""OSPO step time over GRPO step time on the default config (docs/design.md section 3).

Both methods are built from the real Hydra config (`conf/train.yaml`, composed with
`baseline=grpo` and with the default `baseline=ospo attribution=owen segmenter=phrase`) by
`ospo.build`, as a training run builds them: the embedded shop task, BM25 + NDCG@10, the
configured policy (SmolLM2-135M-Instruct with LoRA by default, `--model tiny` for a quick run),
the optimizer and schedule of `rl.optimizer` / `rl.scheduler`.

One training step is `ospo.step.RLStep`, the object `RLModule.training_step` calls, built by
`ospo.build.build_step` as `train.py` builds it (format check and gate, rollout engine,
segmenter and attribution from the config):

    rollout (G per prompt) -> score -> [OSPO: segment + exact Owen attribution]
      -> advantages -> update: token log-probs (+ entropy; one prompt pass per request)
      -> clipped loss -> backward -> grad-norm clip -> AdamW step -> LR schedule step

under the trainer's precision (bf16 autocast on CPU by default, `ospo.evaluate.autocast_for`).
The timings are the ones `RLStep` records for each part; the step's logging (extra metrics,
format checks) is left out: it is the same for both methods.

Steps run in alternating pairs (GRPO k, OSPO k, GRPO k+1, ...). Each step of a pair starts from
the same weights and optimizer state (restored from a snapshot taken after one untimed warm-up
step) and the same rollout seed and prompts, so both methods sample the same completions; the
table says whether they did. The first pair is dropped (warm-up). Reported: the median step time
of each method, their ratio (and the median of the per-pair ratios), and the median share of
OSPO's step spent on the credit stage (segmentation + coalition values + Owen values).

Last line: ``ospo_over_grpo=<median OSPO step / median GRPO step>`` (target: at most 1.10).

    python benchmarks/step_overhead.py                 # SmolLM2, 6 timed pairs (+1 warm-up)
    python benchmarks/step_overhead.py --model tiny    # quick run with the tiny GPT-2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from ospo.build import (  # noqa: E402
    build_data,
    build_policy,
    build_reward,
    build_step,
    load_warm_policy,
)
from ospo.config import compose_config  # noqa: E402  (also registers the resolvers)
from ospo.evaluate import autocast_for  # noqa: E402
from ospo.optim import clip_grad_norm, optimization  # noqa: E402
from ospo.sft import WARMUP_MARKER, warmup_dir  # noqa: E402
from ospo.step import PromptSchedule, step_seed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed (GRPO, OSPO) pairs")
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for both methods")
    a = ap.parse_args()

    common = [f"model={a.model}", f"seed={a.seed}", *a.overrides]
    cfg_ospo = compose_config(["baseline=ospo", "attribution=owen", "segmenter=phrase", *common])
    cfg_grpo = compose_config(["baseline=grpo", *common])
    rl = cfg_ospo.rl
    if cfg_ospo.baseline.mu != 1 or cfg_grpo.baseline.mu != 1:
        raise SystemExit("this benchmark times one update per rollout step: keep baseline.mu=1")

    pl.seed_everything(a.seed, workers=True, verbose=False)
    data = build_data(cfg_ospo)
    reward = build_reward(cfg_ospo.retriever, cfg_ospo.reward, data.catalog)
    pl.seed_everything(a.seed, workers=True, verbose=False)
    init, precision = warmup_dir(cfg_ospo), cfg_ospo.trainer.precision
    if (init / WARMUP_MARKER).exists():  # the policy RL starts from, as train.py loads it
        policy, source = load_warm_policy(cfg_ospo.model, init, precision), f"warm-up {init}"
    else:
        policy, source = build_policy(cfg_ospo.model, data, precision), "base model (no warm-up)"
    policy.train()
    steps = {}
    for cfg in (cfg_grpo, cfg_ospo):  # the step train.py builds: format gate, engine, credit
        step = build_step(cfg, policy, reward)
        steps[step.baseline.name] = step
    params = policy.trainable_parameters()
    optim = optimization(policy, instantiate(rl.optimizer), instantiate(rl.scheduler))
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    clip = clip_grad_norm(rl.grad_clip)
    autocast = autocast_for(cfg_ospo, policy)
    schedule = PromptSchedule(data.splits["train"], rl.prompts_per_step, a.seed)
    print(
        f"policy: {source}; retriever={cfg_ospo.retriever._target_.rsplit('.', 1)[-1]}\n"
        f"model={a.model} precision={cfg_ospo.trainer.precision} threads={torch.get_num_threads()}"
        f" B={rl.prompts_per_step} G={rl.num_generations} max_new_tokens={rl.max_new_tokens}"
        f" trainable={sum(p.numel() for p in params):,}"
    )

    def train_step(name: str, k: int) -> tuple[list[str], dict[str, float]]:
        with autocast:
            out = steps[name](schedule(k), step_seed(a.seed, k), opt, sched, clip=clip)
        timings = {**out.seconds, "coalitions": out.credit.coalitions}
        timings["segments"] = sum(out.credit.segments)
        return out.rollouts.texts, timings

    # One untimed update so the snapshot holds a live optimizer state (AdamW moments).
    train_step("grpo", 0)
    snap_params = [p.detach().clone() for p in params]
    snap_opt = copy.deepcopy(opt.state_dict())
    snap_sched = copy.deepcopy(sched.state_dict())

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, snap_params, strict=True):
                p.copy_(s)
        opt.load_state_dict(copy.deepcopy(snap_opt))
        sched.load_state_dict(copy.deepcopy(snap_sched))

    rows = []
    header = (
        f"{'pair':>4} {'grpo_s':>7} {'ospo_s':>7} {'ratio':>6} {'gen_s':>6} "
        f"{'credit_s':>8} {'share':>6} {'segs':>5} {'coal':>6} same"
    )
    print(header)
    for k in range(a.steps + 1):
        out = {}
        for name in ("grpo", "ospo"):
            restore()
            out[name] = train_step(name, k + 1)
        (g_texts, g), (o_texts, o) = out["grpo"], out["ospo"]
        same = g_texts == o_texts
        rows.append((g, o, same))
        print(
            f"{k:>4} {g['step']:7.3f} {o['step']:7.3f} {o['step'] / g['step']:6.3f} "
            f"{o['generate']:6.3f} {o['credit']:8.4f} {o['credit'] / o['step']:6.3f} "
            f"{o['segments']:5d} {o['coalitions']:6d} {'yes' if same else 'NO'}"
            + ("  (warm-up, dropped)" if k == 0 else "")
        )

    timed = rows[1:]
    med = {
        name: {key: statistics.median(r[i][key] for r in timed) for key in timed[0][i]}
        for i, name in enumerate(("grpo", "ospo"))
    }
    share = statistics.median(r[1]["credit"] / r[1]["step"] for r in timed)
    paired = statistics.median(r[1]["step"] / r[0]["step"] for r in timed)
    print()
    print(
        f"{'median':>10} {'step_s':>7} {'gen_s':>7} {'reward_s':>8} {'credit_s':>8} "
        f"{'adv_s':>7} {'update_s':>8}"
    )
    for name in ("grpo", "ospo"):
        m = med[name]
        print(
            f"{name:>10} {m['step']:7.3f} {m['generate']:7.3f} {m['reward']:8.4f} "
            f"{m['credit']:8.4f} {m['advantage']:7.4f} {m['update']:8.3f}"
        )
    print(
        f"attribution share of the OSPO step (median): {share:.3f}; pairs with identical "
        f"completions: {sum(r[2] for r in timed)}/{len(timed)}; median of the per-pair ratios: "
        f"{paired:.3f}"
    )
    print(f"ospo_over_grpo={med['ospo']['step'] / med['grpo']['step']:.3f}")


if __name__ == "__main__":
    main()
