"""Train a query-rewriting policy with GRPO or OSPO: `python train.py [overrides]`.

Examples:
    python train.py                                  # embedded task, SmolLM2, OSPO (Owen, phrases)
    python train.py attribution=owen segmenter=sentence
    python train.py baseline=grpo
    python train.py -m baseline=grpo,ospo seed=0,1   # a sweep, one run folder per job
    python train.py ckpt_path=outputs/train/<run>/checkpoints/last.ckpt   # resume
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ospo.config  # noqa: E402,F401  (registers resolvers)
from ospo.rl import run_train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = run_train(cfg, HydraConfig.get().runtime.output_dir)
    return summary.get("val_ndcg@10_end")  # what an Optuna sweep maximises


if __name__ == "__main__":
    main()
