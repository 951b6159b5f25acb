"""OSPO step time over GRPO step time on the default config (DESIGN.md section 3).

Both methods are built from the real Hydra config (`conf/train.yaml`, composed with
`baseline=grpo` and with the default `baseline=ospo attribution=owen segmenter=phrase`), with the
objects made as `ospo.pipeline` makes them: the embedded shop task, BM25 + NDCG@10, the
configured policy (SmolLM2-135M-Instruct with LoRA by default, `--model tiny` for a quick run).

One training step is what `RLModule.training_step` does, in the same order and with the same
public functions:

    generate (G per prompt) -> reward -> [OSPO: segment + exact Owen attribution]
      -> advantages -> token log-probs (+ entropy; group_size=G, so one prompt pass per
      request) -> clipped loss -> backward
      -> grad-norm clip -> AdamW step -> LR schedule step

under the trainer's precision (bf16 autocast on CPU by default, `ospo.pipeline.autocast_for`).
The step's logging (extra metrics, format checks) is left out: it is the same for both methods.

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
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup  # noqa: E402

from ospo.config import compose_config  # noqa: E402  (also registers the resolvers)
from ospo.loss import policy_loss  # noqa: E402
from ospo.module import CreditStats, PromptSchedule, compute_credit, step_seed  # noqa: E402
from ospo.pipeline import autocast_for, base_policy, build_data, build_reward  # noqa: E402


class Method:
    """What differs between GRPO and OSPO: the advantage estimator and the credit stage."""

    def __init__(self, cfg, segmenter=None, attribution=None):
        self.name = str(cfg.baseline.name)
        self.baseline = cfg.baseline
        self.advantage = instantiate(cfg.baseline.advantage)
        self.segmenter, self.attribution = segmenter, attribution


def make_optimizer(policy, rl, mu: int):
    """AdamW + cosine schedule with warm-up, as `RLModule.configure_optimizers`."""
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt,
        num_warmup_steps=rl.warmup_steps * mu,
        num_training_steps=max(1, rl.steps * mu),
        min_lr_rate=rl.min_lr_ratio,
    )
    return params, opt, sched


def train_step(policy, opt, sched, params, method: Method, prompts, reward, rl, seed, autocast):
    """One rollout step + one update (mu = 1), in `RLModule.training_step`'s order.

    Returns the completions and the timings (seconds) of the stages.
    """
    G = rl.num_generations
    samples = [s for s in prompts for _ in range(G)]  # N = B * G, prompt-major
    loss_cfg = method.baseline.loss
    t_step = time.perf_counter()

    # 1. rollouts
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with autocast:
        ro = policy.generate(
            [s.messages for s in prompts],
            num_generations=G,
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            do_sample=True,
        )
    t_gen = time.perf_counter() - t0
    mask = ro.completion_mask.float()  # (N, T)

    # 2. reward
    t0 = time.perf_counter()
    reward.clear_cache()
    rewards = reward.score_texts(ro.texts, samples)  # (N,)
    t_reward = time.perf_counter() - t0

    # 3. credit (OSPO)
    extra, credit = {}, CreditStats()
    if method.baseline.credit:
        segs, phis, credit = compute_credit(
            ro.texts,
            samples,
            method.segmenter,
            method.attribution,
            reward,
            method.baseline.keep_query,
        )
        extra = {"token_spans": ro.token_spans, "segmentations": segs, "phis": phis}

    # 4. advantages
    t0 = time.perf_counter()
    adv = method.advantage(rewards, G, ro.completion_mask, **extra).to(mask)  # (N, T)
    t_adv = time.perf_counter() - t0

    # 5. one policy update
    t0 = time.perf_counter()
    args = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    with autocast:
        # (N, T) x2; one prompt pass per request, as RLModule.training_step
        logp, entropy = policy.token_logprobs(*args, with_entropy=True, group_size=G)
        loss, _ = policy_loss(
            logp,
            logp.detach(),
            adv,
            mask,
            eps_low=loss_cfg.eps_low,
            eps_high=loss_cfg.eps_high,
            beta=loss_cfg.beta,
            aggregation=loss_cfg.aggregation,
            max_completion_length=rl.max_new_tokens,
            entropy=entropy.detach(),
        )
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, rl.grad_clip)
    opt.step()
    sched.step()
    t_update = time.perf_counter() - t0

    step_s = time.perf_counter() - t_step
    timings = {
        "step": step_s,
        "generate": t_gen,
        "reward": t_reward,
        "credit": credit.seconds,
        "advantage": t_adv,
        "update": t_update,
        "coalitions": credit.coalitions,
        "segments": sum(credit.segments),
    }
    return ro.texts, timings


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

    t0 = time.perf_counter()
    pl.seed_everything(a.seed, workers=True, verbose=False)
    data = build_data(cfg_ospo)
    reward = build_reward(cfg_ospo.retriever, cfg_ospo.reward, data.catalog)
    ospo_m = Method(cfg_ospo, instantiate(cfg_ospo.segmenter), instantiate(cfg_ospo.attribution))
    grpo_m = Method(cfg_grpo)
    pl.seed_everything(a.seed, workers=True, verbose=False)
    policy = base_policy(cfg_ospo, data)
    policy.train()
    params, opt, sched = make_optimizer(policy, rl, mu=1)
    autocast = autocast_for(cfg_ospo, policy)
    schedule = PromptSchedule(data.splits["train"], rl.prompts_per_step, a.seed)
    print(
        f"model={a.model} precision={cfg_ospo.trainer.precision} threads={torch.get_num_threads()}"
        f" B={rl.prompts_per_step} G={rl.num_generations} max_new_tokens={rl.max_new_tokens}"
        f" trainable={sum(p.numel() for p in params):,} (set-up {time.perf_counter() - t0:.1f} s)"
    )

    # One untimed update so the snapshot holds a live optimizer state (AdamW moments).
    train_step(
        policy, opt, sched, params, grpo_m, schedule(0), reward, rl, step_seed(a.seed, 0), autocast
    )
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
        prompts, seed = schedule(k + 1), step_seed(a.seed, k + 1)
        out = {}
        for m in (grpo_m, ospo_m):
            restore()
            out[m.name] = train_step(
                policy, opt, sched, params, m, prompts, reward, rl, seed, autocast
            )
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
