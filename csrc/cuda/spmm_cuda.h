// Torch-free CUDA SpMM kernels: y = act(x @ W^T + bias) for a block-sparse W.
//
// Everything crosses this boundary as raw device pointers, sizes and a
// cudaStream_t; this header compiles with a plain C++ compiler (the pybind11
// bindings include it) and needs only the CUDA runtime API header.
//
// Layouts (the same as the CPU kernels, csrc/common/block_sparse.h):
//   W: rows x cols, a grid of R x C blocks (CSR is 1x1).
//      row_ptr  device buffer of ceil(rows/R) + 1 int32
//      col_idx  device buffer of row_ptr[last] block-column indices, uint16
//               (index_bits = 16, stored in int16 tensors) or int32
//      values   device buffer of row_ptr[last] * R * C elements of `dtype`,
//               block-major, each block R x C row-major; entries outside the
//               matrix (edge blocks) are zero
//   x: tokens x cols, row stride x_row_stride (elements), unit column stride
//   y: tokens x rows, row stride y_row_stride (elements), same dtype as x
//   bias: nullptr or device buffer of `rows` float32
// Accumulation is always in float32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/epilogue.h"

namespace sparsert {
namespace cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

const char* dtype_name(DType d);
int dtype_size(DType d);

struct SpmmProblem {
  int64_t rows = 0, cols = 0;
  int block_rows = 1, block_cols = 1;
  const int32_t* row_ptr = nullptr;
  const void* col_idx = nullptr;
  int index_bits = 32;
  const void* values = nullptr;
  // Optional: the order in which the CSR kernel visits rows (a permutation
  // of 0..rows-1, longest rows first: Sputnik's row swizzle). nullptr = 0..rows-1.
  const int32_t* row_order = nullptr;
  const void* x = nullptr;
  int64_t tokens = 0, x_row_stride = 0;
  void* y = nullptr;
  int64_t y_row_stride = 0;
  const float* bias = nullptr;
  Epilogue epilogue = Epilogue::kNone;  // applied after the bias
  DType dtype = DType::f32;
};

// One kernel family; `name` follows the CPU convention dtype_op_tile_isa,
// e.g. "bf16_spmm_bsr32x32_wmma".
struct CudaKernelInfo {
  std::string name;
  std::string kind;  // "reference" | "csr" | "bsr_wmma"
  DType dtype;
  int block_rows, block_cols;  // 0, 0 = any block
  int token_tile;              // tokens per thread block (csr: per smem stage)
};

// Every kernel in this build (tests and benchmarks iterate it).
const std::vector<CudaKernelInfo>& kernel_registry();

// Checks that the problem is one the named kernel handles (block shape,
// dtype, alignment, shared memory on `device`). Returns "" if so, else why not.
std::string check_kernel(const CudaKernelInfo& k, const SpmmProblem& p, int device);

// The kernel sparsert picks for this problem on `device` (never null: the
// reference kernel handles everything).
const CudaKernelInfo* select_kernel(const SpmmProblem& p, int device);

// Launches `k` on `stream`; the caller has validated the arrays. Returns the
// launch error (cudaSuccess if the launch was accepted).
cudaError_t launch(const CudaKernelInfo& k, const SpmmProblem& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsert
