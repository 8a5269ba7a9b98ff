// The int8 1x4 kernels (see spmm_int8/spmm_int8.h), written once and compiled
// per ISA: spmm_int8_{scalar,avx2,avx512vnni}.cc define SPARSERT_ISA (a
// namespace) and the target, then include this file.
//
// Two kernel families:
//   spmv  Few tokens. Per token and row, 8 blocks at a time: the 8 blocks'
//         32 weights are one 32-byte load, their 8 activation lanes one
//         32-bit gather from the quantised token (AVX2), and one exact
//         dot-product step (dot4) adds 32 products into 8 int32 lanes.
//         Reads per MAC: 1 byte of weight + 0.5 (uint16) or 1 (int32) byte
//         of index per 4 MACs, i.e. 1.125-1.25 bytes/MAC.
//   spmm  Many tokens. Tokens are packed into panels xp[kb][P] of 32-bit
//         lanes (4 quantised activations of one token per lane, P tokens per
//         block column). Per stored block: one 4-byte weight broadcast,
//         then per 8 tokens one panel load and one dot4 (4 instructions for
//         32 MACs on AVX2). Reads per MAC: (4 + 2) / (4 * P) bytes of
//         weight and index, and 1/4 of a 32-byte panel load per token-block.
//
// Two derived layouts (spmm_int8.h) have VNNI kernels of their own: lanes (few tokens: 16
// rows per register, no gathers) and groups (many tokens: rows in groups of 4 whose block
// columns are sorted by which rows hold a block there, so one panel load feeds every row of
// the group that has the column, ~2.1 at 50% block density, instead of one).
//
// AVX-512 VNNI (SPARSERT_INT8_VNNI): vpdpbusd multiplies u8 by s8 and adds
// the 4 products of a 32-bit lane into int32 without saturation, so the
// activations are offset to u8 (x + 128, an xor with 0x80) and the weights
// stay s8: sum_k (x + 128) * w = sum_k x * w + 128 * sum_k w. The second term
// (one per row, "the row's offset") is one vpdpbusd of 128s against the
// row's weights, 64 bytes at a time, and is subtracted in int32. The sums
// may pass 2^31 before the subtraction; int32 lanes wrap (mod 2^32), and the
// true result fits (kInt8MaxCols), so the difference is exact. One vpdpbusd
// does 64 MACs (16 lanes x 4) where AVX2 needs 4 instructions for 32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/scratch.h"
#include "common/thread_pool.h"
#include "spmm_int8/spmm_int8.h"

#if defined(SPARSERT_INT8_AVX2) || defined(SPARSERT_INT8_VNNI)
#include <immintrin.h>
#endif

#include "common/isa_target_begin.inc"

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including spmm_int8_impl.h"
#endif

