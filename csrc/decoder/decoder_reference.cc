// The plain decoder ops every kernel is tested against: sums in double, std::exp, one row or
// one (sequence, head) at a time.
#include <algorithm>
#include <cmath>
#include <vector>

#include "decoder/decoder.h"

namespace sparsert {
namespace reference {

static void rms_norm(const RmsNormArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    float* x = a.x + r * a.x_stride;
    if (a.add != nullptr)
      for (int64_t i = 0; i < a.width; ++i) x[i] += a.add[r * a.add_stride + i];
    double ss = 0;
    for (int64_t i = 0; i < a.width; ++i) ss += static_cast<double>(x[i]) * x[i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(a.width) + a.eps);
    for (int64_t i = 0; i < a.width; ++i) a.out[r * a.out_stride + i] = static_cast<float>(a.weight[i] * (x[i] * inv));
  }
}

static void swiglu(const SwigluArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* g = a.gate_up + r * a.in_stride;
    for (int64_t i = 0; i < a.width; ++i) {
      const double gi = g[i];
      a.out[r * a.out_stride + i] = static_cast<float>(gi / (1.0 + std::exp(-gi)) * g[a.width + i]);
    }
  }
}

// x (head_dim floats) rotated: x * cos + rotate_half(x) * sin, in double.
static void rotate(const float* x, const float* cos, const float* sin, int64_t d, double* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const double partner = i < half ? -static_cast<double>(x[i + half]) : x[i - half];
    out[i] = x[i] * static_cast<double>(cos[i]) + partner * sin[i];
  }
}

static void cached_attention(const CachedAttentionArgs& a) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads, L = a.position + 1;
  std::vector<double> q(D), kr(D), p(L);
  for (int64_t b = 0; b < a.batch; ++b) {
    const float* row = a.qkv + b * a.qkv_stride;
    for (int64_t g = 0; g < a.kv_heads; ++g) {  // the new key (rotated) and value into the caches
      rotate(row + (a.heads + g) * D, a.cos, a.sin, D, kr.data());
      float* kc = a.k_cache + b * a.cache_batch_stride + g * a.cache_head_stride + a.position * D;
      float* vc = a.v_cache + b * a.cache_batch_stride + g * a.cache_head_stride + a.position * D;
      for (int64_t i = 0; i < D; ++i) {
        kc[i] = static_cast<float>(kr[i]);
        vc[i] = row[(a.heads + a.kv_heads + g) * D + i];
      }
    }
    for (int64_t h = 0; h < a.heads; ++h) {
      rotate(row + h * D, a.cos, a.sin, D, q.data());
      const int64_t g = h / group;
      const float* kc = a.k_cache + b * a.cache_batch_stride + g * a.cache_head_stride;
      const float* vc = a.v_cache + b * a.cache_batch_stride + g * a.cache_head_stride;
      double top = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        double s = 0;
        for (int64_t i = 0; i < D; ++i) s += q[i] * kc[t * D + i];
        p[t] = s * a.scale;
        top = std::max(top, p[t]);
      }
      double sum = 0;
      for (int64_t t = 0; t < L; ++t) sum += (p[t] = std::exp(p[t] - top));
      float* o = a.out + b * a.out_stride + h * D;
      for (int64_t i = 0; i < D; ++i) {
        double acc = 0;
        for (int64_t t = 0; t < L; ++t) acc += p[t] * vc[t * D + i];
        o[i] = static_cast<float>(acc / sum);
      }
    }
  }
}

void register_decoder_kernels(std::vector<DecoderKernelInfo>& out) {
  out.push_back({"f32_decoder_reference", "reference", "reference", 1, 1, &rms_norm, &swiglu, &cached_attention});
}

}  // namespace reference
}  // namespace sparsert
