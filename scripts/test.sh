#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# CUDA compile check wherever nvcc exists (no GPU needed): a CUDA build break fails CI.
if command -v nvcc >/dev/null 2>&1; then bash scripts/build_cuda.sh; fi
exec "${PYTHON:-python3}" -m pytest "$@"