namespace sparsert {
namespace SPARSERT_ISA {
namespace q8 {

// The one dequantisation (see spmm_int8.h): identical in every kernel.
static inline float dequantize(int32_t acc, float scale, float bias, bool relu) {
  const float v = std::fma(static_cast<float>(acc), scale, bias);
  return relu && v < 0.0f ? 0.0f : v;
}

static inline int32_t load_lane(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// [0, n) split into `parts` ranges of about equal work, where cost(i) is the work of
// [0, i) (non-decreasing, one unit per item included so that empty items still count).
template <typename Cost>
inline void balanced_split(int64_t n, int parts, Cost cost, std::vector<int64_t>& bounds) {
  bounds.assign(parts + 1, n);
  bounds[0] = 0;
  const double total = cost(n);
  for (int p = 1; p < parts; ++p) {
    const double target = total * p / parts;
    int64_t lo = bounds[p - 1], hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cost(mid) < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    bounds[p] = lo;
  }
}

// Rows [0, rows) split into `parts` ranges of about equal blocks (plus one per row).
inline void balanced_rows(const Int8BlockMatrix& w, int parts, std::vector<int64_t>& bounds) {
  balanced_split(w.rows, parts, [&](int64_t r) { return static_cast<double>(w.row_ptr[r]) + static_cast<double>(r); },
                 bounds);
}

#if defined(SPARSERT_INT8_AVX2)
// 8 lanes of sum_j w[j] * x[j] over 4 s8 pairs, exact: |w| (u8, <= 128)
// times sign(w) * x (s8; x in [-127, 127] so the negation cannot wrap);
// vpmaddubsw's pair sums stay <= 2 * 128 * 127 = 32512 (no saturation).
static inline __m256i dot4(__m256i acc, __m256i w_abs, __m256i w, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
template <typename Index>
static inline __m256i load_indices8(const Index* p) {
  if constexpr (sizeof(Index) == 2)
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
#endif

#if defined(SPARSERT_INT8_AVX2) || defined(SPARSERT_INT8_VNNI)
static inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

#if defined(SPARSERT_INT8_VNNI)
// 128 * (sum of the weights of blocks [b, e)) in 16 int32 lanes (wrapping): the
// row's offset, subtracted from sums over u8 = x + 128 activations.
static inline __m512i row_offset(const int8_t* values, int64_t b, int64_t e) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i off = _mm512_setzero_si512();
  const int8_t* p = values + 4 * b;
  int64_t bytes = 4 * (e - b);
  for (; bytes >= 64; bytes -= 64, p += 64) off = _mm512_dpbusd_epi32(off, c128, _mm512_loadu_si512(p));
  if (bytes > 0) off = _mm512_dpbusd_epi32(off, c128, _mm512_maskz_loadu_epi8(~0ull >> (64 - bytes), p));
  return off;
}

// In place: r[j][i] = old r[i][j] for a 16 x 16 matrix of 32-bit lanes (64 shuffles for 256
// elements, where scalar moves need a load and a store each). Used to pack token rows into
// panels and to write the (rows x tokens) output tile as token rows.
static inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // 2x2 blocks of lanes
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c], 128-bit lane L: rows i..i+3 of column 4L + c
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c = lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// sum over blocks [b, e) of one row: weights . the token's activations.
template <typename Index>
static inline int32_t row_dot(const Int8BlockMatrix& w, const Index* ci, int64_t b, int64_t e, const int8_t* xq) {
  int32_t acc = 0;
#if defined(SPARSERT_INT8_VNNI)
  // 8 blocks per step: an 8-lane gather of the token's 4-activation lanes (offset to u8; Zen 4
  // gathers 8 lanes at well over half the rate of 16) and one 32-byte weight load; the last
  // partial step masks its lanes (zero weights add nothing)
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));  // also the u8 128s of the row's offset
  __m256i v = _mm256_setzero_si256(), off = _mm256_setzero_si256();
  for (; b < e; b += 8) {
    const __mmask8 m = e - b >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << (e - b)) - 1);
    const __m256i idx = sizeof(Index) == 2
        ? _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(m, ci + b))
        : _mm256_maskz_loadu_epi32(m, ci + b);
    const __m256i xv = _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), m, idx, xq, 4);
    const __m256i wv = _mm256_maskz_loadu_epi32(m, w.values + 4 * b);
    v = _mm256_dpbusd_epi32(v, _mm256_xor_si256(xv, flip), wv);
    off = _mm256_dpbusd_epi32(off, flip, wv);
  }
  return hsum(_mm256_sub_epi32(v, off));
#elif defined(SPARSERT_INT8_AVX2)
  __m256i v = _mm256_setzero_si256();
  for (; b + 8 <= e; b += 8) {
    const __m256i xv = _mm256_i32gather_epi32(reinterpret_cast<const int*>(xq), load_indices8(ci + b), 4);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.values + 4 * b));
    v = dot4(v, _mm256_abs_epi8(wv), wv, xv);
  }
  acc = hsum(v);
#endif
  for (; b < e; ++b) {
    const int8_t* wp = w.values + 4 * b;
    const int8_t* xp = xq + 4 * static_cast<int64_t>(ci[b]);
    acc += wp[0] * xp[0] + wp[1] * xp[1] + wp[2] * xp[2] + wp[3] * xp[3];
  }
  return acc;
}

template <typename Index>
static void spmv_typed(const Int8BlockMatrix& w, const Int8Activations& x, const Int8Output& o) {
  const Index* ci = static_cast<const Index*>(w.col_idx);
  const bool relu = o.epilogue == Epilogue::kRelu;
  std::vector<int64_t> bounds;
  balanced_rows(w, o.num_threads, bounds);
  parallel_run(o.num_threads, [&](int tid, int) {
    for (int64_t t = 0; t < x.tokens; ++t) {
      const int8_t* xq = x.xq + t * x.xq_stride;
      const float xs = x.x_scales[t];
      float* y = o.y + t * o.y_row_stride;
      for (int64_t n = bounds[tid]; n < bounds[tid + 1]; ++n) {
        const int32_t acc = row_dot(w, ci, w.row_ptr[n], w.row_ptr[n + 1], xq);
        y[n] = dequantize(acc, xs * w.scales[n], o.bias ? o.bias[n] : 0.0f, relu);
      }
    }
  });
}

