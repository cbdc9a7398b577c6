#!/usr/bin/env bash
# Installs nf4q, then runs the C++ unit tests (CMake + ctest) and the Python tests (pytest).
# CUDA tests skip cleanly on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cmake -j "$(nproc)"
ctest --test-dir build/cmake --output-on-failure
${PYTHON:-python3} -m pytest -q tests "$@"
