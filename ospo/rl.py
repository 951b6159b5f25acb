"""The RL stage and `python train.py`: warm-up if needed, RL, test scores, summary.json.

validate config -> data, reward, method (fails fast) -> warm-up (cached) -> policy
-> RLStep + RLModule -> validate, fit (resumable from ckpt_path), validate
-> greedy test expansions scored with the training and held-out retrievers -> summary.json
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from ospo.build import (
    build_baseline,
    build_callbacks,
    build_credit,
    build_data,
    build_loggers,
    build_policy,
    build_reward,
    build_step,
    build_trainer,
    load_warm_policy,
)
from ospo.config import validate
from ospo.evaluate import (
    GreedyEvaluator,
    build_evaluator,
    held_out_rewards,
    test_requests,
    validation_requests,
)
from ospo.io import write_json
from ospo.module import RLModule, sample_loader, step_loader
from ospo.provenance import hydra_overrides, provenance
from ospo.sft import WARMUP_MARKER, run_sft, warmup_dir

log = logging.getLogger("ospo")

# Lightning notes that do not apply here: checkpoints are meant to hold the post-update state,
# and the policy's dropout is disabled, so train/eval mode is immaterial.
for _msg in (
    "Using ModelCheckpoint with manual optimization",
    r"Found \d+ module\(s\) in eval mode",
    ".*LeafSpec.* is deprecated",
    "The number of training batches",
):
    warnings.filterwarnings("ignore", message=_msg)


def _choice(group: str) -> str:
    """The option picked for a config group in this run (e.g. `owen`), when Hydra knows it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError):
        return group


def run_train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`python train.py`: warm-up if needed, RL, final test scores, summary.json (with the
    run's overrides, config, commit and versions: :func:`ospo.provenance.provenance`)."""
    validate(cfg)
    run_dir = Path(run_dir)
    made_by = provenance(cfg, hydra_overrides())  # the code this run imported, not a later one
    t_start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    data = build_data(cfg)
    reward = build_reward(cfg.retriever, cfg.reward, data.catalog)
    format_check = instantiate(cfg.format)
    evaluator = build_evaluator(cfg, reward, format_check)
    build_credit(cfg, build_baseline(cfg))  # an unaffordable exact attribution fails here

    init = warmup_dir(cfg)
    if cfg.stage in ("all", "sft") and not (init / WARMUP_MARKER).exists():
        if cfg.sft.init:
            raise FileNotFoundError(f"sft.init={cfg.sft.init}: no warm-up checkpoint there")
        init = run_sft(cfg, data, evaluator, run_dir)
    elif cfg.stage != "rl":
        log.info("warm-up found in cache: %s", init)
    if cfg.stage == "sft":
        return {"warmup_dir": str(init)}

    pl.seed_everything(cfg.seed, workers=True)
    precision = cfg.trainer.get("precision")
    if (init / WARMUP_MARKER).exists():
        policy, init_info = load_warm_policy(cfg.model, init, precision), {"dir": str(init)}
    else:
        log.warning("no warm-up checkpoint at %s: RL starts from the base model", init)
        policy, init_info = build_policy(cfg.model, data, precision), {"dir": None}
    init_info["model"] = OmegaConf.to_container(cfg.model, resolve=True)
    step = build_step(cfg, policy, reward)
    step.engine.check_prompts(policy, data.split("train"), cfg.rl.max_new_tokens)
    baseline = step.baseline
    module = RLModule(
        step,
        data.splits["train"],
        evaluator,
        optimizer=instantiate(cfg.rl.optimizer),
        scheduler=instantiate(cfg.rl.scheduler),
        prompts_per_step=cfg.rl.prompts_per_step,
        grad_clip=cfg.rl.grad_clip,
        log_samples=cfg.rl.log_samples,
        seed=cfg.seed,
        samples_dir=run_dir / "samples",
        init=init_info,
    )
    val_loader = sample_loader(validation_requests(cfg, data), cfg.eval.batch_size)
    loggers = build_loggers(cfg)
    trainer = build_trainer(
        cfg,
        run_dir,
        max_steps=cfg.rl.steps * baseline.mu,
        max_epochs=-1,
        val_check_interval=cfg.rl.val_every,
        logger=loggers,
        callbacks=build_callbacks(cfg),
    )
    try:
        if cfg.ckpt_path is None:
            trainer.validate(module, val_loader, verbose=False)
        trainer.fit(
            module,
            train_dataloaders=step_loader(cfg.rl.steps),
            val_dataloaders=val_loader,
            ckpt_path=cfg.ckpt_path,
        )
        if not module.val_history or module.val_history[-1]["step"] != module.rollout_step:
            trainer.validate(module, val_loader, verbose=False)

        label = cfg.get("label") or baseline.name
        if baseline.needs_credit and not cfg.get("label"):
            label += f"-{_choice('attribution')}-{_choice('segmenter')}"
        summary: dict[str, Any] = {
            "steps": module.rollout_step,
            "method": baseline.name,
            "label": label,
            "seed": cfg.seed,
        }
        if trainer.is_global_zero:
            summary.update(final_scores(cfg, module, data, evaluator))
            summary.update(
                {
                    "wall_s": time.perf_counter() - t_start,
                    "rl_wall_s": module.wall_seconds(),
                    "warmup_dir": init_info["dir"],
                    "last_ckpt": str(run_dir / "checkpoints" / "last.ckpt"),
                    **made_by,
                }
            )
            write_json(run_dir / "summary.json", summary)
            k, split = 10, cfg.eval.split
            print(
                f"val ndcg@{k}: {summary[f'val_ndcg@{k}_start']:.4f} -> "
                f"{summary[f'val_ndcg@{k}_end']:.4f}  |  {split} ndcg@{k}: "
                f"{summary[split]['train'][f'ndcg@{k}']:.4f}  |  {summary['wall_s']:.0f} s  |  "
                f"{run_dir}"
            )
        return summary
    finally:
        step.engine.close()  # a vLLM engine and its folder, so the next job of a sweep starts clean
        for logger in loggers:  # close W&B runs so that each job of a sweep gets its own run
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()


def final_scores(
    cfg: DictConfig, module: RLModule, data, evaluator: GreedyEvaluator
) -> dict[str, Any]:
    """Validation history and greedy test-split scores: with the training retriever (`train`)
    and each held-out one of `eval.retrievers`."""
    k = 10  # the headline metric, NDCG@10, whatever the reward's own cut-off
    split = cfg.eval.split
    test = test_requests(cfg, data)
    ev = evaluator(module.policy, test, desc=f"{split} scores")
    scores = {"train": ev.means()}
    scores.update(evaluator.with_retrievers(ev.texts, ev.ended, test, held_out_rewards(cfg, data)))
    hist = module.val_history
    return {
        f"val_ndcg@{k}_start": hist[0][f"val/ndcg@{k}"],
        f"val_ndcg@{k}_end": hist[-1][f"val/ndcg@{k}"],
        "val_format_ok_end": hist[-1].get("val/format_ok"),
        **module.credit_summary(),
        "val_history": hist,
        **{f"{split}_{m}": v for m, v in scores["train"].items()},
        split: scores,
    }
