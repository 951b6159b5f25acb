"""Our GRPO step against TRL's `GRPOTrainer` on the same tiny policy, task and reward.

Both sides train the same tiny GPT-2 (`ospo.policy.build_tiny`, built as `ospo.build` builds
`model=tiny`, saved to a temporary folder that TRL loads by path, with the same tokenizer) on the
embedded shop task with the same reward (BM25 NDCG@10 from `ospo.reward`; for TRL a reward
function of the completions and each row's `qid`). Same work per step on both sides:

* 8 requests x 8 completions, exactly 32 new tokens each (min_new_tokens = max_new_tokens = 32,
  so EOS never fires), sampling at temperature 1, top-p 1, no top-k, on CPU in float32;
* group-normalised advantages, the clipped loss (eps 0.2 / 0.28), token-mean aggregation
  (TRL `loss_type="dapo"`), entropy computed, beta = 0 (no reference model), one update per
  batch (num_iterations = 1, no old log-prob pass), grad-norm clip 1.0, AdamW (torch), the
  same constant learning rate, no weight decay;
* the same requests in the same order (TRL: `shuffle_dataset=False`); TRL with no logging,
  evaluation, saving, gradient checkpointing or progress bar.

Our step is `ospo.step.RLStep`, the object `RLModule.training_step` calls, built by
`ospo.build.build_step` as `train.py` builds it (`baseline=grpo`, `rl.*` set to the settings
above, `rl.invalid_reward=null` since TRL's reward has no format gate; the LR schedule is made
constant with `rl.warmup_steps=0 rl.min_lr_ratio=1`): `Policy.generate(..., num_generations=G)`,
`Reward.evaluate`, the format check, `ospo.advantage.GRPO`, `Policy.token_logprobs(..., with_entropy=True,
group_size=G)`, `ospo.loss.PolicyLoss`, backward, clip, AdamW. Its stage times are the ones
`RLStep` records. Where it does the same work differently from TRL's:

* one prompt pass per request: the G completions of a request share its prompt, and a causal
  LM's states over the prompt do not depend on what follows, so `Policy.generate` prefills each
  request's prompt once and `Policy.token_logprobs(group_size=G)` runs each prompt through the
  backbone once (B rows, not N = B * G) and reuses its key/value cache, repeated G times, for
  the G completions (same log-probs and gradients up to float summation order). TRL runs all
  N prompt copies, in generation's prefill and in the loss forward;
* output layer only on completion positions: only the (N, T) hidden states that predict
  completion tokens go through the output layer. TRL 1.16's fused LM head keeps only the
  labelled positions with Triton on CUDA/XPU, but elsewhere, so in this CPU run, it projects
  every position of [prompt; completion] (N x (P + T - 1) rows) and masks afterwards.

The steps alternate: `trainer.train()` runs TRL, and a callback times each TRL step
(`on_step_begin` -> `on_step_end`: generation, reward, loss, backward, clip, optimizer) and then
runs and times our step of the same index. Medians over steps 3 and later.

Last line: ``ours_over_trl=<median our step / median TRL step>`` (target: at most 0.6).

    python benchmarks/vs_trl.py            # 8 steps each
    python benchmarks/vs_trl.py --steps 4  # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from ospo.build import build_data, build_policy, build_reward, build_step  # noqa: E402
from ospo.config import compose_config  # noqa: E402  (also registers the resolvers)
from ospo.optim import clip_grad_norm, optimization  # noqa: E402
from ospo.policy import Policy  # noqa: E402
from ospo.step import backward, step_seed  # noqa: E402

PROMPTS, GENERATIONS, NEW_TOKENS = 8, 8, 32
LR, GRAD_CLIP, EPS_LOW, EPS_HIGH = 5e-5, 1.0, 0.2, 0.28
SKIP = 2  # steps 1-2 are warm-up; medians over steps 3 and later


# ------------------------------------------------------------------------ timing
class Timer:
    """Accumulates wall time per named stage for the current step."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[name] += time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.now = dict(self.now), defaultdict(float)
        return out


