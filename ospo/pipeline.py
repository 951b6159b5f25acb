"""Stages of a run, built from the Hydra config: warm-up (SFT), RL, evaluation.

`train.py` and `eval.py` are thin wrappers around `run_train` and `run_eval`. Objects come from
the config groups through `hydra.utils.instantiate`; runtime arguments (the catalog, the
retriever, the training texts) are passed at that call.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import numpy as np
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ospo.config import CONF_DIR, config_hash, validate
from ospo.data import Dataset, Sample
from ospo.format import FormatCheck
from ospo.module import RLModule, SFTModule, sample_loader, step_loader
from ospo.policy import Policy, load_hf

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


# ------------------------------------------------------------------ small utilities
def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a crash leaves the previous file, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def _is_tiny(model_cfg: DictConfig) -> bool:
    return str(model_cfg.get("_target_", "")).endswith("build_tiny")


def build_data(cfg: DictConfig):
    t0 = time.perf_counter()
    data = instantiate(cfg.data)
    sizes = {k: len(v) for k, v in data.splits.items()}
    log.info(
        "data %s: %d products, splits %s (%.1f s)",
        data.name,
        len(data.catalog),
        sizes,
        time.perf_counter() - t0,
    )
    return data


def build_reward(retriever_cfg: DictConfig, reward_cfg: DictConfig, catalog: dict[str, str]):
    """A retriever indexed on the catalog, wrapped by the reward metric."""
    retriever = instantiate(retriever_cfg)
    retriever.index(catalog)
    return instantiate(reward_cfg, retriever=retriever)


def base_policy(cfg: DictConfig, data) -> Policy:
    """The policy before any training: the configured model (tiny: tokenizer fit on the data)."""
    if _is_tiny(cfg.model):
        texts = list(data.catalog.values())
        texts += [s.demo for s in data.splits["train"] if s.demo]
        texts += [s.request for s in data.splits["train"]]
        return instantiate(cfg.model, texts=texts)
    return instantiate(cfg.model)


def warm_policy(cfg: DictConfig, path: Path) -> Policy:
    """The warm-up checkpoint (merged weights) with fresh LoRA adapters if configured."""
    return load_hf(
        str(path),
        dtype=cfg.model.get("dtype", "float32"),
        lora=OmegaConf.to_container(cfg.model.lora) if cfg.model.get("lora") else None,
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
    )


def warmup_dir(cfg: DictConfig) -> Path:
    """Cache folder of the warm-up for these data/model/warm-up settings."""
    if cfg.sft.init:
        return Path(cfg.sft.init)
    model = str(cfg.model._target_).rsplit(".", 1)[-1]
    key = config_hash(cfg.data, cfg.model, cfg.sft, cfg.format, cfg.seed)
    return Path(cfg.cache_dir) / "warmup" / f"{model}-{key}"


def _choice(group: str) -> str:
    """The option picked for a config group in this run (e.g. `owen`), when Hydra knows it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError):
        return group


def _retriever_cfg(name: str, conf_dir: Path = CONF_DIR) -> DictConfig:
    """`conf/retriever/<name>.yaml`, for scoring with a retriever other than the training one."""
    path = Path(conf_dir) / "retriever" / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"eval.retrievers names {name!r}: expected one of {choices}")
    return OmegaConf.load(path)


def make_trainer(cfg: DictConfig, run_dir: Path, single: bool = False, **kw) -> pl.Trainer:
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if single:  # the warm-up and evaluation run in one process
        tcfg.update(devices=1, strategy="auto")
    tcfg.update(kw)
    tcfg.setdefault("default_root_dir", str(run_dir))
    return instantiate(tcfg)


# ------------------------------------------------------------------ generation + scoring
def autocast_for(cfg: DictConfig, policy: Policy):
    """The trainer's mixed precision, for generation outside the Lightning loop."""
    bf16 = str(cfg.trainer.get("precision", "32")).startswith("bf16")
    return torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def generate_all(
    policy: Policy,
    samples: Sequence[Sample],
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    desc: str = "generate",
):
    """One completion per request, batched. Returns texts and whether each ended on EOS."""
    texts, ended = [], []
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        batch = samples[i : i + batch_size]
        ro = policy.generate(
            [s.messages for s in batch],
            num_generations=1,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
        )
        texts += ro.texts
        ended += [bool(e) for e in ro.ended]
    return texts, ended


def score_all(texts, samples, reward, format_check, ended) -> dict[str, float]:
    """Mean ranking metrics and format_ok rate of one completion per request."""
    metrics = reward.metrics(texts, samples)
    out = {k: float(np.mean(v)) for k, v in metrics.items()}
    out["format_ok"] = float(
        np.mean([format_check(t, e) for t, e in zip(texts, ended, strict=True)])
    )
    return out


def validation_requests(cfg: DictConfig, data: Dataset) -> list[Sample]:
    """The first ``rl.val_size`` validation requests (all when 0): the warm-up check and the
    RL validation score the same ones."""
    val = data.splits["val"]
    return val[: cfg.rl.val_size] if cfg.rl.val_size else val


