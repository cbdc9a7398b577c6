#!/usr/bin/env bash
# Which compiler builds an nf4q extension whose TORCH_CHECK errors raise instead of crashing (issue 17)?
# Builds a tiny torch extension with $CXX (default c++) and with /usr/bin/g++ (plus $CXX with -shared-libgcc),
# calls its failing op in a subprocess and prints "raises" or "crash (signal 11)", with each compiler's
# libstdc++/libgcc_s (-print-file-name), the probe's ldd/NEEDED/RUNPATH and the libraries torch has loaded.
#   bash scripts/check_compiler.sh [CXX ...]
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
exec "$PY" scripts/compiler_probe.py "$@"
