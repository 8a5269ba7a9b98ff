#!/usr/bin/env bash
# The main job: installs what is missing, builds, then runs the whole story on
# the real all-MiniLM-L6-v2: ask for 2x faster than the best dense path -> plan
# per layer from measured times -> prune (SparseGPT) -> recover (2.5 min of distillation) -> pack
# -> save -> reload -> measure.
# Arguments go to python -m sparsert.demo (--target-speedup 3, --model digits-cnn, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m sparsert.demo "$@"