static void spmv_kernel(const Int8BlockMatrix& w, const Int8Activations& x, const Int8Output& o) {
  if (w.index_bits == 16) spmv_typed<uint16_t>(w, x, o); else spmv_typed<int32_t>(w, x, o);
}

// One token of quantize_rows_s8 (spmm_int8.h): q[0, q_stride) and its scale.
static void quantize_row(const float* xr, int64_t cols, int8_t* qr, int64_t q_stride, float* scale) {
  float amax = 0.0f;
  bool finite = true;
  int64_t k = 0;
#if defined(SPARSERT_INT8_AVX2) || defined(SPARSERT_INT8_VNNI)
  {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
    __m256 m = _mm256_setzero_ps();
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (; k + 8 <= cols; k += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + k), abs_mask);
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, big, _CMP_LE_OQ));  // false for NaN and infinity
      m = _mm256_max_ps(m, a);
    }
    finite = _mm256_movemask_ps(ok) == 0xFF;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float v : lanes) amax = v > amax ? v : amax;
  }
#endif
  for (; k < cols; ++k) {
    const float a = std::fabs(xr[k]);
    finite &= a <= std::numeric_limits<float>::max();
    amax = a > amax ? a : amax;
  }
  if (!finite || amax == 0.0f) {
    std::memset(qr, 0, static_cast<size_t>(q_stride));
    *scale = finite ? 0.0f : std::nanf("");
    return;
  }
  std::memset(qr + cols, 0, static_cast<size_t>(q_stride - cols));  // [0, cols) is written below
  *scale = amax / 127.0f;
  const float inv = 127.0f / amax;
  k = 0;
#if defined(SPARSERT_INT8_AVX2) || defined(SPARSERT_INT8_VNNI)
  {
    // clamp, then round to nearest even (cvtps2dq under the default rounding mode): the
    // bounds are integers, so this equals rounding first and clamping after
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f), vinv = _mm256_set1_ps(inv);
    auto q8 = [&](int64_t at) {
      return _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(xr + at), vinv))));
    };
    for (; k + 32 <= cols; k += 32) {
      const __m256i a = _mm256_packs_epi32(q8(k), q8(k + 8)), b = _mm256_packs_epi32(q8(k + 16), q8(k + 24));
      const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b),
                                                         _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), packed);
    }
  }
#endif
  for (; k < cols; ++k) {
    const float r = std::nearbyint(std::min(127.0f, std::max(-127.0f, xr[k] * inv)));
    qr[k] = static_cast<int8_t>(r);
  }
}

static void quantize_rows(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride, int8_t* q,
                          int64_t q_stride, float* scales, int num_threads) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, tokens / 4)));
  parallel_run(threads, [&](int tid, int parts) {
    for (int64_t t = tid; t < tokens; t += parts)
      quantize_row(x + t * x_row_stride, cols, q + t * q_stride, q_stride, scales + t);
  });
}

// Tokens per SIMD vector of int32 lanes: a panel holds 8 (AVX2) or 16 (AVX-512) tokens per vector.
#if defined(SPARSERT_INT8_VNNI)
constexpr int kLanes = 16;
// vpdpbusd's u8 operand: activations offset by 128 (see the top of this file)
constexpr uint32_t kPanelFlip = 0x80808080u;
#else
constexpr int kLanes = 8;
constexpr uint32_t kPanelFlip = 0;
#endif

// Packs tokens [t0, t0 + valid) into xp[kb * P + t] (32-bit lanes, xor kPanelFlip; zero
// activations for t >= valid).
template <int P>
static void pack_panel(const Int8Activations& x, int64_t blocks, int64_t t0, int64_t valid, int32_t* xp) {
#if defined(SPARSERT_INT8_VNNI)
  // 16 tokens x 16 block columns at a time, transposed in registers
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(kPanelFlip));
  for (int64_t kb0 = 0; kb0 < blocks; kb0 += 16) {
    const int64_t n = std::min<int64_t>(16, blocks - kb0);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    for (int u = 0; u < P / 16; ++u) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t t = 16 * u + j;
        r[j] = t < valid ? _mm512_maskz_loadu_epi32(m, x.xq + (t0 + t) * x.xq_stride + 4 * kb0)
                         : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int64_t j = 0; j < n; ++j)
        _mm512_storeu_si512(xp + (kb0 + j) * P + 16 * u, _mm512_xor_si512(r[j], flip));
    }
  }
