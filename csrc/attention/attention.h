// Multi-head attention for short sequences on the CPU: out = softmax(q k^T * scale + key_bias) v
// per (batch, head), read from and written to the (batch, token, head, dim) layout a fused
// Q/K/V projection produces, with no transposes and no scores matrix in memory.
//
// Why: torch's CPU attention takes 1.2 ms for 8 sentences x 64 tokens x 12 heads of 32
// (sdpa; matmul + softmax 0.5 ms, plus a copy of q, k and v each into head-major order) for
// 25 MFLOP: at MiniLM's sizes attention and its copies were ~12% of a sparse model's time.
//
// Layout: element (b, t, h, d) of q is at q[b * batch_stride + t * row_stride + h * head_dim + d];
// k and v use the same strides (slices of one (batch, tokens, 3 * hidden) tensor, or three
// tensors of one shape); out at out[b * out_batch_stride + t * out_row_stride + h * head_dim + d].
// key_bias (optional, batch x tokens, row-major) is added to every score of that key: 0 keeps a
// key, a very negative value (-3.4e38) masks it. A row whose keys are all masked averages v.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sparsert {

struct AttentionArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t batch_stride = 0;  // floats between sentences of q, k and v
  int64_t row_stride = 0;    // floats between tokens of q, k and v
  float* out = nullptr;
  int64_t out_batch_stride = 0;
  int64_t out_row_stride = 0;
  const float* key_bias = nullptr;  // batch x tokens, or null
  int64_t batch = 0;
  int64_t tokens = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  float scale = 1.0f;
  int num_threads = 1;
};

using AttentionFn = void (*)(const AttentionArgs& a);

struct AttentionKernelInfo {
  std::string name;  // e.g. "f32_attention_avx512"
  std::string isa;   // "reference", "scalar", "avx2", "avx512"
  std::string kind;  // "attention" or "reference"
  int block_rows = 1;
  int block_cols = 1;
  AttentionFn fn = nullptr;
};

const std::vector<AttentionKernelInfo>& attention_kernel_registry();

// The kernel for `isa` (the reference where the build has none for it).
const AttentionKernelInfo* select_attention_kernel(const std::string& isa);

}  // namespace sparsert
