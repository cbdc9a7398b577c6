#!/usr/bin/env bash
# Installs nf4q, then runs the main job: `nf4q demo` (QLoRA on the real all-MiniLM-L6-v2; GPU when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
nf4q demo "$@"
