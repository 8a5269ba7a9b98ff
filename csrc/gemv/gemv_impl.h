// The GEMV kernel (gemv/gemv.h), written once over a GCC/Clang vector of SPARSERT_VEC_FLOATS
// floats and compiled per ISA: gemv_{scalar,avx2,avx512}.cc define SPARSERT_ISA (a namespace),
// SPARSERT_VEC_FLOATS and the target, then include this file.
//
// Each thread takes one contiguous block of rows (so it streams one region of W front to back:
// what the hardware prefetchers follow best), 4 rows at a time: 4 x 2 accumulators, one load of x
// serving 4 rows. Bytes moved: W once (4 bytes per multiply-add), x from L1. A weight under
// kParallelBytes runs on the calling thread (fork-join costs more than streaming it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/thread_pool.h"
#include "gemv/gemv.h"

#include "common/isa_target_begin.inc"
#include "common/vec_impl.h"

namespace sparsert {
namespace SPARSERT_ISA {
namespace gemv {

using namespace vec;  // (VW, vf, load, splat, hsum: common/vec_impl.h)

constexpr int64_t kParallelBytes = int64_t{1} << 17;

// Prefetch distance: the 4-row group at least this far ahead of the one being summed (bytes).
constexpr int64_t kPrefetchAheadBytes = 16 << 10;

// Rows [o0, o1) of y for one token.
static void rows_block(const GemvArgs& a, const float* x, float* y, int64_t o0, int64_t o1) {
  const int64_t n = a.in_features, nv = n / (2 * VW) * (2 * VW);
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const float* w0 = a.w + o * a.w_stride;
    const float* w1 = w0 + a.w_stride;
    const float* w2 = w1 + a.w_stride;
    const float* w3 = w2 + a.w_stride;
    vf s0a{}, s0b{}, s1a{}, s1b{}, s2a{}, s2b{}, s3a{}, s3b{};
    int64_t i = 0;
    // The group ~16 KB on is fetched into L2 (prefetcht1) while these rows stream: from memory
    // 1.2-1.45x faster than fetching the next group with prefetchnta (576 -> 49,152: 4.15 -> 2.85 ms).
    const int64_t group_bytes = 16 * std::max<int64_t>(a.w_stride, 1);
    const int64_t ahead = std::clamp<int64_t>(kPrefetchAheadBytes / group_bytes + 1, 1, 16);
    const float* next = w0 + 4 * ahead * a.w_stride;
    const bool fetch = o + 4 * (ahead + 1) <= o1;
    for (; i < nv; i += 2 * VW) {
      if (fetch) {
        for (int k = 0; k < 4; ++k) {
          __builtin_prefetch(next + k * a.w_stride + i, 0, 2);
          __builtin_prefetch(next + k * a.w_stride + i + 16, 0, 2);
        }
      }
      const vf xa = load(x + i), xb = load(x + i + VW);
      s0a += load(w0 + i) * xa;
      s0b += load(w0 + i + VW) * xb;
      s1a += load(w1 + i) * xa;
      s1b += load(w1 + i + VW) * xb;
      s2a += load(w2 + i) * xa;
      s2b += load(w2 + i + VW) * xb;
      s3a += load(w3 + i) * xa;
      s3b += load(w3 + i + VW) * xb;
    }
    float r0 = hsum(s0a + s0b), r1 = hsum(s1a + s1b), r2 = hsum(s2a + s2b), r3 = hsum(s3a + s3b);
    for (; i < n; ++i) {
      r0 += w0[i] * x[i];
      r1 += w1[i] * x[i];
      r2 += w2[i] * x[i];
      r3 += w3[i] * x[i];
    }
    if (a.bias != nullptr) {
      r0 += a.bias[o];
      r1 += a.bias[o + 1];
      r2 += a.bias[o + 2];
      r3 += a.bias[o + 3];
    }
    y[o] = r0;
    y[o + 1] = r1;
    y[o + 2] = r2;
    y[o + 3] = r3;
  }
  for (; o < o1; ++o) {
    const float* w0 = a.w + o * a.w_stride;
    vf sa{}, sb{};
    int64_t i = 0;
    for (; i < nv; i += 2 * VW) {
      sa += load(w0 + i) * load(x + i);
      sb += load(w0 + i + VW) * load(x + i + VW);
    }
    float r = hsum(sa + sb);
    for (; i < n; ++i) r += w0[i] * x[i];
    y[o] = r + (a.bias != nullptr ? a.bias[o] : 0.0f);
  }
}

static void gemv_kernel(const GemvArgs& a) {
  const int64_t bytes = a.out_features * a.in_features * 4;
  const int threads = bytes >= kParallelBytes ? static_cast<int>(std::min<int64_t>(a.num_threads, a.out_features / 4 + 1))
                                              : 1;
  auto block = [&](int task, int tasks) {
    // blocks of whole 4-row groups, so every thread runs the 4-row loop
    const int64_t groups = (a.out_features + 3) / 4;
    const int64_t o0 = std::min(a.out_features, groups * task / tasks * 4);
    const int64_t o1 = std::min(a.out_features, groups * (task + 1) / tasks * 4);
    for (int64_t r = 0; r < a.rows; ++r) rows_block(a, a.x + r * a.x_stride, a.y + r * a.y_stride, o0, o1);
  };
  if (threads <= 1) {
    block(0, 1);
    return;
  }
  parallel_run(threads, block);
}

}  // namespace gemv
}  // namespace SPARSERT_ISA
}  // namespace sparsert

#include "common/isa_target_end.inc"

#define SPARSERT_GEMV_STR2(x) #x
#define SPARSERT_GEMV_STR(x) SPARSERT_GEMV_STR2(x)

namespace sparsert {
namespace SPARSERT_ISA {

inline void add_gemv_kernel(std::vector<GemvKernelInfo>& out) {
  const std::string isa = SPARSERT_GEMV_STR(SPARSERT_ISA);
  out.push_back({"f32_gemv_" + isa, isa, "gemv", 4, 1, &gemv::gemv_kernel});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