#else
  for (int64_t kb = 0; kb < blocks; ++kb) {
    int32_t* dst = xp + kb * P;
    for (int t = 0; t < P; ++t)
      dst[t] = static_cast<int32_t>(
          (t < valid ? static_cast<uint32_t>(load_lane(x.xq + (t0 + t) * x.xq_stride + 4 * kb)) : 0u) ^ kPanelFlip);
  }
#endif
}

constexpr int kTileRows = 64;  // rows whose outputs are transposed through one L1 tile

// Rows [r0, r1) against one panel of P = kLanes * NV tokens. Outputs go through a
// tile (kTileRows rows x P tokens, in L1) so that y is written a token row at
// a time rather than one float per (row, token) at a stride of y_row_stride.
template <int NV, typename Index>
static void spmm_panel_rows(const Int8BlockMatrix& w, const Index* ci, const int32_t* xp, const Int8Activations& x,
                            const Int8Output& o, int64_t t0, int64_t valid, int64_t r0, int64_t r1) {
  constexpr int P = kLanes * NV;
  const bool relu = o.epilogue == Epilogue::kRelu;
  alignas(64) float tile[kTileRows * P];
  for (int64_t rb = r0; rb < r1; rb += kTileRows) {
  const int nr = static_cast<int>(std::min<int64_t>(kTileRows, r1 - rb));
  for (int i = 0; i < nr; ++i) {
    const int64_t n = rb + i;
    const int64_t e = w.row_ptr[n + 1];
    const float ws = w.scales[n];
    const float bias = o.bias ? o.bias[n] : 0.0f;
#if defined(SPARSERT_INT8_VNNI)
    // per block: one 4-byte weight broadcast, then one vpdpbusd per 16 tokens (panel operand from
    // memory). vpdpbusd's latency (~5 cycles) would bound a single chain per vector, so narrow
    // panels keep S independent sets of accumulators (blocks round-robin over them): S * NV >= 4.
    constexpr int S = NV >= 4 ? 1 : 4 / NV;
    __m512i acc[S][NV];
    const __m512i off = _mm512_set1_epi32(_mm512_reduce_add_epi32(row_offset(w.values, w.row_ptr[n], e)));
    for (int s = 0; s < S; ++s)
      for (int u = 0; u < NV; ++u) acc[s][u] = _mm512_setzero_si512();
    int64_t b = w.row_ptr[n];
    for (; b + S <= e; b += S)
      for (int s = 0; s < S; ++s) {
        const __m512i wb = _mm512_set1_epi32(load_lane(w.values + 4 * (b + s)));
        const int32_t* xr = xp + static_cast<int64_t>(ci[b + s]) * P;
        for (int u = 0; u < NV; ++u)
          acc[s][u] = _mm512_dpbusd_epi32(acc[s][u], _mm512_loadu_si512(xr + 16 * u), wb);
      }
    for (; b < e; ++b) {
      const __m512i wb = _mm512_set1_epi32(load_lane(w.values + 4 * b));
      const int32_t* xr = xp + static_cast<int64_t>(ci[b]) * P;
      for (int u = 0; u < NV; ++u)
        acc[0][u] = _mm512_dpbusd_epi32(acc[0][u], _mm512_loadu_si512(xr + 16 * u), wb);
    }
    for (int s = 1; s < S; ++s)
      for (int u = 0; u < NV; ++u) acc[0][u] = _mm512_add_epi32(acc[0][u], acc[s][u]);
    // the dequantisation of spmm_int8.h, 16 tokens at a time (see the AVX2 branch)
    for (int u = 0; u < NV; ++u) {
      const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(x.x_scales + t0 + 16 * u), _mm512_set1_ps(ws));
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[0][u], off)), scale, _mm512_set1_ps(bias));
      if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
      _mm512_store_ps(tile + i * P + 16 * u, v);
    }
#elif defined(SPARSERT_INT8_AVX2)
    __m256i acc[NV];
    for (int u = 0; u < NV; ++u) acc[u] = _mm256_setzero_si256();
    for (int64_t b = w.row_ptr[n]; b < e; ++b) {
      const __m256i wb = _mm256_set1_epi32(load_lane(w.values + 4 * b));
      const __m256i wa = _mm256_abs_epi8(wb);
      const int32_t* xr = xp + static_cast<int64_t>(ci[b]) * P;
      for (int u = 0; u < NV; ++u)
        acc[u] = dot4(acc[u], wa, wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 8 * u)));
    }
    // the dequantisation of spmm_int8.h, 8 tokens at a time (same roundings: a product, then one fma;
    // max(0, v) keeps NaN and -0.0 as the scalar relu does)
    for (int u = 0; u < NV; ++u) {
      const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(x.x_scales + t0 + 8 * u), _mm256_set1_ps(ws));
      __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[u]), scale, _mm256_set1_ps(bias));
      if (relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
      _mm256_store_ps(tile + i * P + 8 * u, v);
    }
