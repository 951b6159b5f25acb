"""The LightningModules: on-policy RL (GRPO / OSPO) and the supervised warm-up.

They are the only place that knows the order of the stages (DESIGN.md section 4):

    prompts -> policy.generate (G per prompt) -> rollouts
            -> reward -> r (N,)
            -> [OSPO] segmenter -> coalition values -> attribution -> phi
            -> advantage estimator -> A (N, T)
            -> policy log-probs -> clipped loss (+KL) -> optimizer step; log

Every formula lives in the modules they call (`ospo.advantage`, `ospo.loss`, `ospo.attribution`,
`ospo.reward`); this file only orchestrates, times and logs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from ospo.advantage import frac_zero_std
from ospo.credit_html import credit_table_html
from ospo.data import Sample
from ospo.loss import policy_loss
from ospo.policy import Policy


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed for one rollout step, so a resumed run samples exactly what a straight run would."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class PromptSchedule:
    """Which requests each rollout step trains on: seeded epoch permutations, sharded by rank.

    Step s on rank r takes positions [(s * world + r) * B, ... + B) of the endless sequence
    made of one permutation of the training split per epoch. A pure function of (seed, step,
    rank), so resuming needs no data-loader state.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int, rank=0, world=1):
        if not samples:
            raise ValueError("the training split is empty: nothing to train on")
        self.samples, self.batch_size, self.seed = list(samples), batch_size, seed
        self.rank, self.world = rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self.samples))
        return self._perms[epoch]

    def __call__(self, step: int) -> list[Sample]:
        n = len(self.samples)
        start = (step * self.world + self.rank) * self.batch_size
        return [
            self.samples[self._perm(pos // n)[pos % n]]
            for pos in range(start, start + self.batch_size)
        ]


class _Steps(Dataset):
    """The training "data set" is just the rollout-step indices; prompts come from the schedule."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def sample_loader(samples: Sequence[Sample], batch_size: int) -> DataLoader:
    """Batches of `Sample`s (no collation: generation takes the chat messages)."""
    return DataLoader(list(samples), batch_size=batch_size, shuffle=False, collate_fn=list)


def step_loader(num_steps: int) -> DataLoader:
    return DataLoader(_Steps(num_steps), batch_size=None, shuffle=False)


@dataclass
class CreditStats:
    """What the credit stage cost and produced in one step (for logging)."""

    segments: list[int] = field(default_factory=list)
    coalitions: int = 0
    seconds: float = 0.0


def compute_credit(texts, samples, segmenter, attribution, reward, keep_query: bool):
    """Segment each completion and attribute its reward to the segments.

    Returns the segmentations, the attributions phi (one (n_i,) array each) and a CreditStats.
    Coalition values come from `reward.coalition_value_fn` (one batched call per completion).
    """
    t0 = time.perf_counter()
    stats = CreditStats()
    segmentations, phis = [], []
    for text, sample in zip(texts, samples, strict=True):
        seg = segmenter(text)
        base = sample.request if keep_query else ""
        value_fn = reward.coalition_value_fn(text, seg, sample, base_text=base)

        def counted(masks, _fn=value_fn):
            stats.coalitions += len(masks)
            return _fn(masks)

        phi = attribution(counted, seg.unions)
        segmentations.append(seg)
        phis.append(np.asarray(phi, dtype=np.float64))
        stats.segments.append(seg.n)
    stats.seconds = time.perf_counter() - t0
    return segmentations, phis, stats


class RLModule(pl.LightningModule):
    """On-policy GRPO / OSPO: one rollout step per `training_step`, `mu` updates per step."""

    def __init__(
        self,
        policy: Policy,
        train_samples: Sequence[Sample],
        reward,
        advantage,
        format_check,
        rl: dict[str, Any],
        baseline: dict[str, Any],
        seed: int = 0,
        segmenter=None,
        attribution=None,
        ref_policy: Policy | None = None,
        samples_dir: str | Path | None = None,
        init: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.policy = policy
        self.ref_policy = ref_policy
        self.train_samples = list(train_samples)
        self.reward, self.advantage, self.format_check = reward, advantage, format_check
        self.segmenter, self.attribution = segmenter, attribution
        self.rl, self.baseline, self.seed = dict(rl), dict(baseline), seed
        self.samples_dir = Path(samples_dir) if samples_dir else None
        self.init = dict(init or {})  # where the policy's frozen weights come from (for eval.py)
        self.automatic_optimization = False
        # Checkpoints keep only trainable weights (LoRA adapters, or everything when fully
        # fine-tuned): the frozen base is rebuilt from the warm-up folder.
        self.strict_loading = False
        self.rollout_step = 0
        self.val_history: list[dict[str, float]] = []
        self.wall_start = time.perf_counter()
        self.wall_offset = 0.0
        self._val_outputs: list[dict[str, Any]] = []
        self._schedule: PromptSchedule | None = None

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        self._schedule = PromptSchedule(
            self.train_samples,
            self.rl["prompts_per_step"],
            self.seed,
            rank=self.global_rank,
            world=self.trainer.world_size if self._trainer else 1,
        )
        if self.ref_policy is not None:
            self.ref_policy.requires_grad_(False).eval()

    def on_fit_start(self) -> None:
        self.policy.train()  # loaders return eval mode; dropout is off either way

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.rl["lr"], weight_decay=self.rl["weight_decay"])
        total = max(1, self.rl["steps"] * self.baseline["mu"])
        sched = get_cosine_with_min_lr_schedule_with_warmup(
            opt,
            num_warmup_steps=self.rl["warmup_steps"] * self.baseline["mu"],
            num_training_steps=total,
            min_lr_rate=self.rl["min_lr_ratio"],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def wall_seconds(self) -> float:
        return self.wall_offset + time.perf_counter() - self.wall_start

    # ------------------------------------------------------------- RL step
    def training_step(self, batch, batch_idx):
        rl, G = self.rl, self.rl["num_generations"]
        t_step = time.perf_counter()
        prompts = self._schedule(self.rollout_step)
        samples = [s for s in prompts for _ in range(G)]  # N = B * G, prompt-major

        # 1. rollouts
        torch.manual_seed(step_seed(self.seed, self.rollout_step, self.global_rank))
        t0 = time.perf_counter()
        ro = self.policy.generate(
            [s.messages for s in prompts],
            num_generations=G,
            max_new_tokens=rl["max_new_tokens"],
            temperature=rl["temperature"],
            top_p=rl["top_p"],
            do_sample=True,
        )
        t_gen = time.perf_counter() - t0
        mask = ro.completion_mask.float()  # (N, T)

        # 2. reward
        self.reward.clear_cache()
        rewards = self.reward.score_texts(ro.texts, samples)  # (N,)

        # 3. credit (OSPO)
        extra: dict[str, Any] = {}
        credit = CreditStats()
        if self.baseline["credit"]:
            segs, phis, credit = compute_credit(
                ro.texts,
                samples,
                self.segmenter,
                self.attribution,
                self.reward,
                self.baseline["keep_query"],
            )
            extra = {"token_spans": ro.token_spans, "segmentations": segs, "phis": phis}

        # 4. advantages
        adv = self.advantage(rewards, G, ro.completion_mask, **extra).to(mask)  # (N, T)

        # 5. policy updates
        old_logp = None
        ref_logp = None
        beta = self.baseline["loss"]["beta"]
        args = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        shared = {"group_size": G}  # one prompt pass per request
        if self.baseline["mu"] > 1:
            with torch.no_grad():
                old_logp = self.policy.token_logprobs(*args, **shared)  # (N, T)
        if beta > 0:
            with torch.no_grad():
                ref_logp = self.ref_policy.token_logprobs(*args, **shared)  # (N, T)
        opt, sched = self.optimizers(), self.lr_schedulers()
        t0 = time.perf_counter()
        for _ in range(self.baseline["mu"]):
            logp, entropy = self.policy.token_logprobs(*args, with_entropy=True, **shared)  # (N, T)
            loss, loss_metrics = policy_loss(
                logp,
                logp.detach() if old_logp is None else old_logp,
                adv,
                mask,
                eps_low=self.baseline["loss"]["eps_low"],
                eps_high=self.baseline["loss"]["eps_high"],
                beta=beta,
                ref_logp=ref_logp,
                aggregation=self.baseline["loss"]["aggregation"],
                max_completion_length=rl["max_new_tokens"],
                entropy=entropy.detach(),
            )
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(
                opt, gradient_clip_val=rl["grad_clip"], gradient_clip_algorithm="norm"
            )
            opt.step()
            sched.step()
        t_update = time.perf_counter() - t0

        # 6. log
        step_s = time.perf_counter() - t_step
        lengths = ro.completion_mask.sum(1).float()
        metrics = self.reward.metrics(ro.texts, samples)
        fmt = [self.format_check(t, bool(e)) for t, e in zip(ro.texts, ro.ended, strict=True)]
        log = {
            "train/reward_mean": float(np.mean(rewards)),
            "train/reward_std": float(np.std(rewards)),
            "train/frac_reward_zero_std": frac_zero_std(rewards, G),
            "train/loss": float(loss.detach()),
            "train/completion_length": float(lengths.mean()),
            "train/format_ok": float(np.mean(fmt)),
            "train/tokens_per_s": float(mask.sum() / max(step_s, 1e-9)),
            "time/step_s": step_s,
            "time/generate_s": t_gen,
            "time/update_s": t_update,
            "time/attribution_share": credit.seconds / max(step_s, 1e-9),
            "credit/coalitions": float(credit.coalitions),
            "credit/segments_per_completion": float(np.mean(credit.segments))
            if credit.segments
            else 0.0,
        }
        log.update({f"train/{k}": float(np.mean(v)) for k, v in metrics.items()})
        log.update({f"train/{k}": v for k, v in loss_metrics.items()})
        log.update(
            {
                f"advantage/{k}": float(v)
                for k, v in self.advantage.last_stats.items()
                if k not in ("frac_reward_zero_std", "reward_mean", "reward_std")
            }
        )
        self.log_dict(log, on_step=True, batch_size=len(samples))
        self.log("reward", log["train/reward_mean"], prog_bar=True, logger=False)
        self.rollout_step += 1
        return None

    # ----------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: list[Sample], batch_idx: int):
        ro = self.policy.generate(
            [s.messages for s in batch],
            num_generations=1,
            max_new_tokens=self.rl["max_new_tokens"],
            do_sample=False,
        )
        metrics = self.reward.metrics(ro.texts, batch)
        ended = [bool(e) for e in ro.ended]
        for i, s in enumerate(batch):
            row = {k: float(v[i]) for k, v in metrics.items()}
            row["format_ok"] = float(self.format_check(ro.texts[i], ended[i]))
            self._val_outputs.append({"sample": s, "text": ro.texts[i], "metrics": row})

    def on_validation_epoch_end(self) -> None:
        rows = self._val_outputs
        if not rows:
            return
        keys = rows[0]["metrics"].keys()
        agg = {f"val/{k}": float(np.mean([r["metrics"][k] for r in rows])) for k in keys}
        for k, v in agg.items():
            self.log(k, v, sync_dist=True, prog_bar=k.startswith("val/ndcg"))
        if self.trainer.sanity_checking:
            return
        self.val_history.append({"step": self.rollout_step, "wall_s": self.wall_seconds(), **agg})
        self._log_credit_table(rows[: self.rl["log_samples"]])

    def _log_credit_table(self, rows) -> None:
        """Colour each segment of a few validation completions by its credit (HTML)."""
        if self.segmenter is None or self.attribution is None or not rows:
            return
        texts = [r["text"] for r in rows]
        samples = [r["sample"] for r in rows]
        segs, phis, _ = compute_credit(
            texts,
            samples,
            self.segmenter,
            self.attribution,
            self.reward,
            self.baseline["keep_query"],
        )
        html = credit_table_html(
            [s.request for s in samples],
            texts,
            segs,
            phis,
            [r["metrics"] for r in rows],
            title=f"rollout step {self.rollout_step}",
        )
        if self.samples_dir is not None and self.global_rank == 0:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            (self.samples_dir / f"credit_step{self.rollout_step:04d}.html").write_text(html)
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log(
                    {"val/credit_table": wandb.Html(html), "trainer/global_step": self.global_step}
                )

    # ---------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }
        state = {
            "rollout_step": self.rollout_step,
            "val_history": copy.deepcopy(self.val_history),
            "wall_s": self.wall_seconds(),
            "init": self.init,
        }
        rng = getattr(self.attribution, "rng", None)
        if rng is not None:
            state["attribution_rng"] = rng.bit_generator.state
        checkpoint["ospo"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ospo", {})
        self.rollout_step = int(state.get("rollout_step", 0))
        self.val_history = list(state.get("val_history", []))
        self.wall_offset = float(state.get("wall_s", 0.0))
        self.wall_start = time.perf_counter()
        rng = getattr(self.attribution, "rng", None)
        if rng is not None and "attribution_rng" in state:
            rng.bit_generator.state = state["attribution_rng"]


class SFTModule(pl.LightningModule):
    """Supervised warm-up: next-token loss on the demonstration, prompt tokens masked out."""

    def __init__(self, policy: Policy, sft: dict[str, Any], max_steps: int):
        super().__init__()
        self.policy, self.sft, self.max_steps = policy, dict(sft), max_steps

    def on_fit_start(self) -> None:
        self.policy.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        out = self.policy.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        self.log("sft/loss", out.loss, prog_bar=True, on_step=True, batch_size=len(batch["labels"]))
        return out.loss

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.sft["lr"], weight_decay=self.sft["weight_decay"])
        sched = get_cosine_with_min_lr_schedule_with_warmup(
            opt,
            num_warmup_steps=self.sft["warmup_steps"],
            num_training_steps=self.max_steps,
            min_lr_rate=0.1,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
