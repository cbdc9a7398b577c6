#!/usr/bin/env bash
# Installs nf4q and everything it needs on a fresh Linux machine (with or without a GPU).
# torch 2.14.1 is the CUDA 13.0 build; the CUDA kernels are compiled whenever nvcc is found
# (CUDA_HOME, or /usr/local/cuda). USE_CUDA=0 skips them, USE_CUDA=1 insists on them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --upgrade pip
$PY -m pip install -q "torch==2.14.1" setuptools wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e ".[test,demo]"
$PY -c "import nf4q; print('nf4q', nf4q.__version__, '| CUDA kernels built:', nf4q.has_cuda_kernels())"
