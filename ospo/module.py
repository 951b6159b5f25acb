"""The RL LightningModule: one `ospo.step.RLStep` per training step, validation, checkpoints.

It holds no formula: the step's parts live in `ospo.step` (and the maths they call in
`ospo.advantage`, `ospo.loss`, `ospo.attribution`, `ospo.reward`); this class feeds the step its
prompts, seed, optimizer and schedule, logs what it returns (TRL's metric names), scores
greedy expansions at validation with the run's `ospo.evaluate.GreedyEvaluator`, and keeps the
run's state in the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import WandbLogger
from torch.utils.data import DataLoader, Dataset

from ospo.credit_html import credit_table_html
from ospo.data import Sample
from ospo.io import write_text
from ospo.optim import optimization
from ospo.step import (
    PromptSchedule,
    RLStep,
    StepResult,
    compute_credit,
    step_seed,
)

if TYPE_CHECKING:  # built by ospo.evaluate (a layer above), passed in by ospo.rl
    from ospo.evaluate import GreedyEvaluator

_log = logging.getLogger("ospo")


# ------------------------------------------------------------ credit diagnostics
def informative_pair(cos: float, frac_reward_zero_std: float) -> tuple[float, float]:
    """One rank's share of a step's `credit/cos_to_grpo`: `(cos, 1.0)` when at least one of its
    groups had unequal rewards, `(0.0, 0.0)` when every group was flat (all advantages 0, so
    the estimator's cosine is 1 by convention and says nothing about the credit)."""
    flag = 1.0 if frac_reward_zero_std < 1.0 else 0.0
    return cos * flag, flag


def pooled_mean(pairs: Iterable[tuple[float, float]]) -> float | None:
    """`sum(s) / sum(c)` over `(s, c)` pairs, e.g. the ranks' `informative_pair`s; None when no
    pair counts (no informative rank), never a made-up 1.0."""
    pairs = list(pairs)
    count = sum(c for _, c in pairs)
    return sum(s for s, _ in pairs) / count if count > 0 else None


def rank_rng(seed: int, rank: int) -> np.random.Generator:
    """The random stream of process `rank` for a component seeded with `seed`: rank 0 keeps
    `default_rng(seed)` (one process draws what it always drew), rank r > 0 draws from
    `default_rng([seed, r])`, so data-parallel ranks do not repeat each other's draws."""
    return np.random.default_rng(seed if rank == 0 else [seed, rank])


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


class RLModule(pl.LightningModule):
    """On-policy GRPO / OSPO: one rollout step per `training_step`, `baseline.mu` updates each.

    `optimizer` and `scheduler` are the config's `rl.optimizer` / `rl.scheduler` partials:
    `optimizer(params)` and `scheduler(optimizer)`.
    """

    def __init__(
        self,
        step: RLStep,
        train_samples: Sequence[Sample],
        evaluator: GreedyEvaluator,
        optimizer: Callable,
        scheduler: Callable,
        prompts_per_step: int,
        grad_clip: float,
        log_samples: int = 8,
        seed: int = 0,
        samples_dir: str | Path | None = None,
        init: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.rl_step = step
        self.policy = step.policy  # registered here: checkpoints hold `policy.*` weights
        self.ref_policy = step.ref_policy
        self.train_samples = list(train_samples)
        self.evaluator = evaluator
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.prompts_per_step, self.grad_clip = prompts_per_step, grad_clip
        self.log_samples, self.seed = log_samples, seed
        self.samples_dir = Path(samples_dir) if samples_dir else None
        self.init = dict(init or {})  # where the policy's frozen weights come from (for eval.py)
        self.automatic_optimization = False
        # Checkpoints keep only trainable weights (LoRA adapters, or everything when fully
        # fine-tuned): the frozen base is rebuilt from the warm-up folder.
        self.strict_loading = False
        self.rollout_step = 0
        self.val_history: list[dict[str, float]] = []
        # credit/cos_to_grpo of each informative rollout step (a group with unequal rewards on
        # some rank), averaged over the ranks that had one; the same list on every rank
        self.cos_to_grpo: list[float] = []
        self._rank_streams_seeded = False
        self.wall_start = time.perf_counter()
        self.wall_offset = 0.0
        self._val_outputs: list[dict[str, Any]] = []
        self._schedule: PromptSchedule | None = None

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        self._schedule = PromptSchedule(
            self.train_samples,
            self.prompts_per_step,
            self.seed,
            rank=self.global_rank,
            world=self.trainer.world_size if self._trainer else 1,
        )
        if self.ref_policy is not None:
            self.ref_policy.requires_grad_(False).eval()
        self._seed_rank_streams(self.global_rank)

    def _seed_rank_streams(self, rank: int) -> None:
        """Give rank r > 0 its own random streams (`rank_rng`): the configs seed every rank's
        Monte-Carlo attribution and random credit with the same `seed`. Rank 0's generators are
        left as built. Once per module (`setup` runs for each validate and fit); a checkpoint
        restores the streams afterwards (`on_load_checkpoint`)."""
        if self._rank_streams_seeded:
            return
        self._rank_streams_seeded = True
        if rank == 0:
            return
        for owner in self._rng_owners().values():
            seed = getattr(owner, "seed", None)
            if isinstance(seed, (int, np.integer)):
                owner.rng = rank_rng(int(seed), rank)

    def on_fit_start(self) -> None:
        self.policy.train()  # loaders return eval mode; dropout is off either way

    def configure_optimizers(self):
        return optimization(self.policy, self.optimizer_factory, self.scheduler_factory)

    def wall_seconds(self) -> float:
        return self.wall_offset + time.perf_counter() - self.wall_start

    # ------------------------------------------------------------- RL step
    def training_step(self, batch, batch_idx):
        out = self.rl_step(
            self._schedule(self.rollout_step),
            step_seed(self.seed, self.rollout_step, self.global_rank),
            self.optimizers(),
            self.lr_schedulers(),
            backward=self.manual_backward,
            clip=self._clip,
        )
        self.log_dict(self._step_log(out), on_step=True, batch_size=len(out.samples))
        self.log("reward", float(np.mean(out.rewards)), prog_bar=True, logger=False)
        self.rollout_step += 1
        return None

    def _clip(self, optimizer) -> None:
        self.clip_gradients(
            optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
        )

    def _step_log(self, out: StepResult) -> dict[str, float]:
        """The step's metrics under TRL's names (train/, time/, credit/, advantage/), all read
        from what the step returned."""
        ro, s, stats = out.rollouts, out.seconds, out.advantage_stats
        step_s = max(s["step"], 1e-9)
        log = {
            "train/reward_mean": stats["reward_mean"],
            "train/reward_std": stats["reward_std"],
            "train/frac_reward_zero_std": stats["frac_reward_zero_std"],
            "train/loss": float(out.loss.detach()),
            "train/completion_length": float(ro.completion_mask.sum(1).float().mean()),
            "train/format_ok": float(np.mean(out.well_formed)),
            "train/tokens_per_s": float(ro.completion_mask.sum() / step_s),
            "time/step_s": s["step"],
            "time/generate_s": s["generate"],
            "time/sync_s": s["sync"],
            "time/reward_s": s["reward"],
            "time/credit_s": s["credit"],
            "time/update_s": s["update"],
            "time/attribution_share": s["credit"] / step_s,
            "credit/coalitions": float(out.credit.coalitions),
            "credit/segments_per_completion": float(np.mean(out.credit.segments))
            if out.credit.segments
            else 0.0,
        }
        # NaN on a step where every group was flat: its cosine (1 by convention) says nothing
        # about the credit, and a key left out would repeat the last step's value (Lightning
        # logs an on_step key's last value again); loggers draw NaN as a gap
        cos = self._credit_cos(stats)
        log["credit/cos_to_grpo"] = math.nan if cos is None else cos
        log.update({f"train/{k}": float(np.mean(v)) for k, v in out.metrics.items()})
        log.update({f"train/{k}": v for k, v in out.loss_metrics.items()})
        log.update(
            {
                f"advantage/{k}": float(v)
                for k, v in stats.items()
                if k not in ("frac_reward_zero_std", "reward_mean", "reward_std", "cos_to_grpo")
            }
        )
        return log

    def _credit_cos(self, stats: dict[str, float]) -> float | None:
        """The step's cosine to GRPO averaged over the ranks with an informative step (a
        collective: every rank calls it once per step), appended to `self.cos_to_grpo`; None,
        and nothing appended, when every group on every rank was flat."""
        pair = informative_pair(float(stats["cos_to_grpo"]), float(stats["frac_reward_zero_std"]))
        cos = pooled_mean([self._reduce_sum(pair)])
        if cos is not None:
            self.cos_to_grpo.append(cos)
        return cos

    def _reduce_sum(self, pair: tuple[float, float]) -> tuple[float, float]:
        """`pair` summed over the data-parallel ranks (the identity in one process)."""
        if self._trainer is None:
            return pair
        t = torch.tensor(pair, dtype=torch.float64, device=self.device)
        t = self.trainer.strategy.reduce(t, reduce_op="sum")
        return float(t[0]), float(t[1])

    def credit_summary(self) -> dict[str, Any]:
        """`credit_cos_to_grpo`, the run mean of `credit/cos_to_grpo` over informative steps
        (None when there was none), and `credit_cos_to_grpo_steps`, how many entered it."""
        cos = self.cos_to_grpo
        return {
            "credit_cos_to_grpo": float(np.mean(cos)) if cos else None,
            "credit_cos_to_grpo_steps": len(cos),
        }

    # ----------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: list[Sample], batch_idx: int):
        ev = self.evaluator(self.policy, batch, desc="validation")
        for i, s in enumerate(batch):
            row = {k: float(v[i]) for k, v in ev.rows.items()}
            self._val_outputs.append({"sample": s, "text": ev.texts[i], "metrics": row})

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
        self._log_credit_table(rows[: self.log_samples])

    def _log_credit_table(self, rows) -> None:
        """Colour each segment of a few validation completions by its credit (HTML)."""
        if self.rl_step.segmenter is None or self.rl_step.attribution is None or not rows:
            return
        texts = [r["text"] for r in rows]
        samples = [r["sample"] for r in rows]
        credit = compute_credit(
            texts,
            samples,
            self.rl_step.segmenter,
            self.rl_step.attribution,
            self.rl_step.reward,
            self.rl_step.baseline.keep_query,
        )
        html = credit_table_html(
            [s.request for s in samples],
            texts,
            credit.segmentations,
            credit.phis,
            [r["metrics"] for r in rows],
            title=f"rollout step {self.rollout_step}",
        )
        if self.samples_dir is not None and self.global_rank == 0:
            write_text(self.samples_dir / f"credit_step{self.rollout_step:04d}.html", html)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
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
            "cos_to_grpo": list(self.cos_to_grpo),
            "wall_s": self.wall_seconds(),
            "init": self.init,
        }
        rngs = {name: rng.bit_generator.state for name, rng in self._rngs().items()}
        for name, rng_state in rngs.items():
            state[f"{name}_rng"] = rng_state  # this rank's (rank 0's in the saved file)
        every_rank = self._gather_objects(rngs)  # a collective: all ranks save checkpoints
        if every_rank is not None:
            for name in rngs:
                state[f"{name}_rng_ranks"] = [r[name] for r in every_rank]
        checkpoint["ospo"] = state

    def _gather_objects(self, obj: Any) -> list[Any] | None:
        """`obj` of every rank, in rank order, under DDP; None in one process."""
        if self._trainer is None or self.trainer.world_size < 2:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ospo", {})
        self.rollout_step = int(state.get("rollout_step", 0))
        self.val_history = list(state.get("val_history", []))
        self.wall_offset = float(state.get("wall_s", 0.0))
        self.wall_start = time.perf_counter()
        self.cos_to_grpo = list(state.get("cos_to_grpo", []))
        rank = self.global_rank
        for name, rng in self._rngs().items():
            ranks = state.get(f"{name}_rng_ranks")
            if ranks is not None and rank < len(ranks):
                rng.bit_generator.state = ranks[rank]
            elif rank == 0 and f"{name}_rng" in state:
                rng.bit_generator.state = state[f"{name}_rng"]
            elif f"{name}_rng" in state:  # saved by fewer ranks: keep this rank's own stream
                _log.warning("rank %d: no saved %s generator, it starts afresh", rank, name)

    def _rng_owners(self) -> dict[str, Any]:
        owners = {
            "attribution": self.rl_step.attribution,
            "advantage": self.rl_step.baseline.advantage,
        }
        return {k: o for k, o in owners.items() if getattr(o, "rng", None) is not None}

    def _rngs(self) -> dict[str, np.random.Generator]:
        """Random streams that live across steps (Monte-Carlo attribution, random credit), so
        a resumed run draws what a straight run would: each rank's under DDP
        (`<name>_rng_ranks`), rank 0's alone in one process (`<name>_rng`)."""
        return {k: o.rng for k, o in self._rng_owners().items()}


__all__ = [
    "RLModule",
    "informative_pair",
    "pooled_mean",
    "rank_rng",
    "sample_loader",
    "step_loader",
]
