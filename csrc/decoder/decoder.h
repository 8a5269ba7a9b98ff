// The arithmetic between the Linear layers of a LLaMA-style decoder, for the streamlined forward
// (sparsert/convert/streamline_decoder.py): RMSNorm with the residual add before it, SwiGLU, and
// one decode step's attention over a KV cache with the rotary embedding applied.
//
// Why: decoding one token of SmolLM2-135M (30 layers) ran ~30 torch ops per layer around its 4
// Linear calls; at 1 token each op is all overhead (~4-20 us: torch's rms_norm alone is 6 ops),
// ~4.9 ms of a ~14 ms step with int8 layers. These three calls replace them.
//
// Layouts (floats, row-major, strides in floats):
// - rms_norm: x is rows x width (row stride x_stride). With `add`, x += add first (x is the
//   residual stream, updated in place); then out = weight * x / sqrt(mean(x^2) + eps).
// - swiglu: row r of gate_up holds gate (width floats) then up (width floats);
//   out = silu(gate) * up, silu(g) = g / (1 + e^-g).
// - cached_attention: row b of qkv holds q (heads x head_dim), k and v (kv_heads x head_dim
//   each) of sequence b's new token. q and k are rotated by the token's angle (cos, sin:
//   head_dim floats each, shared by the batch; rotate_half as in LLaMA: the first half of a head
//   pairs with the second), k and v are written at row `position` of the caches (element
//   (b, g, t, d) at b * cache_batch_stride + g * cache_head_stride + t * head_dim + d), and
//   query head h attends rows 0..position of key/value head h / (heads / kv_heads):
//   out[b][h] = softmax(q k^T * scale) v.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sparsert {

struct RmsNormArgs {
  float* x = nullptr;
  int64_t x_stride = 0;
  const float* add = nullptr;  // or null: no residual add
  int64_t add_stride = 0;
  const float* weight = nullptr;
  float eps = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  int64_t rows = 0;
  int64_t width = 0;
  int num_threads = 1;
};

struct SwigluArgs {
  const float* gate_up = nullptr;
  int64_t in_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  int64_t rows = 0;
  int64_t width = 0;  // of gate (and of up, and of out)
  int num_threads = 1;
};

struct CachedAttentionArgs {
  const float* qkv = nullptr;
  int64_t qkv_stride = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
  float* k_cache = nullptr;
  float* v_cache = nullptr;
  int64_t cache_batch_stride = 0;
  int64_t cache_head_stride = 0;
  int64_t position = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  float scale = 1.0f;
  int num_threads = 1;
};

using RmsNormFn = void (*)(const RmsNormArgs& a);
using SwigluFn = void (*)(const SwigluArgs& a);
using CachedAttentionFn = void (*)(const CachedAttentionArgs& a);

// One ISA's set of the three ops.
struct DecoderKernelInfo {
  std::string name;  // e.g. "f32_decoder_avx512"
  std::string isa;   // "reference", "scalar", "avx2", "avx512"
  std::string kind;  // "decoder" or "reference"
  int block_rows = 1;
  int block_cols = 1;
  RmsNormFn rms_norm = nullptr;
  SwigluFn swiglu = nullptr;
  CachedAttentionFn cached_attention = nullptr;
};

// The largest head_dim cached_attention takes (a rotated query lives on the stack).
constexpr int64_t kMaxDecoderHeadDim = 512;

const std::vector<DecoderKernelInfo>& decoder_kernel_registry();

// The kernel set for `isa` (the reference where the build has none for it).
const DecoderKernelInfo* select_decoder_kernel(const std::string& isa);

}  // namespace sparsert