#else
    int32_t sums[P];
    for (int t = 0; t < P; ++t) sums[t] = 0;
    for (int64_t b = w.row_ptr[n]; b < e; ++b) {
      const int8_t* wp = w.values + 4 * b;
      const int32_t w0 = wp[0], w1 = wp[1], w2 = wp[2], w3 = wp[3];
      const int8_t* xr = reinterpret_cast<const int8_t*>(xp + static_cast<int64_t>(ci[b]) * P);
      for (int t = 0; t < P; ++t)
        sums[t] += w0 * xr[4 * t] + w1 * xr[4 * t + 1] + w2 * xr[4 * t + 2] + w3 * xr[4 * t + 3];
    }
    for (int t = 0; t < P; ++t) tile[i * P + t] = dequantize(sums[t], x.x_scales[t0 + t] * ws, bias, relu);
#endif
  }
#if defined(SPARSERT_INT8_VNNI)
  // the tile (nr rows x P tokens) to token rows of y, 16 x 16 at a time
  for (int i0 = 0; i0 < nr; i0 += 16) {
    const int rows16 = std::min(16, nr - i0);
    const __mmask16 m = static_cast<__mmask16>((1u << rows16) - 1);
    for (int u = 0; u < P / 16 && 16 * u < valid; ++u) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = j < rows16 ? _mm512_load_si512(tile + (i0 + j) * P + 16 * u) : _mm512_setzero_si512();
      transpose16x16(r);
      const int64_t tokens16 = std::min<int64_t>(16, valid - 16 * u);
      for (int64_t j = 0; j < tokens16; ++j)
        _mm512_mask_storeu_epi32(o.y + (t0 + 16 * u + j) * o.y_row_stride + rb + i0, m, r[j]);
    }
  }
#else
  for (int64_t t = 0; t < valid; ++t) {
    float* yr = o.y + (t0 + t) * o.y_row_stride + rb;
    for (int i = 0; i < nr; ++i) yr[i] = tile[i * P + t];
  }
#endif
  }
}

// Every token in panels of P (panel p at xp + p * blocks * P), packed once in per-thread scratch
// (cheap: one pass over the quantised tokens), the panels split over threads.
template <int P>
static const int32_t* pack_panels(const Int8Activations& x, int64_t blocks, int num_threads) {
  const int64_t panels = (x.tokens + P - 1) / P;
  static thread_local Scratch panel_scratch;
  int32_t* xp = reinterpret_cast<int32_t*>(panel_scratch.get(static_cast<size_t>(panels * blocks * P)));
  parallel_run(std::min<int64_t>(num_threads, panels), [&](int tid, int parts) {
    for (int64_t p = tid; p < panels; p += parts)
      pack_panel<P>(x, blocks, p * P, std::min<int64_t>(P, x.tokens - p * P), xp + p * blocks * P);
  });
  return xp;
}

template <int NV, typename Index>
static void spmm_run(const Int8BlockMatrix& w, const Int8Activations& x, const Int8Output& o) {
  constexpr int P = kLanes * NV;
  const Index* ci = static_cast<const Index*>(w.col_idx);
  const int64_t blocks = w.block_col_count();
  const int64_t panels = (x.tokens + P - 1) / P;
  // All panels packed once, then rows split over threads.
  const int32_t* xp = pack_panels<P>(x, blocks, o.num_threads);
  std::vector<int64_t> bounds;
  balanced_rows(w, o.num_threads, bounds);
  parallel_run(o.num_threads, [&](int tid, int) {
    for (int64_t p = 0; p < panels; ++p)
      spmm_panel_rows<NV>(w, ci, xp + p * blocks * P, x, o, p * P, std::min<int64_t>(P, x.tokens - p * P),
                          bounds[tid], bounds[tid + 1]);
  });
}

// The narrowest panel (1, 2 or 4 vectors of kLanes tokens) that holds every token.
template <int NVMAX, typename Index>
static void spmm_typed(const Int8BlockMatrix& w, const Int8Activations& x, const Int8Output& o) {
  if (x.tokens <= kLanes || NVMAX == 1) return spmm_run<1, Index>(w, x, o);
  if constexpr (NVMAX >= 2)
    if (x.tokens <= 2 * kLanes || NVMAX == 2) return spmm_run<2, Index>(w, x, o);
  if constexpr (NVMAX >= 4) return spmm_run<4, Index>(w, x, o);
}

