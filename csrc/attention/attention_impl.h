// The attention kernel (attention/attention.h), written once over a GCC/Clang vector of
// SPARSERT_VEC_FLOATS floats and compiled per ISA: attention_{scalar,avx2,avx512}.cc define
// SPARSERT_ISA (a namespace), SPARSERT_VEC_FLOATS and the target, then include this file.
//
// One task per (sentence, head). The head's keys are transposed once into kt[d][token] (zero
// padded to whole vectors), so a query's scores are head_dim broadcast-FMAs per vector of keys;
// then the row's softmax (a vector exp) and ctx = sum_j p_j v_j, the value rows read in place
// (head_dim contiguous floats), query rows kRows at a time so each key and value vector loaded
// serves several rows. At 64 tokens and head_dim 32 a query row costs ~256 FMAs: everything a
// task touches (kt 8 KB, the head's values, the scores) stays in L1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention/attention.h"
#include "common/scratch.h"
#include "common/thread_pool.h"

#include "common/isa_target_begin.inc"
#include "common/vec_impl.h"

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including attention_impl.h"
#endif

namespace sparsert {
namespace SPARSERT_ISA {
namespace attention {

using namespace vec;  // (VW, vf, load, store, splat, vmax, vexp, hmax, hsum: common/vec_impl.h)

// R query rows of one (sentence, head) at a time: every key vector loaded feeds R FMAs, and R x 4
// (scores) or R x 2 x 2 (values) independent FMA chains keep the FMA pipes busy (one row alone
// ran 2 chains of 64 dependent FMAs per value vector: latency-bound, 3.6x slower at 8 x 64).
template <int R>
static inline void query_rows(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, const float* kt, float* p) {
  const int64_t T = a.tokens, D = a.head_dim;
  const int64_t tv = (T + VW - 1) / VW;  // vectors of keys
  const int64_t tp = tv * VW;
  const int64_t off = b * a.batch_stride + h * D;
  const float* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = a.q + off + (i0 + r) * a.row_stride;
  const vf scale = splat(a.scale);
  // scores: p[r][j] for R rows, 4 vectors of keys at a time
  int64_t jv = 0;
  for (; jv + 4 <= tv; jv += 4) {
    vf s[R][4] = {};
    const float* kc = kt + jv * VW;
    for (int64_t d = 0; d < D; ++d) {
      const float* kd = kc + d * tp;
      const vf k0 = load(kd), k1 = load(kd + VW), k2 = load(kd + 2 * VW), k3 = load(kd + 3 * VW);
      for (int r = 0; r < R; ++r) {
        const vf qd = splat(qr[r][d]);
        s[r][0] += qd * k0;
        s[r][1] += qd * k1;
        s[r][2] += qd * k2;
        s[r][3] += qd * k3;
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) store(p + r * tp + (jv + c) * VW, s[r][c] * scale);
  }
  for (; jv < tv; ++jv) {
    vf s[R] = {};
    const float* kc = kt + jv * VW;
    for (int64_t d = 0; d < D; ++d) {
      const vf kd = load(kc + d * tp);
      for (int r = 0; r < R; ++r) s[r] += splat(qr[r][d]) * kd;
    }
    for (int r = 0; r < R; ++r) store(p + r * tp + jv * VW, s[r] * scale);
  }
  // softmax of each row (unnormalised: 1 / sum scales the context at the end)
  const float* bias = a.key_bias != nullptr ? a.key_bias + b * T : nullptr;
  float inv[R];
  for (int r = 0; r < R; ++r) {
    float* pr = p + r * tp;
    if (bias != nullptr) {
      int64_t j = 0;
      for (; j + VW <= T; j += VW) store(pr + j, load(pr + j) + load(bias + j));
      for (; j < T; ++j) pr[j] += bias[j];
    }
    // (padding keys: -inf, so their weight is exp's floor, ~1e-38, and the value loop stops at T)
    for (int64_t j = T; j < tp; ++j) pr[j] = -INFINITY;
    vf top = splat(-INFINITY);
    for (int64_t j = 0; j < tv; ++j) top = vmax(top, load(pr + j * VW));
    const vf m = splat(hmax(top));
    vf total{};
    for (int64_t j = 0; j < tv; ++j) {
      const vf e = vexp(load(pr + j * VW) - m);
      store(pr + j * VW, e);
      total += e;
    }
    inv[r] = 1.0f / hsum(total);
  }
  // context: sum_j p[r][j] v_j, head_dim two vectors at a time, even and odd keys apart
  const float* v = a.v + off;
  float* o[R];
  for (int r = 0; r < R; ++r) o[r] = a.out + b * a.out_batch_stride + (i0 + r) * a.out_row_stride + h * D;
  int64_t d = 0;
  for (; d + 2 * VW <= D; d += 2 * VW) {
    vf c[R][4] = {};
    int64_t j = 0;
    for (; j + 2 <= T; j += 2) {
      const float* v0 = v + j * a.row_stride + d;
      const float* v1 = v0 + a.row_stride;
      const vf a0 = load(v0), a1 = load(v0 + VW), b0 = load(v1), b1 = load(v1 + VW);
      for (int r = 0; r < R; ++r) {
        const vf p0 = splat(p[r * tp + j]), p1 = splat(p[r * tp + j + 1]);
        c[r][0] += p0 * a0;
        c[r][1] += p0 * a1;
        c[r][2] += p1 * b0;
        c[r][3] += p1 * b1;
      }
    }
    if (j < T) {
      const float* v0 = v + j * a.row_stride + d;
      const vf a0 = load(v0), a1 = load(v0 + VW);
      for (int r = 0; r < R; ++r) {
        const vf p0 = splat(p[r * tp + j]);
        c[r][0] += p0 * a0;
        c[r][1] += p0 * a1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(o[r] + d, (c[r][0] + c[r][2]) * splat(inv[r]));
      store(o[r] + d + VW, (c[r][1] + c[r][3]) * splat(inv[r]));
    }
  }
  for (; d + VW <= D; d += VW) {
    for (int r = 0; r < R; ++r) {
      vf c0{}, c1{};
      int64_t j = 0;
      for (; j + 2 <= T; j += 2) {
        c0 += splat(p[r * tp + j]) * load(v + j * a.row_stride + d);
        c1 += splat(p[r * tp + j + 1]) * load(v + (j + 1) * a.row_stride + d);
      }
      if (j < T) c0 += splat(p[r * tp + j]) * load(v + j * a.row_stride + d);
      store(o[r] + d, (c0 + c1) * splat(inv[r]));
    }
  }
  for (; d < D; ++d) {
    for (int r = 0; r < R; ++r) {
      float c = 0;
      for (int64_t j = 0; j < T; ++j) c += p[r * tp + j] * v[j * a.row_stride + d];
      o[r][d] = c * inv[r];
    }
  }
}

// Query rows per block: 4 rows give 16 FMA chains in both loops and load each key and value
// vector once for 4 rows (1.24-1.31x over 2 rows at 32-256 tokens, 12 heads of 32, 2 threads).
constexpr int kRows = 4;

// One (sentence, head): its keys transposed once into kt[d][token] (zero-padded to whole
// vectors), then its query rows kRows at a time.
static void head_task(const AttentionArgs& a, int64_t b, int64_t h) {
  const int64_t T = a.tokens, D = a.head_dim;
  const int64_t tp = (T + VW - 1) / VW * VW;
  static thread_local Scratch scratch;
  float* kt = scratch.get(static_cast<size_t>(D * tp + kRows * tp));  // kt, then kRows rows of scores
  float* p = kt + D * tp;
  const float* k = a.k + b * a.batch_stride + h * D;
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * tp + T, kt + (d + 1) * tp, 0.0f);
  for (int64_t j = 0; j < T; ++j) {
    const float* kr = k + j * a.row_stride;
    for (int64_t d = 0; d < D; ++d) kt[d * tp + j] = kr[d];
  }
  int64_t i = 0;
  for (; i + kRows <= T; i += kRows) query_rows<kRows>(a, b, h, i, kt, p);
  for (; i + 2 <= T; i += 2) query_rows<2>(a, b, h, i, kt, p);
  for (; i < T; ++i) query_rows<1>(a, b, h, i, kt, p);
}

static void attention_kernel(const AttentionArgs& a) {
  const int64_t tasks = a.batch * a.heads;
  if (tasks == 0 || a.tokens == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(1, a.num_threads), tasks));
  parallel_run(threads, [&](int t, int nt) {
    // contiguous runs of (sentence, head) tasks per thread: a sentence's rows stay with one core
    const int64_t begin = tasks * t / nt, end = tasks * (t + 1) / nt;
    for (int64_t task = begin; task < end; ++task) head_task(a, task / a.heads, task % a.heads);
  });
}

}  // namespace attention
}  // namespace SPARSERT_ISA
}  // namespace sparsert

#include "common/isa_target_end.inc"

#define SPARSERT_ATTENTION_STR2(x) #x
#define SPARSERT_ATTENTION_STR(x) SPARSERT_ATTENTION_STR2(x)

namespace sparsert {
namespace SPARSERT_ISA {

inline void add_attention_kernel(std::vector<AttentionKernelInfo>& out) {
  const std::string isa = SPARSERT_ATTENTION_STR(SPARSERT_ISA);
  out.push_back({"f32_attention_" + isa, isa, "attention", 1, 1, &attention::attention_kernel});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
