#!/usr/bin/env bash
# The main job: installs what is missing, builds, then runs the whole story on
# a real model (prune -> fine-tune -> sparsify -> save -> reload -> measure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m sparsert.demo "$@"