class Ours:
    """Our GRPO step: `ospo.step.RLStep` on a Policy (mu = 1, beta = 0, float32)."""

    def __init__(self, cfg, policy: Policy, reward):
        self.policy = policy
        self.timer = tm = Timer()
        optim = optimization(policy, instantiate(cfg.rl.optimizer), instantiate(cfg.rl.scheduler))
        self.opt, self.sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        # timers around the step's own calls (the step itself is not re-implemented)
        self.clip = tm.wrap("clip", clip_grad_norm(cfg.rl.grad_clip))
        self.backward = tm.wrap("backward", backward)
        policy.token_logprobs = tm.wrap("forward+loss", policy.token_logprobs)
        self.step_fn = build_step(cfg, policy, reward)  # the step train.py builds
        generate = policy.model.generate

        def forced(*args, **kwargs):  # exactly NEW_TOKENS tokens, as TRL's min_new_tokens
            return generate(*args, **{**kwargs, "min_new_tokens": kwargs["max_new_tokens"]})

        policy.model.generate = tm.wrap("gen:model.generate", forced)
        policy.train()

    def step(self, prompts, seed: int) -> dict[str, float]:
        out = self.step_fn(
            prompts, seed, self.opt, self.sched, backward=self.backward, clip=self.clip
        )
        row = self.timer.take()
        row.update(out.seconds)
        # EOS is masked until NEW_TOKENS tokens, so every completion should have all of them;
        # report the count rather than assume it.
        row["tokens"] = float(out.rollouts.completion_mask.sum())
        return row


class Alternate(TrainerCallback):
    """Times each TRL step, then runs and times our step of the same index."""

    def __init__(self, ours: Ours, trl_timer: Timer, train, seed: int):
        self.ours, self.trl_timer, self.train, self.seed = ours, trl_timer, train, seed
        self.rows: dict[str, list[dict[str, float]]] = {"TRL": [], "ours": []}
        self.t0 = self.t_opt = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.trl_timer.take()
        self.t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.t_opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trl_timer.now["optimizer"] += time.perf_counter() - self.t_opt

    def on_step_end(self, args, state, control, **kwargs):
        step_s = time.perf_counter() - self.t0
        row = self.trl_timer.take()
        row["step"] = step_s
        self.rows["TRL"].append(row)
        k = len(self.rows["TRL"]) - 1
        prompts = self.train[k * PROMPTS : (k + 1) * PROMPTS]
        self.rows["ours"].append(self.ours.step(prompts, step_seed(self.seed, k)))
        print(
            f"step {k + 1}: "
            + ", ".join(f"{name} {rows[-1]['step']:.3f} s" for name, rows in self.rows.items()),
            flush=True,
        )


