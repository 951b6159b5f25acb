"""Config helpers: OmegaConf resolvers and the checks that run before any model loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


_DATA_HELP = {
    "esci": "the folder holding shopping_queries_dataset_examples.parquet and "
    "shopping_queries_dataset_products.parquet (github.com/amazon-science/esci-data, "
    "folder shopping_queries_dataset/)",
    "hm": "the folder holding articles.csv, customers.csv and transactions_train.csv "
    "(kaggle.com/competitions/h-and-m-personalized-fashion-recommendations)",
}


def _target(node) -> str:
    return str(node.get("_target_", "")) if node is not None else ""


def validate(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on choices that cannot work together."""
    data_name = _target(cfg.data).rsplit(".", 1)[-1].lower().replace("data", "")
    if "root" in cfg.data.keys() and OmegaConf.is_missing(cfg.data, "root"):
        raise ConfigError(
            f"data.root is required for data={data_name}: set data.root=<path>, "
            f"{_DATA_HELP.get(data_name, 'the data folder')}"
        )
    if "name" in cfg.model.keys() and OmegaConf.is_missing(cfg.model, "name"):
        raise ConfigError("model.name is required for model=hf: a model name or a local folder")
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
    if cfg.baseline.mu < 1:
        raise ConfigError(f"baseline.mu={cfg.baseline.mu}: expected at least 1 update per batch")
    if cfg.baseline.credit:
        _check_attribution_budget(cfg)


def _check_attribution_budget(cfg: DictConfig) -> None:
    """An exact attribution must afford the segmenter's worst case, or be allowed to fall back."""
    att = cfg.attribution
    if "max_coalitions" not in att or att.get("fallback", False):
        return
    n = int(cfg.segmenter.max_segments)
    worst = 2**n  # one union or all singletons: every subset of the n players
    if worst > att.max_coalitions:
        raise ConfigError(
            f"attribution.max_coalitions={att.max_coalitions} is below the worst case of "
            f"segmenter.max_segments={n} ({worst} coalitions for {_target(att)}): lower "
            f"segmenter.max_segments, raise attribution.max_coalitions, or set "
            f"attribution.fallback=true (Monte-Carlo past the budget)"
        )


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