template <int NVMAX>
static void spmm_kernel(const Int8BlockMatrix& w, const Int8Activations& x, const Int8Output& o) {
  if (w.index_bits == 16) spmm_typed<NVMAX, uint16_t>(w, x, o); else spmm_typed<NVMAX, int32_t>(w, x, o);
}

#if defined(SPARSERT_INT8_VNNI)
// The lanes kernel (Int8LaneMatrix in spmm_int8.h): T tokens of groups [g0, g1). Per chunk,
// each token's 128 activations (offset to u8) sit in two registers; per step, one 16-byte
// index load, one 64-byte weight load, the row offsets' vpdpbusd, and per token one vpermt2d
// and one vpdpbusd. Two sets of accumulators (even and odd steps) halve the chains' latency.
template <int T>
static void lanes_tokens(const Int8LaneMatrix& w, const Int8Activations& x, const Int8Output& o, int64_t t0,
                         int64_t g0, int64_t g1) {
  const int64_t chunks = w.chunks();
  const int64_t qbytes = ((w.cols + kInt8BlockCols - 1) / kInt8BlockCols) * kInt8BlockCols;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const bool relu = o.epilogue == Epilogue::kRelu;
  for (int64_t g = g0; g < g1; ++g) {
    __m512i acc[2][T], off[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int t = 0; t < T; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t s = w.step_ptr[g * chunks + c];
      const int64_t e = w.step_ptr[g * chunks + c + 1];
      if (s == e) continue;
      const int64_t avail = qbytes - 128 * c;  // activation bytes of this chunk (the rest reads as zero)
      const __mmask64 m_lo = avail >= 64 ? ~0ull : ~0ull >> (64 - avail);
      const __mmask64 m_hi = avail >= 128 ? ~0ull : avail > 64 ? ~0ull >> (128 - avail) : 0ull;
      __m512i lo[T], hi[T];
      for (int t = 0; t < T; ++t) {
        const int8_t* xr = x.xq + (t0 + t) * x.xq_stride + 128 * c;
        lo[t] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m_lo, xr), flip);
        hi[t] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m_hi, xr + 64), flip);
      }
      auto step = [&](int set, int64_t at) {
        const auto* cols16 = reinterpret_cast<const __m128i*>(w.lane_cols + 16 * at);
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(cols16));
        const __m512i wv = _mm512_loadu_si512(w.lane_w + 64 * at);
        off[set] = _mm512_dpbusd_epi32(off[set], flip, wv);
        for (int t = 0; t < T; ++t)
          acc[set][t] = _mm512_dpbusd_epi32(acc[set][t], _mm512_permutex2var_epi32(lo[t], idx, hi[t]), wv);
      };
      for (; s + 2 <= e; s += 2) {
        step(0, s);
        step(1, s + 1);
      }
      if (s < e) step(0, s);
    }
    const int64_t n0 = g * kLaneRows;
    const int nr = static_cast<int>(std::min<int64_t>(kLaneRows, w.rows - n0));
    const __mmask16 m = static_cast<__mmask16>((1u << nr) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(m, w.scales + n0);
    const __m512 bias = o.bias ? _mm512_maskz_loadu_ps(m, o.bias + n0) : _mm512_setzero_ps();
    const __m512i offset = _mm512_add_epi32(off[0], off[1]);
    // the dequantisation of spmm_int8.h, 16 rows at a time (a product, then one fma)
    for (int t = 0; t < T; ++t) {
      const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(acc[0][t], acc[1][t]), offset);
      const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(x.x_scales[t0 + t]), ws);
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, bias);
      if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
      _mm512_mask_storeu_ps(o.y + (t0 + t) * o.y_row_stride + n0, m, v);
    }
  }
}

static void lanes_kernel(const Int8LaneMatrix& w, const Int8Activations& x, const Int8Output& o) {
  const int64_t groups = w.groups(), chunks = w.chunks();
  // groups split over threads by steps (plus one per group). (A floor of ~4,096 token-steps per thread
  // measured worse: 768->3072 at 90%, 1 token, 22.5 us on one thread vs 17.9 on two; 384x384 gained 0.5 us.)
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(o.num_threads, groups)));
  std::vector<int64_t> bounds;
  balanced_split(groups, parts, [&](int64_t g) {
    return static_cast<double>(w.step_ptr[g * chunks]) + static_cast<double>(g);
  }, bounds);
  parallel_run(parts, [&](int tid, int) {
    int64_t t = 0;
    for (; t + 4 <= x.tokens; t += 4) lanes_tokens<4>(w, x, o, t, bounds[tid], bounds[tid + 1]);
    switch (x.tokens - t) {
      case 3: lanes_tokens<3>(w, x, o, t, bounds[tid], bounds[tid + 1]); break;
      case 2: lanes_tokens<2>(w, x, o, t, bounds[tid], bounds[tid + 1]); break;
      case 1: lanes_tokens<1>(w, x, o, t, bounds[tid], bounds[tid + 1]); break;
      default: break;
    }
  });
}

