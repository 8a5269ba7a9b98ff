// sparsert CPU sparse-times-dense kernels: the public, torch-free interface.
//
// Every kernel computes a sparse Linear layer
//     y[t, n] = act(bias[n] + sum_k W[n, k] * x[t, k])     t < tokens, n < rows
// where W (rows x cols) is stored block-sparse: R x C dense blocks on a grid,
// CSR being the 1x1 case. Everything crosses this boundary as raw pointers and
// sizes; the caller (the Python ops layer) validates every array first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sparsert {

enum class Activation : int { kNone = 0, kRelu = 1 };

// A rows x cols float matrix stored as R x C blocks (block-sparse row, BSR).
// Block row i covers matrix rows [i*R, i*R+R); its blocks are
// [row_ptr[i], row_ptr[i+1]). Block b covers columns [col_idx[b]*C, +C) and
// holds R*C values, row-major, at values + b*R*C. Blocks on the bottom/right
// edge may stick out of the matrix; their outside entries must be zero and
// are never written or read from x.
struct BlockSparseMatrix {
  int64_t rows = 0;        // logical rows (out_features)
  int64_t cols = 0;        // logical columns (in_features)
  int block_rows = 1;      // R
  int block_cols = 1;      // C
  const int32_t* row_ptr = nullptr;  // ceil(rows / R) + 1 entries
  const void* col_idx = nullptr;     // row_ptr[last] block-column indices
  int index_bits = 32;               // 16 (uint16_t) or 32 (int32_t)
  const float* values = nullptr;     // row_ptr[last] * R * C floats

  int64_t block_row_count() const { return (rows + block_rows - 1) / block_rows; }
  int64_t block_col_count() const { return (cols + block_cols - 1) / block_cols; }
};

// The dense operands of one call.
struct SpmmArgs {
  const float* x = nullptr;  // x[t * x_row_stride + k], k < cols
  int64_t tokens = 0;
  int64_t x_row_stride = 0;
  float* y = nullptr;        // y[t * y_row_stride + n], n < rows
  int64_t y_row_stride = 0;
  const float* bias = nullptr;  // rows floats, or null
  Activation activation = Activation::kNone;
  int num_threads = 1;
};

using SpmmFn = void (*)(const BlockSparseMatrix& w, const SpmmArgs& args);

// One entry per kernel. Tests and benchmarks iterate this list, so a kernel
// cannot exist without being tested.
struct KernelInfo {
  std::string name;    // e.g. "f32_spmm_bsr4x1_avx2"
  std::string isa;     // "reference", "scalar", "avx2", "avx512"
  std::string kind;    // "spmm" (token panels, for many tokens) or "spmv" (per token)
  int block_rows = 1;  // tile this kernel handles; 0 = any (reference)
  int block_cols = 1;
  SpmmFn fn = nullptr;
};

// All kernels compiled into this build, whether or not this CPU can run them.
const std::vector<KernelInfo>& kernel_registry();

// True when this CPU (and OS) can run kernels of `isa`.
bool isa_supported(const std::string& isa);

// Best ISA of this CPU, or the one forced by the SPARSERT_ISA environment
// variable (scalar | avx2 | avx512), if supported.
std::string best_isa();

// The kernel sparsert would use for this tile and token count (nullptr if
// none matches, which cannot happen for tiles the formats produce: the
// reference kernel takes any tile).
const KernelInfo* select_kernel(int block_rows, int block_cols, int64_t tokens,
                                const std::string& isa);

}  // namespace sparsert