def make_trainer(folder: Path, train, reward, steps: int, seed: int, timer: Timer):
    from trl import GRPOConfig, GRPOTrainer

    by_qid = {s.qid: s for s in train}

    def ndcg_at_10(completions, qid, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        reward.clear_cache()
        return reward.score_texts(texts, [by_qid[q] for q in qid]).tolist()

    dataset = Dataset.from_list([{"prompt": s.messages, "qid": s.qid} for s in train])
    config = GRPOConfig(
        output_dir=str(folder / "trl"),
        max_steps=steps,
        per_device_train_batch_size=PROMPTS * GENERATIONS,  # completions per optimizer step
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        beta=0.0,
        num_iterations=1,
        epsilon=EPS_LOW,
        epsilon_high=EPS_HIGH,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=GRAD_CLIP,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        disable_dropout=True,
        shuffle_dataset=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        report_to="none",
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=str(folder / "policy"),
        reward_funcs=ndcg_at_10,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(folder / "policy"),
    )
    # stage timers on the trainer instance (the methods its training step calls)
    trainer._generate = timer.wrap("generate", trainer._generate)
    trainer._calculate_rewards = timer.wrap("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timer.wrap(
        "prepare (gen+reward+adv)", trainer._generate_and_score_completions
    )
    trainer.compute_loss = timer.wrap("forward+loss", trainer.compute_loss)
    trainer.accelerator.backward = timer.wrap("backward", trainer.accelerator.backward)
    trainer.model.generate = timer.wrap("gen:model.generate", trainer.model.generate)
    return trainer


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    timed = rows[SKIP:]
    return {k: statistics.median(r.get(k, 0.0) for r in timed) for k in timed[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="steps of each implementation")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.steps <= SKIP:
        raise SystemExit(f"--steps must exceed the {SKIP} warm-up steps, got {a.steps}")

    cfg = compose_config(
        [
            "model=tiny",
            "baseline=grpo",
            f"baseline.loss.eps_low={EPS_LOW}",
            f"baseline.loss.eps_high={EPS_HIGH}",
            "baseline.loss.aggregation=token_mean",
            f"seed={a.seed}",
            f"rl.prompts_per_step={PROMPTS}",
            f"rl.num_generations={GENERATIONS}",
            f"rl.max_new_tokens={NEW_TOKENS}",
            "rl.temperature=1.0",
            "rl.top_p=1.0",
            f"rl.lr={LR}",
            "rl.weight_decay=0.0",
            "rl.warmup_steps=0",
            "rl.min_lr_ratio=1.0",  # a constant learning rate, as TRL's "constant"
            f"rl.grad_clip={GRAD_CLIP}",
            "rl.invalid_reward=null",  # TRL's reward has no format gate (EOS never fires here)
            "rollout=hf",
        ]
    )
    data = build_data(cfg)
    train = data.splits["train"][: PROMPTS * a.steps]
    reward = build_reward(cfg.retriever, cfg.reward, data.catalog)
    torch.manual_seed(a.seed)
    policy = build_policy(cfg.model, data)
    import trl

    with tempfile.TemporaryDirectory(prefix="ospo_vs_trl_") as tmp:
        folder = Path(tmp)
        policy.save(folder / "policy")
        ours = Ours(cfg, policy, reward)
        trl_timer = Timer()
        trainer = make_trainer(folder, train, reward, a.steps, a.seed, trl_timer)
        alt = Alternate(ours, trl_timer, train, a.seed)
        trainer.add_callback(alt)
        print(
            f"trl {trl.__version__}, torch {torch.__version__}, threads "
            f"{torch.get_num_threads()}; {PROMPTS} prompts x {GENERATIONS} completions x "
            f"{NEW_TOKENS} tokens, float32, {sum(p.numel() for p in policy.parameters()):,} "
            "params"
        )
        trainer.train()

    med = {name: summary(rows) for name, rows in alt.rows.items()}
    print(f"\nmedian seconds over steps {SKIP + 1}-{a.steps}")
    print(f"{'stage':<28}" + "".join(f"{name:>9}" for name in med))
    stages = [
        "generate",
        "gen:model.generate",
        "reward",
        "advantage",
        "prepare (gen+reward+adv)",
        "forward+loss",
        "backward",
        "clip",
        "optimizer",
        "update",
        "step",
        "tokens",
    ]
    for stage in stages:
        cells = [m.get(stage) for m in med.values()]
        if any(c is not None for c in cells):
            print(
                f"{stage:<28}"
                + "".join(f"{c:9.3f}" if c is not None else f"{'-':>9}" for c in cells)
            )
    print(
        "ours `generate` = RLStep's rollout (prompt encoding, one prefill per request, "
        "model.generate, decode + token spans); TRL `generate` = GRPOTrainer._generate "
        "(templating, model.generate, decode); ours `forward+loss` = Policy.token_logprobs "
        "(the loss itself is inside `update`), `update` = log-probs, loss, backward, clip, "
        "AdamW and LR steps; TRL `optimizer` = optimizer.step only (its grad clip is in no "
        "stage); `tokens` = completion tokens per step (ours)"
    )
    trl_s = med["TRL"]["step"]
    print(f"ours_over_trl={med['ours']['step'] / trl_s:.3f}")


if __name__ == "__main__":
    main()
