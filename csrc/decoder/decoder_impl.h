// The decoder ops (decoder/decoder.h), written once over a GCC/Clang vector of
// SPARSERT_VEC_FLOATS floats and compiled per ISA: decoder_{scalar,avx2,avx512}.cc define
// SPARSERT_ISA (a namespace), SPARSERT_VEC_FLOATS and the target, then include this file.
//
// All three are light on arithmetic (a decode step's attention over 100 cached tokens with 9
// heads of 64 is 115 kFLOP): what they save is the calls they replace. So they run on the calling
// thread unless a call holds enough work to pay for waking the others (kParallelWork).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/thread_pool.h"
#include "decoder/decoder.h"

#include "common/isa_target_begin.inc"
#include "common/vec_impl.h"

namespace sparsert {
namespace SPARSERT_ISA {
namespace decoder {

using namespace vec;  // (VW, vf, load, store, splat, vmax, vexp, hsum: common/vec_impl.h)

// Multiply-adds (or elements) below which a call stays on one thread: a fork-join costs a few
// microseconds, about what 64k multiply-adds take on one core.
constexpr int64_t kParallelWork = int64_t{1} << 16;

// fn(begin, end) over [0, n) in one chunk per thread, threads only for `work` >= kParallelWork.
template <typename Fn>
static void split(int64_t n, int64_t work, int num_threads, const Fn& fn) {
  const int threads = work >= kParallelWork ? static_cast<int>(std::min<int64_t>(num_threads, n)) : 1;
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  parallel_run(threads, [&](int task, int tasks) { fn(n * task / tasks, n * (task + 1) / tasks); });
}

static void rms_norm_kernel(const RmsNormArgs& a) {
  const int64_t W = a.width, whole = W / VW * VW;
  split(a.rows, a.rows * W, a.num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* x = a.x + r * a.x_stride;
      const float* y = a.add != nullptr ? a.add + r * a.add_stride : nullptr;
      vf ss0{}, ss1{};
      int64_t i = 0;
      if (y != nullptr) {
        for (; i + 2 * VW <= whole; i += 2 * VW) {
          const vf v0 = load(x + i) + load(y + i), v1 = load(x + i + VW) + load(y + i + VW);
          store(x + i, v0);
          store(x + i + VW, v1);
          ss0 += v0 * v0;
          ss1 += v1 * v1;
        }
        for (; i < whole; i += VW) {
          const vf v = load(x + i) + load(y + i);
          store(x + i, v);
          ss0 += v * v;
        }
      } else {
        for (; i + 2 * VW <= whole; i += 2 * VW) {
          const vf v0 = load(x + i), v1 = load(x + i + VW);
          ss0 += v0 * v0;
          ss1 += v1 * v1;
        }
        for (; i < whole; i += VW) {
          const vf v = load(x + i);
          ss0 += v * v;
        }
      }
      float ss = hsum(ss0 + ss1);
      for (; i < W; ++i) {
        const float v = y != nullptr ? (x[i] += y[i]) : x[i];
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(W) + a.eps);
      const vf vinv = splat(inv);
      float* o = a.out + r * a.out_stride;
      for (i = 0; i < whole; i += VW) store(o + i, load(a.weight + i) * (load(x + i) * vinv));
      for (; i < W; ++i) o[i] = a.weight[i] * (x[i] * inv);
    }
  });
}

// silu(g) * u with sigmoid(g) from t = e^-|g| (never overflows): 1 / (1 + t) for g >= 0,
// t / (1 + t) below.
static inline vf swiglu_vec(vf g, vf u) {
  const vf t = vexp(-vmax(g, -g));
  const vf one = splat(1.0f);
  const vf sig = (g >= splat(0.0f) ? one : t) / (one + t);
  return g * sig * u;
}

static void swiglu_kernel(const SwigluArgs& a) {
  const int64_t W = a.width, whole = W / VW * VW;
  split(a.rows, a.rows * W * 8, a.num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = a.gate_up + r * a.in_stride;
      const float* u = g + W;
      float* o = a.out + r * a.out_stride;
      int64_t i = 0;
      for (; i < whole; i += VW) store(o + i, swiglu_vec(load(g + i), load(u + i)));
      for (; i < W; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
}

// x rotated into out (head_dim floats): x * cos + rotate_half(x) * sin.
static inline void rotate(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// One query head of one sequence: scores over the cached keys, softmax, the weighted values.
static void query_head(const CachedAttentionArgs& a, int64_t b, int64_t h, std::vector<float>& p) {
  const int64_t D = a.head_dim, L = a.position + 1, dv = D / VW * VW;
  const int64_t g = h / (a.heads / a.kv_heads);
  alignas(64) float q[kMaxDecoderHeadDim];
  rotate(a.qkv + b * a.qkv_stride + h * D, a.cos, a.sin, D, q);
  const float* kc = a.k_cache + b * a.cache_batch_stride + g * a.cache_head_stride;
  const float* vc = a.v_cache + b * a.cache_batch_stride + g * a.cache_head_stride;
  p.resize(static_cast<size_t>(L));
  float top = -INFINITY;
  for (int64_t t = 0; t < L; ++t) {
    const float* k = kc + t * D;
    vf acc0{}, acc1{};
    int64_t i = 0;
    for (; i + 2 * VW <= dv; i += 2 * VW) {
      acc0 += load(q + i) * load(k + i);
      acc1 += load(q + i + VW) * load(k + i + VW);
    }
    for (; i < dv; i += VW) acc0 += load(q + i) * load(k + i);
    float s = hsum(acc0 + acc1);
    for (; i < D; ++i) s += q[i] * k[i];
    p[t] = s * a.scale;
    top = std::max(top, p[t]);
  }
  float sum = 0;
  int64_t t = 0;
  {
    const vf m = splat(top);
    vf total{};
    for (; t + VW <= L; t += VW) {
      const vf e = vexp(load(p.data() + t) - m);
      store(p.data() + t, e);
      total += e;
    }
    sum = hsum(total);
  }
  for (; t < L; ++t) sum += (p[t] = std::exp(p[t] - top));
  const float inv = 1.0f / sum;
  float* o = a.out + b * a.out_stride + h * D;
  for (int64_t i0 = 0; i0 < dv; i0 += 4 * VW) {  // 4 vectors of the head at a time: 4 FMA chains
    const int n = static_cast<int>(std::min<int64_t>(4, (dv - i0) / VW));
    vf acc[4] = {};
    for (int64_t s = 0; s < L; ++s) {
      const vf w = splat(p[s]);
      const float* v = vc + s * D + i0;
      for (int c = 0; c < n; ++c) acc[c] += w * load(v + c * VW);
    }
    for (int c = 0; c < n; ++c) store(o + i0 + c * VW, acc[c] * splat(inv));
  }
  for (int64_t i = dv; i < D; ++i) {
    float acc = 0;
    for (int64_t s = 0; s < L; ++s) acc += p[s] * vc[s * D + i];
    o[i] = acc * inv;
  }
}

static void cached_attention_kernel(const CachedAttentionArgs& a) {
  const int64_t D = a.head_dim;
  for (int64_t b = 0; b < a.batch; ++b) {  // the new keys (rotated) and values into the caches
    const float* row = a.qkv + b * a.qkv_stride;
    for (int64_t g = 0; g < a.kv_heads; ++g) {
      const int64_t at = b * a.cache_batch_stride + g * a.cache_head_stride + a.position * D;
      rotate(row + (a.heads + g) * D, a.cos, a.sin, D, a.k_cache + at);
      std::memcpy(a.v_cache + at, row + (a.heads + a.kv_heads + g) * D, static_cast<size_t>(D) * sizeof(float));
    }
  }
  const int64_t tasks = a.batch * a.heads;
  split(tasks, tasks * (a.position + 1) * D * 2, a.num_threads, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> p;
    for (int64_t t = t0; t < t1; ++t) query_head(a, t / a.heads, t % a.heads, p);
  });
}

}  // namespace decoder
}  // namespace SPARSERT_ISA
}  // namespace sparsert

#include "common/isa_target_end.inc"

#define SPARSERT_DECODER_STR2(x) #x
#define SPARSERT_DECODER_STR(x) SPARSERT_DECODER_STR2(x)

namespace sparsert {
namespace SPARSERT_ISA {

inline void add_decoder_kernel(std::vector<DecoderKernelInfo>& out) {
  const std::string isa = SPARSERT_DECODER_STR(SPARSERT_ISA);
  out.push_back({"f32_decoder_" + isa, isa, "decoder", 1, 1, &decoder::rms_norm_kernel, &decoder::swiglu_kernel,
                 &decoder::cached_attention_kernel});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
