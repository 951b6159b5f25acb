"""Score a trained policy on the test split with the training and held-out retrievers.

python eval.py ckpt_path=outputs/train/<run>/checkpoints/last.ckpt
python eval.py                       # no checkpoint: the zero-shot policy
python eval.py eval.do_sample=true ~retriever@eval.retrievers.dense   # skip a held-out retriever
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ospo.config  # noqa: E402,F401  (registers resolvers)
from ospo.evaluate import run_eval  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