def expand_test_split(
    cfg: DictConfig, policy: Policy, data: Dataset, desc: str, **sampling: Any
) -> tuple[list[Sample], list[str], list[bool]]:
    """The first ``eval.size`` requests of ``eval.split`` and one expansion of each.

    Generation runs under the config's autocast; ``sampling`` (do_sample, temperature) goes to
    :func:`generate_all` (greedy when empty).
    """
    samples = data.splits[cfg.eval.split]
    samples = samples[: cfg.eval.size] if cfg.eval.size else samples
    with autocast_for(cfg, policy):
        texts, ended = generate_all(
            policy, samples, cfg.eval.batch_size, cfg.rl.max_new_tokens, desc=desc, **sampling
        )
    return samples, texts, ended


def score_with_retrievers(
    cfg: DictConfig,
    data: Dataset,
    texts: Sequence[str],
    samples: Sequence[Sample],
    ended: Sequence[bool],
    format_check: FormatCheck,
    conf_dir: Path = CONF_DIR,
) -> dict[str, dict[str, float]]:
    """:func:`score_all` under each retriever of ``eval.retrievers`` (``conf/retriever/<name>``)."""
    return {
        name: score_all(
            texts,
            samples,
            build_reward(_retriever_cfg(name, conf_dir), cfg.reward, data.catalog),
            format_check,
            ended,
        )
        for name in cfg.eval.retrievers
    }


# ------------------------------------------------------------------ warm-up
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


