#!/usr/bin/env bash
# Builds the CPU kernels and sparsert._C with AddressSanitizer + UBSan
# (-DSPARSERT_SANITIZE=ON) into build-sanitize/, and runs tests against that
# build with the ASan runtime preloaded (python itself is not instrumented).
#
# The sanitized module goes into a copy of the package and the tests
# (build-sanitize/tree), so the normal sparsert/_C*.so is never replaced.
#   bash scripts/test_sanitized.sh                 the default subset (below)
#   bash scripts/test_sanitized.sh tests -q        any pytest arguments (here: every test)
#   SPARSERT_SANITIZE_BUILD_DIR  build directory (default build-sanitize)
#   SPARSERT_SANITIZE_JOBS       parallel compile jobs (default 2)
# Python and torch leak by design, so leak detection is off; allocations the
# allocator cannot serve return null (sparsert turns that into MemoryError).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${SPARSERT_SANITIZE_BUILD_DIR:-build-sanitize}
JOBS=${SPARSERT_SANITIZE_JOBS:-2}
TREE="$BUILD/tree"
start=$(date +%s)

# A fresh copy of the package (without its built modules) and the tests.
rm -rf "$TREE"
mkdir -p "$TREE"
tar -c --exclude='*.so' --exclude=__pycache__ sparsert tests pyproject.toml | tar -x -C "$TREE"

LOG="$BUILD/build.log"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
echo "[sanitize] building sparsert._C with ASan + UBSan in $BUILD"
cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPARSERT_SANITIZE=ON \
  -DSPARSERT_MODULE_DIR="$PWD/$TREE/sparsert" \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" > "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
cmake --build "$BUILD" --target _C -j "$JOBS" >> "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
built=$(date +%s)
echo "[sanitize] built in $((built - start)) s"

CXX_BIN=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
ASAN_LIB=$("${CXX_BIN:-c++}" -print-file-name=libasan.so)
[ -f "$ASAN_LIB" ] || { echo "[sanitize] no ASan runtime found ($ASAN_LIB)" >&2; exit 1; }
# libstdc++ too: python does not link it, and ASan resolves the real
# __cxa_throw when it starts, so without it the first C++ exception aborts.
STDCXX_LIB=$("${CXX_BIN:-c++}" -print-file-name=libstdc++.so.6)

if [ $# -eq 0 ]; then
  # The native kernels end to end: every kernel against torch, the raw
  # bindings, hostile inputs and threading; not the tests marked python_only
  # (they drive no C++, so ASan has nothing to check in them).
  set -- tests/test_native_epilogues.py tests/test_native_hostile.py tests/test_hostile.py \
    tests/test_linear.py tests/test_bitmask.py tests/test_rowgroup.py tests/test_int8.py tests/test_conv.py \
    tests/test_attention.py tests/test_decoder_ops.py tests/test_streamline_decoder.py tests/test_gemv.py \
    tests/test_threading.py -q -x \
    -m "not python_only"
fi
cd "$TREE"
status=0
LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" \
ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:${ASAN_OPTIONS:-}" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" \
SPARSERT_SANITIZED=1 \
  "$PY" -m pytest -p no:cacheprovider "$@" || status=$?
echo "[sanitize] tests ran in $(( $(date +%s) - built )) s (exit $status)"
exit $status
