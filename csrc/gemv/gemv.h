// Dense float32 matrix-vector products for one token: y = W x + b, W row-major (out x in).
//
// Why: a decode step multiplies every weight of a model by one token, so it is a stream of the
// weights from memory. torch's CPU F.linear at one token streams them at ~10 GB/s here (one
// core's worth: 2 threads measured no faster), while two cores stream ~22 GB/s (a sum over
// the same 113 MB). These kernels split the rows into one contiguous block per thread, so each
// core streams its own part of W at the memory's pace, and W is read exactly once.
//
// Layout (floats): W's row o at w + o * w_stride (w_stride >= in_features); x: rows x_rows of
// in_features at x + r * x_stride; y: y + r * y_stride; bias: out_features floats or null.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sparsert {

struct GemvArgs {
  const float* w = nullptr;
  int64_t w_stride = 0;
  const float* x = nullptr;
  int64_t x_stride = 0;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t y_stride = 0;
  int64_t out_features = 0;
  int64_t in_features = 0;
  int64_t rows = 1;  // tokens: a few at most (each reads W once more from cache, not memory)
  int num_threads = 1;
};

using GemvFn = void (*)(const GemvArgs& a);

struct GemvKernelInfo {
  std::string name;  // e.g. "f32_gemv_avx512"
  std::string isa;   // "reference", "scalar", "avx2", "avx512"
  std::string kind;  // "gemv" or "reference"
  int block_rows = 1;
  int block_cols = 1;
  GemvFn fn = nullptr;
};

const std::vector<GemvKernelInfo>& gemv_kernel_registry();

// The kernel for `isa` (the reference where the build has none for it).
const GemvKernelInfo* select_gemv_kernel(const std::string& isa);

}  // namespace sparsert
