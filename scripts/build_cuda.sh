#!/usr/bin/env bash
# Builds the CUDA kernels (sparsert/_C_cuda*.so) in their own build directory
# with -DSPARSERT_CUDA=ON. Needs nvcc (or CUDACXX), cmake, ninja, pybind11;
# no GPU: CI runs it on CPU machines as the CUDA compile check, and fails on
# any compile error or any warning in our sources.
#   SPARSERT_CUDA_BUILD_DIR  build directory (default build-cuda)
#   SPARSERT_CUDA_JOBS       parallel compile jobs (default 2)
#   CMAKE_CUDA_ARCHITECTURES e.g. "90-real" to build for one GPU only (faster)
#   SPARSERT_ALLOW_WARNINGS=1 list warnings without failing (another nvcc/gcc)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${SPARSERT_CUDA_BUILD_DIR:-build-cuda}
JOBS=${SPARSERT_CUDA_JOBS:-2}
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDACXX:-}" ]; then
  echo "[build_cuda] no CUDA compiler: put nvcc on PATH or set CUDACXX" >&2
  exit 1
fi
mkdir -p "$BUILD"
LOG="$BUILD/build_cuda.log"
archs=()
[ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ] && archs=("-DCMAKE_CUDA_ARCHITECTURES=$CMAKE_CUDA_ARCHITECTURES")
echo "[build_cuda] building sparsert._C_cuda in $BUILD"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DSPARSERT_CUDA=ON "${archs[@]}" \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" > "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
cmake --build "$BUILD" --target _C_cuda -j "$JOBS" >> "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
if grep -E "csrc/.*(warning|Warning)" "$LOG"; then
  echo "[build_cuda] compiler warnings in our sources (listed above)" >&2
  [ "${SPARSERT_ALLOW_WARNINGS:-0}" = 1 ] || exit 1
fi
