"""Config helpers: OmegaConf resolvers, composing the config outside a Hydra app, the checks
that run before anything is built, and the hash that names a warm-up cache entry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b))


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides=(), name: str = "train") -> DictConfig:
    """`conf/<name>.yaml` with overrides, as `python train.py <overrides>` composes it, for
    scripts that build the project's objects outside a Hydra app (benchmarks, demos)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


class ConfigError(ValueError):
    """An inconsistent or incomplete configuration (named key, what was expected)."""


def validate(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on values that cannot work, before anything is built.

    The options check themselves when they are built (a data loader its files, an exact
    attribution its budget in `ospo.build.build_credit`); this checks the keys of the run.
    """
    if "root" in cfg.data.keys() and OmegaConf.is_missing(cfg.data, "root"):
        data_cls = get_class(cfg.data._target_)
        raise ConfigError(
            f"data.root is required for data={data_cls.config_name}: set data.root=<path>, "
            f"{data_cls.root_help}"
        )
    if "name" in cfg.model.keys() and OmegaConf.is_missing(cfg.model, "name"):
        raise ConfigError("model.name is required for model=hf: a model name or a local folder")
    written = cfg.data.get("completion", "rewrite")  # loaders without the key write whole queries
    if cfg.format.get("completion", written) != written:
        raise ConfigError(
            f"format={cfg.format.completion} checks {cfg.format.completion} completions but "
            f"data.completion={written}: add format={written}"
        )
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no checkpoint file there")
    if cfg.stage not in ("all", "sft", "rl"):
        raise ConfigError(f"stage={cfg.stage!r}: expected one of all, sft, rl")
    rl = cfg.rl
    if rl.num_generations < 2:
        raise ConfigError(
            f"rl.num_generations={rl.num_generations}: group advantages need at least 2 "
            "completions per request"
        )
    for key in ("steps", "prompts_per_step", "max_new_tokens", "val_every", "ckpt_every"):
        if rl[key] < 1:
            raise ConfigError(f"rl.{key}={rl[key]}: expected a positive integer")
    tp = cfg.get("rollout", {}).get("tensor_parallel_size", 1)
    processes = trainer_processes(cfg.trainer)
    if tp > 1 and processes != 1:
        how = (
            f"{processes} training processes (DDP: trainer.devices x trainer.num_nodes)"
            if processes
            else f"trainer.devices={cfg.trainer.devices}, which may start several processes"
        )
        raise ConfigError(
            f"rollout.tensor_parallel_size={tp} with {how}: an engine spanning several GPUs "
            "in each DDP rank is not supported until it has been tested on GPUs; use "
            "rollout.tensor_parallel_size=1 (one engine per rank) or trainer.devices=1"
        )


def trainer_processes(trainer: DictConfig) -> int | None:
    """How many training processes the `trainer` option starts (devices x nodes), or None
    when the config does not say (`devices: auto` or -1: as many as the machine has)."""
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return devices * nodes if devices > 0 else None
    if isinstance(devices, str):  # "auto", or device ids "0,1"
        ids = [d for d in devices.split(",") if d.strip()]
        return len(ids) * nodes if "," in devices else None
    return len(devices) * nodes  # a list of device ids


def config_hash(*nodes) -> str:
    """A short stable hash of resolved config nodes (names the warm-up cache entry)."""
    blob = json.dumps(
        [
            OmegaConf.to_container(n, resolve=True) if isinstance(n, DictConfig) else n
            for n in nodes
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]