// ---- the groups kernel (Int8GroupMatrix in spmm_int8.h) ----

// acc[r] += one pattern segment: `count` columns, each followed in `blk` by the blocks of the
// pattern's rows. Per column: NV panel loads, then per row one broadcast and NV vpdpbusd (the
// fp32 row-group kernel's pattern_segment, spmm_rowgroup_impl.h, in int32 lanes).
template <int PAT, int NV>
__attribute__((always_inline)) static inline void group_segment(const int32_t* col, int32_t count,
                                                                const int32_t* blk, const int32_t* xp,
                                                                __m512i (&acc)[kRowGroup][NV]) {
  constexpr int P = kLanes * NV;
  constexpr int NR = pattern_rows(PAT);
  constexpr int S = segment_sets(NR * NV);
  constexpr auto rows = pattern_row_list<PAT>();
  if (count == 0) return;
  __m512i part[S][NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NV; ++u) {
      part[0][r][u] = acc[rows[r]][u];
      for (int s = 1; s < S; ++s) part[s][r][u] = _mm512_setzero_si512();
    }
  int32_t i = 0;
  for (; i + S <= count; i += S)
    for (int s = 0; s < S; ++s) {
      const int32_t* xr = xp + static_cast<int64_t>(col[i + s]) * P;
      __m512i xv[NV];
      for (int u = 0; u < NV; ++u) xv[u] = _mm512_loadu_si512(xr + 16 * u);
      for (int r = 0; r < NR; ++r) {
        const __m512i wb = _mm512_set1_epi32(blk[(i + s) * NR + r]);
        for (int u = 0; u < NV; ++u) part[s][r][u] = _mm512_dpbusd_epi32(part[s][r][u], xv[u], wb);
      }
    }
  for (; i < count; ++i) {  // the remainder goes to set 0
    const int32_t* xr = xp + static_cast<int64_t>(col[i]) * P;
    for (int r = 0; r < NR; ++r) {
      const __m512i wb = _mm512_set1_epi32(blk[i * NR + r]);
      for (int u = 0; u < NV; ++u)
        part[0][r][u] = _mm512_dpbusd_epi32(part[0][r][u], _mm512_loadu_si512(xr + 16 * u), wb);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NV; ++u) {
      __m512i sum = part[0][r][u];
      for (int s = 1; s < S; ++s) sum = _mm512_add_epi32(sum, part[s][r][u]);
      acc[rows[r]][u] = sum;
    }
}

// The 15 segments of group g, PAT = 1 .. 15 in order.
template <int NV, int PAT = 1>
__attribute__((always_inline)) static inline void group_segments(const Int8GroupMatrix& w, int64_t g,
                                                                 const int32_t* blk, const int32_t* xp,
                                                                 __m512i (&acc)[kRowGroup][NV]) {
  const int64_t s = g * kRowGroupPatterns + PAT - 1;
  const int32_t begin = w.seg_ptr[s], count = w.seg_ptr[s + 1] - begin;
  group_segment<PAT, NV>(w.columns + begin, count, blk, xp, acc);
  if constexpr (PAT < kRowGroupPatterns)
    group_segments<NV, PAT + 1>(w, g, blk + static_cast<int64_t>(count) * pattern_rows(PAT), xp, acc);
}

// Groups [g0, g1) against one panel of P = 16 NV tokens; the outputs of 4 groups (16 rows) go
// through an L1 tile and one 16 x 16 transpose per 16 tokens into token rows of y.
template <int NV>
static void groups_panel(const Int8GroupMatrix& w, const int32_t* xp, const Int8Activations& x, const Int8Output& o,
                         int64_t t0, int64_t valid, int64_t g0, int64_t g1) {
  constexpr int P = kLanes * NV;
  const bool relu = o.epilogue == Epilogue::kRelu;
  alignas(64) float tile[16 * P];
  for (int64_t gb = g0; gb < g1; gb += 4) {
    const int64_t rb = gb * kRowGroup;
    const int nr = static_cast<int>(std::min<int64_t>(std::min<int64_t>(g1 - gb, 4) * kRowGroup, w.rows - rb));
    for (int64_t g = gb; g < std::min<int64_t>(g1, gb + 4); ++g) {
      __m512i acc[kRowGroup][NV];
      for (int r = 0; r < kRowGroup; ++r)
        for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_si512();
      group_segments<NV>(w, g, w.blocks + w.group_ptr[g], xp, acc);
      for (int r = 0; r < kRowGroup; ++r) {
        const int64_t n = g * kRowGroup + r;
        if (n >= w.rows) break;
        const __m512i off = _mm512_set1_epi32(w.row_offsets[n]);
        const float ws = w.scales[n], bias = o.bias ? o.bias[n] : 0.0f;
        // the dequantisation of spmm_int8.h, as spmm_panel_rows does it
        for (int u = 0; u < NV; ++u) {
          const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(x.x_scales + t0 + 16 * u), _mm512_set1_ps(ws));
          __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][u], off)), scale, _mm512_set1_ps(bias));
          if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
          _mm512_store_ps(tile + (n - rb) * P + 16 * u, v);
        }
      }
    }
    const __mmask16 m = static_cast<__mmask16>((1u << nr) - 1);
    for (int u = 0; u < P / 16 && 16 * u < valid; ++u) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) r[j] = j < nr ? _mm512_load_si512(tile + j * P + 16 * u) : _mm512_setzero_si512();
      transpose16x16(r);
      const int64_t tokens16 = std::min<int64_t>(16, valid - 16 * u);
      for (int64_t j = 0; j < tokens16; ++j)
        _mm512_mask_storeu_epi32(o.y + (t0 + 16 * u + j) * o.y_row_stride + rb, m, r[j]);
    }
  }
}

