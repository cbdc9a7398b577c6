#!/usr/bin/env bash
# Installs nf4q and everything it needs on a fresh Linux machine (with or without a GPU), at the versions in
# constraints.txt (the tested set; NF4Q_CONSTRAINTS= with an empty value installs the newest instead).
# torch 2.14.1 is the CUDA 13.0 build; the CUDA kernels are compiled whenever nvcc is found
# (CUDA_HOME, or /usr/local/cuda). USE_CUDA=0 skips them, USE_CUDA=1 insists on them.
# PYTHON=/path/to/venv/bin/python installs into that interpreter's environment (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
CONSTRAINTS=${NF4Q_CONSTRAINTS-constraints.txt}
PIN=()
if [ -n "$CONSTRAINTS" ]; then PIN=(-c "$CONSTRAINTS"); fi
$PY -m pip install -q --upgrade "${PIN[@]}" pip
$PY -m pip install -q "${PIN[@]}" "torch==2.14.1" setuptools wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q "${PIN[@]}" --no-build-isolation -e ".[test,demo,plot]"
$PY -c "import nf4q; print('nf4q', nf4q.__version__, '| CUDA kernels built:', nf4q.has_cuda_kernels())"
echo "install.sh: $((SECONDS - start)) s"
