"""The warm-up stage: supervised fine-tuning on demonstrations before RL.

The policy learns to write one-line queries by imitating the data set's demonstrations
(prompt tokens masked out of the loss), is checked on the validation requests (format_ok
target `sft.min_format_ok`), and is saved with LoRA merged into a cache folder keyed by a hash
of everything that shapes it (data, model, `sft`, format, seed, trainer precision), so runs
that differ only in RL settings share one warm-up.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from ospo.build import build_policy, build_trainer
from ospo.config import config_hash
from ospo.data import Dataset, Sample
from ospo.evaluate import GreedyEvaluator, validation_requests
from ospo.io import write_json
from ospo.optim import optimization
from ospo.policy import Policy

log = logging.getLogger("ospo")

WARMUP_MARKER = "warmup.json"  # written last into a warm-up folder: its scores and config


def warmup_dir(cfg: DictConfig) -> Path:
    """The warm-up folder: `sft.init` when set, else the cache entry for these settings."""
    if cfg.sft.init:
        return Path(cfg.sft.init)
    key = config_hash(cfg.data, cfg.model, cfg.sft, cfg.format, cfg.seed, cfg.trainer.precision)
    return Path(cfg.cache_dir) / "warmup" / key


class SFTCollator:
    """Chat prompt + demonstration + EOS, right-padded; loss only on the demonstration."""

    def __init__(self, policy: Policy, max_length: int):
        self.policy, self.max_length = policy, max_length
        tok = policy.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos = tok.eos_token_id

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        tok = self.policy.tokenizer
        prompts = self.policy.chat_prompts([s.messages for s in samples])
        rows = []
        for prompt, s in zip(prompts, samples, strict=True):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            d = tok(s.demo, add_special_tokens=False)["input_ids"] + [self.eos]
            ids = (p + d)[: self.max_length]
            labels = ([-100] * len(p) + d)[: self.max_length]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # (B, L)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, L)
        attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class SFTModule(pl.LightningModule):
    """Next-token loss on the demonstration, prompt tokens masked out (labels -100).

    `optimizer` and `scheduler` are the config's `sft.optimizer` / `sft.scheduler` partials.
    """

    def __init__(self, policy: Policy, optimizer: Callable, scheduler: Callable):
        super().__init__()
        self.policy = policy
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

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
        return optimization(self.policy, self.optimizer_factory, self.scheduler_factory)


def run_sft(cfg: DictConfig, data: Dataset, evaluator: GreedyEvaluator, run_dir: Path) -> Path:
    """Train the warm-up, check it on the validation requests, write it to `warmup_dir(cfg)`."""
    out = warmup_dir(cfg)
    demos = [s for s in data.splits["train"] if s.demo]
    if not demos:
        raise ValueError(
            f"data={data.name} has no demonstrations for the warm-up: set data.demos_path to a "
            "JSONL written by `python -m ospo.demos`, or run stage=rl from a checkpoint"
        )
    pl.seed_everything(cfg.seed, workers=True)
    policy = build_policy(cfg.model, data, cfg.trainer.get("precision"))
    module = SFTModule(policy, instantiate(cfg.sft.optimizer), instantiate(cfg.sft.scheduler))
    loader = DataLoader(
        demos,
        batch_size=cfg.sft.batch_size,
        shuffle=True,
        collate_fn=SFTCollator(policy, cfg.sft.max_length),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    trainer = build_trainer(
        cfg,
        run_dir / "sft",
        single=True,
        max_steps=cfg.sft.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[TQDMProgressBar(refresh_rate=1)],
    )
    log.info("warm-up: %d steps of %d demonstrations", cfg.sft.steps, cfg.sft.batch_size)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = {"train": time.perf_counter() - t0}

    t0 = time.perf_counter()
    scores = check_warmup(cfg, policy, data, evaluator)
    seconds["check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy.save(out)  # merged weights, atomically
    seconds["save"] = time.perf_counter() - t0
    # written last: a folder without its marker is an unfinished warm-up and is redone
    write_json(
        out / WARMUP_MARKER, {"val": scores, "config": OmegaConf.to_container(cfg, resolve=True)}
    )
    write_json(run_dir / WARMUP_MARKER, {"dir": str(out), "val": scores, "seconds": seconds})
    del trainer, module, policy  # RL reloads the merged weights: free these before it starts
    gc.collect()
    return out


def check_warmup(
    cfg: DictConfig, policy: Policy, data: Dataset, evaluator: GreedyEvaluator
) -> dict[str, Any]:
    """Greedy expansions of the validation requests: format_ok against `sft.min_format_ok`."""
    scores = evaluator(policy, validation_requests(cfg, data), desc="warm-up check").means()
    verdict = "ok" if scores["format_ok"] >= cfg.sft.min_format_ok else "BELOW TARGET"
    print(
        f"warm-up: format_ok={scores['format_ok']:.3f} (target {cfg.sft.min_format_ok}, "
        f"{verdict}) val ndcg@10={scores['ndcg@10']:.4f}"
    )
    if verdict != "ok":
        log.warning(
            "the warm-up reached format_ok=%.3f < sft.min_format_ok=%.2f; consider more sft.steps",
            scores["format_ok"],
            cfg.sft.min_format_ok,
        )
    return scores
