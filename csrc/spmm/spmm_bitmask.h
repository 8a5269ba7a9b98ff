// sparsert bitmask kernels: a sparse Linear layer for moderate sparsity
// (30-80% zeros), the public, torch-free interface.
//
//     y[t, n] = act(bias[n] + sum_k W[n, k] * x[t, k])     t < tokens, n < rows
//
// W (rows x cols) is stored per row in groups of 16 columns: a 16-bit mask per
// group (bit j set: column g*16 + j is stored) and the stored values packed
// row by row, group by group, in column order. Decoding reads 2 bytes of mask
// per 16 weights plus 4 bytes per stored value (density * 4 + 1/8 bytes per
// weight) and needs no column indices: CSR at 50% reads 6 bytes per nonzero
// (value + 16-bit index) = 3 bytes per weight, the bitmask 2.125.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "spmm/spmm.h"

namespace sparsert {

constexpr int kBitmaskGroup = 16;  // columns per mask
// Floats that must be readable (any value) after the last stored value:
// the AVX2 kernels load whole 8-float vectors and discard the surplus lanes.
constexpr int kBitmaskValuePadding = 16;

struct BitmaskMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  // rows * group_count() masks, row-major; bits at columns >= cols are zero.
  const uint16_t* masks = nullptr;
  // rows + 1 offsets into values: row n's values are [row_offsets[n], row_offsets[n + 1]),
  // and row_offsets[n + 1] - row_offsets[n] equals the popcount of its masks.
  const int64_t* row_offsets = nullptr;
  // row_offsets[rows] + kBitmaskValuePadding floats, all finite (the spmm
  // kernels multiply the values just past a row's end by zero).
  const float* values = nullptr;

  int64_t group_count() const { return (cols + kBitmaskGroup - 1) / kBitmaskGroup; }
};

using BitmaskSpmmFn = void (*)(const BitmaskMatrix& w, const SpmmArgs& args);

// One entry per bitmask kernel; tests and benchmarks iterate this list.
struct BitmaskKernelInfo {
  std::string name;  // e.g. "f32_spmm_bitmask16_avx2"
  std::string isa;   // "reference", "scalar", "avx2", "avx512"
  std::string kind;  // "spmm" (token panels), "spmv" (per token) or "reference"
  int block_rows = 1;            // 1: masks are per row ...
  int block_cols = kBitmaskGroup;  // ... over groups of 16 columns
  BitmaskSpmmFn fn = nullptr;
};

const std::vector<BitmaskKernelInfo>& bitmask_kernel_registry();

// The kernel for this token count on `isa` (the reference when none matches).
const BitmaskKernelInfo* select_bitmask_kernel(int64_t tokens, const std::string& isa);

}  // namespace sparsert