def run_sft(cfg: DictConfig, data, reward, format_check, run_dir: Path) -> Path:
    """Supervised warm-up on the demonstrations; writes the merged policy to the cache."""
    out = warmup_dir(cfg)
    demos = [s for s in data.splits["train"] if s.demo]
    if not demos:
        raise ValueError(
            f"data={data.name} has no demonstrations for the warm-up: set data.demos_path to a "
            "JSONL written by `python -m ospo.data.demos`, or run stage=rl from a checkpoint"
        )
    pl.seed_everything(cfg.seed, workers=True)
    policy = base_policy(cfg, data)
    module = SFTModule(policy, OmegaConf.to_container(cfg.sft), max_steps=cfg.sft.steps)
    loader = DataLoader(
        demos,
        batch_size=cfg.sft.batch_size,
        shuffle=True,
        collate_fn=SFTCollator(policy, cfg.sft.max_length),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    trainer = make_trainer(
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
    trainer.fit(module, train_dataloaders=loader)

    val = validation_requests(cfg, data)
    with autocast_for(cfg, policy):
        texts, ended = generate_all(
            policy, val, cfg.eval.batch_size, cfg.rl.max_new_tokens, desc="warm-up check"
        )
    scores = score_all(texts, val, reward, format_check, ended)
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
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp)
    write_json(
        tmp / "warmup.json",
        {
            "val": scores,
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    write_json(run_dir / "warmup.json", {"dir": str(out), "val": scores})
    del trainer, module, policy  # RL reloads the merged weights: free these before it starts
    gc.collect()
    return out


# ------------------------------------------------------------------ RL
def _loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]


def _callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def run_train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`python train.py`: warm-up if needed, RL, final test scores, summary.json."""
    validate(cfg)
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    data = build_data(cfg)
    reward = build_reward(cfg.retriever, cfg.reward, data.catalog)
    format_check = instantiate(cfg.format)

    init = warmup_dir(cfg)
    if cfg.stage in ("all", "sft") and not (init / "warmup.json").exists():
        if cfg.sft.init:
            raise FileNotFoundError(f"sft.init={cfg.sft.init}: no warm-up checkpoint there")
        init = run_sft(cfg, data, reward, format_check, run_dir)
    elif cfg.stage != "rl":
        log.info("warm-up found in cache: %s", init)
    if cfg.stage == "sft":
        return {"warmup_dir": str(init)}

    pl.seed_everything(cfg.seed, workers=True)
    if (init / "warmup.json").exists():
        policy, init_info = warm_policy(cfg, init), {"dir": str(init)}
    else:
        log.warning("no warm-up checkpoint at %s: RL starts from the base model", init)
        policy, init_info = base_policy(cfg, data), {"dir": None}
    init_info["model"] = OmegaConf.to_container(cfg.model, resolve=True)
    ref = None
    if cfg.baseline.loss.beta > 0:  # a frozen copy of the starting policy
        ref = copy.deepcopy(policy).requires_grad_(False)

    # The segmenter and attribution also colour the validation credit table of GRPO runs.
    module = RLModule(
        policy,
        data.splits["train"],
        reward,
        instantiate(cfg.baseline.advantage),
        format_check,
        rl=OmegaConf.to_container(cfg.rl, resolve=True),
        baseline=OmegaConf.to_container(cfg.baseline, resolve=True),
        seed=cfg.seed,
        segmenter=instantiate(cfg.segmenter),
        attribution=instantiate(cfg.attribution),
        ref_policy=ref,
        samples_dir=run_dir / "samples",
        init=init_info,
    )
    val = validation_requests(cfg, data)
    val_loader = sample_loader(val, cfg.eval.batch_size)
    loggers = _loggers(cfg)
    trainer = make_trainer(
        cfg,
        run_dir,
        max_steps=cfg.rl.steps * cfg.baseline.mu,
        max_epochs=-1,
        val_check_interval=cfg.rl.val_every,
        logger=loggers,
        callbacks=_callbacks(cfg),
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

        label = cfg.baseline.name
        if cfg.baseline.credit:
            label += f"-{_choice('attribution')}-{_choice('segmenter')}"
        summary: dict[str, Any] = {
            "steps": module.rollout_step,
            "method": cfg.baseline.name,
            "label": label,
            "seed": cfg.seed,
        }
        if trainer.is_global_zero:
            k = 10  # the headline metric, NDCG@10, whatever the reward's own cut-off
            test, texts, ended = expand_test_split(
                cfg, policy, data, desc=f"{cfg.eval.split} scores"
            )
            scores = {"train": score_all(texts, test, reward, format_check, ended)}
            scores.update(score_with_retrievers(cfg, data, texts, test, ended, format_check))
            hist = module.val_history
            summary.update(
                {
                    f"val_ndcg@{k}_start": hist[0][f"val/ndcg@{k}"],
                    f"val_ndcg@{k}_end": hist[-1][f"val/ndcg@{k}"],
                    "val_history": hist,
                    "wall_s": time.perf_counter() - t_start,
                    "rl_wall_s": module.wall_seconds(),
                    **{f"{cfg.eval.split}_{m}": v for m, v in scores["train"].items()},
                    cfg.eval.split: scores,
                    "warmup_dir": init_info["dir"],
                    "last_ckpt": str(run_dir / "checkpoints" / "last.ckpt"),
                }
            )
            write_json(run_dir / "summary.json", summary)
            print(
                f"val ndcg@{k}: {summary[f'val_ndcg@{k}_start']:.4f} -> "
                f"{summary[f'val_ndcg@{k}_end']:.4f}  |  {cfg.eval.split} ndcg@{k}: "
                f"{scores['train'][f'ndcg@{k}']:.4f}  |  {summary['wall_s']:.0f} s  |  {run_dir}"
            )
        return summary
    finally:
        _finish_loggers(loggers)


def _finish_loggers(loggers) -> None:
    """Close W&B runs so that each job of a sweep gets its own run."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


# ------------------------------------------------------------------ evaluation
def load_checkpoint_policy(cfg: DictConfig, ckpt_path: str | Path, data) -> Policy:
    """Rebuild a trained policy: its frozen base from the warm-up folder + the saved weights."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint file there")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    init = ckpt.get("ospo", {}).get("init", {})
    model_cfg = OmegaConf.create(init.get("model") or OmegaConf.to_container(cfg.model))
    run_cfg = OmegaConf.merge(cfg, {"model": model_cfg})
    if init.get("dir"):
        policy = warm_policy(run_cfg, Path(init["dir"]))
    else:
        policy = base_policy(run_cfg, data)
    state = {
        k.removeprefix("policy."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("policy.")
    }
    missing = set(state) - set(policy.state_dict())
    if missing:
        raise ValueError(
            f"{ckpt_path}: {len(missing)} weights do not fit the policy "
            f"(first: {sorted(missing)[0]}); was it trained with another model?"
        )
    policy.load_state_dict(state, strict=False)
    return policy


def run_eval(cfg: DictConfig, run_dir: Path, conf_dir: Path) -> dict[str, Any]:
    """`python eval.py`: test-split scores with the training and out-of-distribution retrievers."""
    run_dir = Path(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    data = build_data(cfg)
    if cfg.ckpt_path:
        policy = load_checkpoint_policy(cfg, cfg.ckpt_path, data)
    else:
        log.info("no ckpt_path: evaluating the untrained (zero-shot) policy")
        policy = base_policy(cfg, data)
    policy.eval()
    samples, texts, ended = expand_test_split(
        cfg,
        policy,
        data,
        desc=f"{cfg.eval.split} expansions",
        do_sample=cfg.eval.do_sample,
        temperature=cfg.eval.temperature,
    )
    format_check = instantiate(cfg.format)
    results: dict[str, Any] = {
        "ckpt_path": cfg.ckpt_path,
        "split": cfg.eval.split,
        "n": len(samples),
        "retrievers": score_with_retrievers(
            cfg, data, texts, samples, ended, format_check, conf_dir
        ),
    }
    write_json(run_dir / "results.json", results)
    (run_dir / "expansions.jsonl").write_text(
        "".join(
            json.dumps({"qid": s.qid, "request": s.request, "expansion": t}) + "\n"
            for s, t in zip(samples, texts, strict=True)
        )
    )
    table = results_markdown(results)
    (run_dir / "results.md").write_text(table)
    print(table)
    return results


def results_markdown(results: dict[str, Any]) -> str:
    rows = results["retrievers"]
    keys = list(next(iter(rows.values())).keys()) if rows else []
    lines = [
        f"Split `{results['split']}` ({results['n']} requests), checkpoint "
        f"`{results['ckpt_path'] or 'zero-shot'}`",
        "",
        "| retriever | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
