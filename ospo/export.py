"""`python -m ospo.export ckpt_path=... out=...`: a trained policy as a Hugging Face folder.

A run's checkpoint holds only the trained weights (LoRA adapters by default) on top of its
warm-up folder; this rebuilds the policy as `eval.py` does (`load_checkpoint_policy`), folds
the adapters into the base weights and saves a plain folder: weights (safetensors), config,
tokenizer with its chat template, and a generation config whose EOS ids are the policy's, so
`transformers` and vLLM stop where training stopped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ospo.config  # noqa: E402,F401  (registers resolvers)
from ospo.build import build_data  # noqa: E402
from ospo.evaluate import load_checkpoint_policy  # noqa: E402
from ospo.policy import to_dtype  # noqa: E402

log = logging.getLogger("ospo")


def run_export(cfg: DictConfig) -> Path:
    """Write the merged policy of `cfg.ckpt_path` to `cfg.out`; returns the folder."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"out={out} exists: choose another folder or set overwrite=true")
    policy = load_checkpoint_policy(cfg, cfg.ckpt_path, build_data(cfg))
    if cfg.get("dtype"):
        policy.to(to_dtype(cfg.dtype))
    policy.save(out, merged=True)
    log.info("exported %s -> %s", cfg.ckpt_path, out)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    print(run_export(cfg))


if __name__ == "__main__":
    main()
