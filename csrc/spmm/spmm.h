// sparsert CPU sparse-times-dense (spmm) kernels: the public, torch-free interface.
//
// Every kernel computes a sparse Linear layer
//     y[t, n] = act(bias[n] + sum_k W[n, k] * x[t, k])     t < tokens, n < rows
// where W (rows x cols) is stored block-sparse (common/block_sparse.h) and act
// is a fused epilogue (common/epilogue.h). Everything crosses this boundary as raw pointers and
// sizes; the caller (the Python ops layer) validates every array first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/block_sparse.h"
#include "common/epilogue.h"
#include "common/isa.h"

namespace sparsert {

// The dense operands of one call.
struct SpmmArgs {
  const float* x = nullptr;  // x[t * x_row_stride + k], k < cols
  int64_t tokens = 0;
  int64_t x_row_stride = 0;
  float* y = nullptr;        // y[t * y_row_stride + n], n < rows
  int64_t y_row_stride = 0;
  const float* bias = nullptr;  // rows floats, or null
  Epilogue epilogue = Epilogue::kNone;  // applied after the bias
  int num_threads = 1;
};

using SpmmFn = void (*)(const BlockSparseMatrix& w, const SpmmArgs& args);

// One entry per kernel. Tests and benchmarks iterate this list, so a kernel
// cannot exist without being tested.
struct KernelInfo {
  std::string name;    // e.g. "f32_spmm_bsr4x1_avx2"
  std::string isa;     // "reference", "scalar", "avx2", "avx512"
  std::string kind;    // "spmm" (token panels, for many tokens) or "spmv" (per token)
  int block_rows = 1;  // tile this kernel handles; 0 = any shape (reference, f32_*_bsr_any_<isa>)
  int block_cols = 1;
  SpmmFn fn = nullptr;
};

// All kernels compiled into this build, whether or not this CPU can run them.
const std::vector<KernelInfo>& kernel_registry();

// The kernel sparsert would use for this tile and token count (nullptr if
// none matches, which cannot happen for tiles the formats produce: the
// reference kernel takes any tile).
const KernelInfo* select_kernel(int block_rows, int block_cols, int64_t tokens,
                                const std::string& isa);

}  // namespace sparsert