template <int NV>
static void groups_run(const Int8GroupMatrix& w, const Int8Activations& x, const Int8Output& o) {
  constexpr int P = kLanes * NV;
  const int64_t blocks = w.block_col_count(), groups = w.groups();
  const int64_t panels = (x.tokens + P - 1) / P;
  const int32_t* xp = pack_panels<P>(x, blocks, o.num_threads);
  // groups split over threads by blocks (plus 8 per group: its 15 segment loops and output)
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(o.num_threads, groups)));
  std::vector<int64_t> bounds;
  balanced_split(groups, parts, [&](int64_t g) {
    return static_cast<double>(w.group_ptr[g]) + 8.0 * static_cast<double>(g);
  }, bounds);
  parallel_run(parts, [&](int tid, int) {
    for (int64_t p = 0; p < panels; ++p)
      groups_panel<NV>(w, xp + p * blocks * P, x, o, p * P, std::min<int64_t>(P, x.tokens - p * P), bounds[tid],
                       bounds[tid + 1]);
  });
}

// The narrowest panel (16, 32 or 64 tokens) that holds every token.
static void groups_kernel(const Int8GroupMatrix& w, const Int8Activations& x, const Int8Output& o) {
  if (x.tokens <= kLanes) return groups_run<1>(w, x, o);
  if (x.tokens <= 2 * kLanes) return groups_run<2>(w, x, o);
  groups_run<4>(w, x, o);
}
#endif

}  // namespace q8
}  // namespace SPARSERT_ISA
}  // namespace sparsert

#include "common/isa_target_end.inc"

#define SPARSERT_INT8_STR2(x) #x
#define SPARSERT_INT8_STR(x) SPARSERT_INT8_STR2(x)

namespace sparsert {
namespace SPARSERT_ISA {

void quantize_rows_s8(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride, int8_t* q,
                             int64_t q_stride, float* scales, int num_threads) {
  q8::quantize_rows(x, tokens, cols, x_row_stride, q, q_stride, scales, num_threads);
}

#if defined(SPARSERT_INT8_VNNI)
void spmm_int8_lanes(const Int8LaneMatrix& w, const Int8Activations& x, const Int8Output& o) {
  q8::lanes_kernel(w, x, o);
}
void spmm_int8_groups(const Int8GroupMatrix& w, const Int8Activations& x, const Int8Output& o) {
  q8::groups_kernel(w, x, o);
}
#endif

template <int NVMAX>
void add_int8_kernels(std::vector<Int8KernelInfo>& out) {
  const std::string isa = SPARSERT_INT8_STR(SPARSERT_ISA);
  out.push_back({"s8_spmv_bsr1x4_" + isa, isa, "spmv", 1, kInt8BlockCols, &q8::spmv_kernel});
  out.push_back({"s8_spmm_bsr1x4_" + isa, isa, "spmm", 1, kInt8BlockCols, &q8::spmm_kernel<NVMAX>});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
