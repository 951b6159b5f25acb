"""Shared fixtures: offline environment and composing the real Hydra config."""

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

import ospo.config  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A tiny end-to-end setting: small catalog, tiny GPT-2, a few steps, csv logger.
TINY = [
    "model=tiny",
    "logger=csv",
    "data.num_products=600",
    "rl.steps=4",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "rl.max_new_tokens=8",
    "rl.invalid_reward=null",  # the untrained tiny GPT-2 rarely ends at EOS: no format gate
    "rl.val_every=2",
    "rl.val_size=4",
    "rl.ckpt_every=1",
    "rl.log_samples=2",
    "sft.steps=2",
    "sft.batch_size=4",
    "eval.size=4",
    "eval.batch_size=4",
]


@pytest.fixture
def make_cfg(tmp_path):
    """Compose `conf/<name>.yaml` with overrides, as `python train.py` would, in tmp_path."""

    def _make(overrides=(), name="train", run_dir=None):
        GlobalHydra.instance().clear()
        run_dir = Path(run_dir or tmp_path / "run")
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name=name,
                overrides=[
                    *overrides,
                    f"hydra.run.dir={run_dir}",
                    f"cache_dir={tmp_path / 'cache'}",
                ],
                return_hydra_config=True,
            )
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        return cfg

    yield _make
    GlobalHydra.instance().clear()


@pytest.fixture
def dense_toy():
    """Dense (MiniLM) indexed on 20 products: 18 fillers p0..p17, a kids' ski jacket "ski" and
    men's running shoes "shoe". Loads the real encoder: use only in slow tests."""
    from ospo.retriever import Dense

    catalog = {f"p{i}": f"generic household item number {i}" for i in range(18)}
    catalog["ski"] = "insulated waterproof ski jacket for kids"
    catalog["shoe"] = "lightweight running shoes for men"
    dense = Dense()
    dense.index(catalog)
    return dense
