// The bitmask kernels (see spmm/spmm_bitmask.h), written once and compiled
// per ISA: spmm_bitmask_{scalar,avx2,avx512}.cc
// define SPARSERT_ISA (a namespace), SPARSERT_VEC_FLOATS and the target, then
// include this file.
//
// Two kernel families, one per regime:
//   spmv  Few tokens (decode). Per row and group of 16 columns, the packed
//         values are expanded into a 16-lane weight vector in registers (zero
//         where the mask bit is clear) and multiplied with 16 contiguous x:
//         AVX2 (spmv_avx2_kernel) with a permute from a 256-entry index
//         table and a blend that zeroes the clear lanes: 7 instructions per
//         8 weights; AVX-512 with one vexpandps load per 16 (spmv_expand_kernel)
//         on Intel cores, the permute kernel on Zen 4, where vexpandps measured
//         1.8x slower. Four rows share each x load.
//         The FMAs include the zeros (dense work): the format pays where the
//         layer is bound by the bytes it reads (at 50%: 2.125 instead of 4
//         per weight); on AVX2 the 7 instructions per 8 weights against
//         dense's one FMA leave it at about the speed of a dense GEMV that
//         streams from L3 (benchmarks/RESULTS.md).
//   spmm  Many tokens. x is packed into token panels xp[k][P] (P tokens per
//         column k), and each stored value is broadcast and multiplied with
//         the panel row of its column: only the nonzeros cost FMAs. Columns
//         come from the masks, decoded per row and step into a small index
//         buffer without branches (a 256-entry table per mask byte), not from
//         a stored index array. Rows go in blocks of kRowBlock whose
//         accumulators stay in L1 while the columns go by in steps sized so
//         that a step's slice of the panel (~16 KB) stays in L1 too: each
//         slice is loaded from L2 once per row block and reused by its rows.
//         Panels of <= 16 tokens fit L2 whole and take each row in one step.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "spmm/spmm_bitmask.h"
#include "common/scratch.h"
#include "common/thread_pool.h"

#if defined(SPARSERT_BITMASK_AVX2) || defined(SPARSERT_BITMASK_AVX512)
#include <immintrin.h>
#endif

#include "common/isa_target_begin.inc"

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including spmm_bitmask_impl.h"
#endif

namespace sparsert {
namespace SPARSERT_ISA {
namespace bitmask {

constexpr int VW = SPARSERT_VEC_FLOATS;  // floats per vector
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_unaligned __attribute__((vector_size(VW * 4), aligned(4)));

static inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
typedef int32_t vi __attribute__((vector_size(VW * 4)));
// A broadcast (vf{} + s would cost an add: -0.0 + 0.0 is not -0.0).
static inline vf splat(float s) {
  const vf first = {s};
  return __builtin_shuffle(first, vi{});
}

// Splits rows [0, rows) into `parts` contiguous ranges of about equal cost:
// the stored values plus a fixed cost per mask group.
inline void balanced_rows(const BitmaskMatrix& w, int parts, std::vector<int64_t>& bounds) {
  bounds.assign(parts + 1, w.rows);
  bounds[0] = 0;
  const double group_cost = 1.0;  // mask load + expand, in values
  const double per_row = group_cost * static_cast<double>(w.group_count());
  const double total = static_cast<double>(w.row_offsets[w.rows]) + per_row * w.rows;
  int64_t row = 0;
  for (int p = 1; p < parts; ++p) {
    const double target = total * p / parts;
    int64_t lo = row, hi = w.rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<double>(w.row_offsets[mid]) + per_row * mid < target) lo = mid + 1; else hi = mid;
    }
    row = lo;
    bounds[p] = row;
  }
}

static inline float activate(float v, bool relu) { return relu && v < 0.0f ? 0.0f : v; }

// ---------------------------------------------------------------------------
// spmv: a 16-lane weight vector expanded from the packed values
// ---------------------------------------------------------------------------

#if !defined(SPARSERT_BITMASK_AVX2) && !defined(SPARSERT_BITMASK_AVX512)
// Portable: 16 floats as a vector the compiler lowers to what the target has.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16_unaligned __attribute__((vector_size(64), aligned(4)));
struct W16 { v16 v; };
static inline W16 w16_zero() { return {v16{}}; }
static inline W16 w16_load(const float* p) { return {*reinterpret_cast<const v16_unaligned*>(p)}; }
static inline int fma_expanded(W16& acc, unsigned mask, const float* p, const W16& x) {
  v16 w{};
  int n = 0;
  for (unsigned m = mask; m; m &= m - 1) w[__builtin_ctz(m)] = p[n++];
  acc.v += w * x.v;
  return n;
}
static inline float w16_sum(const W16& a) {
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += a.v[j];
  return s;
}

// Rows [r0, r1) for one token; x holds group_count() * 16 floats (zero padded).
// RT rows at a time share every x load.
template <int RT>
static void spmv_rows(const BitmaskMatrix& w, const float* x, float* y, int64_t r0, int64_t r1,
                      const float* bias, bool relu) {
  const int64_t groups = w.group_count();
  int64_t n = r0;
  for (; n + RT <= r1; n += RT) {
    const uint16_t* masks[RT];
    const float* vals[RT];
    W16 acc[RT];
    for (int r = 0; r < RT; ++r) {
      masks[r] = w.masks + (n + r) * groups;
      vals[r] = w.values + w.row_offsets[n + r];
      acc[r] = w16_zero();
    }
    for (int64_t g = 0; g < groups; ++g) {
      const W16 xg = w16_load(x + g * kBitmaskGroup);
      for (int r = 0; r < RT; ++r) vals[r] += fma_expanded(acc[r], masks[r][g], vals[r], xg);
    }
    for (int r = 0; r < RT; ++r)
      y[n + r] = activate(w16_sum(acc[r]) + (bias ? bias[n + r] : 0.0f), relu);
  }
  for (; n < r1; ++n) {
    const uint16_t* mask = w.masks + n * groups;
    const float* vals = w.values + w.row_offsets[n];
    W16 acc = w16_zero();
    for (int64_t g = 0; g < groups; ++g)
      vals += fma_expanded(acc, mask[g], vals, w16_load(x + g * kBitmaskGroup));
    y[n] = activate(w16_sum(acc) + (bias ? bias[n] : 0.0f), relu);
  }
}
#endif  // portable spmv (AVX2 and AVX-512 use the permute-table spmv below: spmv_avx2_kernel)

// The 1-2 token driver every spmv variant shares: each thread takes a balanced row range and,
// per token, calls rows(x, y, first_row, end_row) on a zero-padded copy of x (the last group
// may reach past the last column).
template <class Rows>
static void spmv_per_token(const BitmaskMatrix& w, const SpmmArgs& a, Rows rows) {
  const int threads = std::max(1, a.num_threads);
  const int64_t padded = w.group_count() * kBitmaskGroup;
  std::vector<int64_t> bounds;
  balanced_rows(w, threads, bounds);
  parallel_run(threads, [&](int tid, int) {
    static thread_local Scratch xpad_scratch;
    float* xpad = xpad_scratch.get(static_cast<size_t>(padded));
    for (int64_t t = 0; t < a.tokens; ++t) {
      std::memcpy(xpad, a.x + t * a.x_row_stride, sizeof(float) * w.cols);
      std::memset(xpad + w.cols, 0, sizeof(float) * (padded - w.cols));
      rows(xpad, a.y + t * a.y_row_stride, bounds[tid], bounds[tid + 1]);
    }
  });
}

#if !defined(SPARSERT_BITMASK_AVX2) && !defined(SPARSERT_BITMASK_AVX512)
template <int RT>
static void spmv_kernel(const BitmaskMatrix& w, const SpmmArgs& a) {
  const bool relu = a.epilogue == Epilogue::kRelu;
  spmv_per_token(w, a, [&](const float* x, float* y, int64_t r0, int64_t r1) {
    spmv_rows<RT>(w, x, y, r0, r1, a.bias, relu);
  });
}
#endif

#if defined(SPARSERT_BITMASK_AVX2) || defined(SPARSERT_BITMASK_AVX512)
// ---------------------------------------------------------------------------
// spmv on AVX2 (and AVX-512): RT rows at a time with one accumulator each
// ---------------------------------------------------------------------------
// Per 8 weights of a row it issues 7 instructions: a byte load of the mask
// (the masks are read as bytes: no shifts or masking), popcnt, the pointer
// add, vpmovsxbd of the 8-byte permute row (table[m] sits at m * 8, a scaled
// index: no shift; 2 KB), vpermps with the values as its memory operand, one
// vblendvps on the index's sign that zeroes the clear lanes (their index is
// -128) and the FMA; the earlier version's 32-byte
// table (a shift per lookup), 16-bit mask split (shift, mask, two movzx) and
// compiler-lowered blend (vpcmpgtd + vandnps) took ~10.5. Weights that come
// from memory (a decode step's model exceeds the cache) need a prefetch: the
// 4 row streams plus the masks are more than the L2 prefetcher keeps ahead of,
// and short rows (576 columns: ~1 KB per row at 50%) end before it has
// trained. While one block of RT rows is summed, the block ~AHEAD_KB (16 KB)
// further on is prefetched into L2 (prefetcht1), its lines spread evenly over
// the block's groups: from memory 1.2-2x faster than a per-row prefetch 256 B
// ahead (SmolLM2's 1,536 x 576 at 50%: 129 -> 65 us; 4,096^2: 1.27 -> 0.91 ms),
// 3-8% slower when the weight is already in cache (the prefetch instructions).
// The x vectors are loaded once per
// group for all RT rows. The pointer chains of the RT rows are independent
// (an add per 8 weights each), so they overlap; the lo and hi halves of a
// group go into the same accumulator (RT chains of 2 FMAs per group). Sums
// are folded once per RT rows (one hadd tree).
struct ExpandTableI8 {
  alignas(64) int8_t idx[256][8];
  ExpandTableI8() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) idx[m][j] = static_cast<int8_t>((m >> j & 1) ? rank++ : -128);
    }
  }
};
static const ExpandTableI8& expand_table_i8() {
  static const ExpandTableI8 table;
  return table;
}
static inline __m256 expand8_i8(const int8_t (*table)[8], unsigned m8, const float* p) {
  const __m256i idx = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(table[m8])));
  const __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx);
#if defined(__GNUC__)
  // One vblendvps (1 uop on Zen 3) that takes idx's sign bit as the lane
  // mask; GCC's own lowering of the blend to zero is vpcmpgtd + vandnps (2).
  __m256 out;
  __asm__("vblendvps %3, %2, %1, %0" : "=x"(out) : "x"(w), "x"(_mm256_setzero_ps()), "x"(idx));
  return out;
#else
  return _mm256_blendv_ps(w, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
#endif
}
static inline float sum8(__m256 a) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// acc[r] += group g of row r, for RT rows whose masks are `stride` bytes
// apart from m0 (m0 = the first row's masks + 2g: one pointer, not RT: RT
// value pointers already hold most of the 16 registers); x16 = x + 16g.
template <int RT>
static inline void spmv_avx2_group(const int8_t (*table)[8], const uint8_t* m0, int64_t stride,
                                   const float** p, __m256* acc, const float* x16) {
  const __m256 xlo = _mm256_loadu_ps(x16), xhi = _mm256_loadu_ps(x16 + 8);
  for (int r = 0; r < RT; ++r) {
    const unsigned lo = m0[r * stride], hi = m0[r * stride + 1];
    acc[r] = _mm256_fmadd_ps(expand8_i8(table, lo, p[r]), xlo, acc[r]);
    p[r] += __builtin_popcount(lo);
    acc[r] = _mm256_fmadd_ps(expand8_i8(table, hi, p[r]), xhi, acc[r]);
    p[r] += __builtin_popcount(hi);
  }
}

// The 4 row sums of acc[0..4) in lanes 0-3 (two hadd levels and one add).
static inline __m128 fold4_rows(const __m256* a) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// The decode kernels' look-ahead: while one block of RT rows is summed, the block ~AHEAD_KB
// further on (in blocks of this row range's mean size) is prefetched into L2 - its masks at
// once (start), its values spread evenly over the block's groups (one group() per group).
template <int RT, int AHEAD_KB>
struct RowBlockPrefetch {
  const BitmaskMatrix& w;
  int64_t r1, ahead = 1;
  const char* next = nullptr;
  int64_t step = 0, done = 0, target = 0;
  RowBlockPrefetch(const BitmaskMatrix& matrix, int64_t r0, int64_t end) : w(matrix), r1(end) {
    const int64_t block_bytes = r1 > r0 ? RT * 4 * (w.row_offsets[r1] - w.row_offsets[r0]) / (r1 - r0) : 0;
    ahead = std::clamp<int64_t>((AHEAD_KB * 1024 + block_bytes - 1) / std::max<int64_t>(block_bytes, 1), 1, 16);
  }
  // Before summing the block of rows [n, n + RT).
  void start(int64_t n) {
    const int64_t groups = w.group_count(), mask_bytes_per_row = 2 * groups;
    const int64_t next_begin = std::min(n + ahead * RT, r1), next_end = std::min(next_begin + RT, r1);
    const auto* masks = reinterpret_cast<const char*>(w.masks) + next_begin * mask_bytes_per_row;
    for (int64_t off = 0; off < (next_end - next_begin) * mask_bytes_per_row; off += 64)
      __builtin_prefetch(masks + off, 0, 2);
    next = reinterpret_cast<const char*>(w.values + w.row_offsets[next_begin]);
    step = ((w.row_offsets[next_end] - w.row_offsets[next_begin]) * 4 + groups - 1) / groups;
    done = target = 0;
  }
  void group() {
    target += step;
    for (; done < target; done += 64) __builtin_prefetch(next + done, 0, 2);
  }
};

// Rows [r0, r1) for one token; x holds group_count() * 16 floats (zero padded).
template <int RT, int AHEAD_KB>
static void spmv_avx2_rows(const BitmaskMatrix& w, const float* x, float* y, int64_t r0, int64_t r1,
                           const float* bias, bool relu) {
  static_assert(RT == 4, "fold4_rows sums 4 rows");
  const int64_t groups = w.group_count();
  const int64_t stride = groups * 2;  // mask bytes per row
  const int8_t (*table)[8] = expand_table_i8().idx;
  // The masks as bytes: byte 2g holds columns 16g..16g+7 (little-endian).
  const auto* mask_bytes = reinterpret_cast<const uint8_t*>(w.masks);
  RowBlockPrefetch<RT, AHEAD_KB> prefetch(w, r0, r1);
  int64_t n = r0;
  for (; n + RT <= r1; n += RT) {
    const float* p[RT];
    __m256 acc[RT];
    for (int r = 0; r < RT; ++r) {
      p[r] = w.values + w.row_offsets[n + r];
      acc[r] = _mm256_setzero_ps();
    }
    const uint8_t* m0 = mask_bytes + n * stride;
    if constexpr (AHEAD_KB > 0) {
      prefetch.start(n);
      for (int64_t g = 0; g < groups; ++g) {
        prefetch.group();
        spmv_avx2_group<RT>(table, m0 + 2 * g, stride, p, acc, x + g * kBitmaskGroup);
      }
    } else {
      for (int64_t g = 0; g < groups; ++g)
        spmv_avx2_group<RT>(table, m0 + 2 * g, stride, p, acc, x + g * kBitmaskGroup);
    }
    float out[4];
    _mm_storeu_ps(out, fold4_rows(acc));
    for (int r = 0; r < RT; ++r) y[n + r] = activate(out[r] + (bias ? bias[n + r] : 0.0f), relu);
  }
  for (; n < r1; ++n) {  // the last < RT rows, one at a time
    const float* p[1] = {w.values + w.row_offsets[n]};
    __m256 acc[1] = {_mm256_setzero_ps()};
    const uint8_t* m0 = mask_bytes + n * stride;
    for (int64_t g = 0; g < groups; ++g)
      spmv_avx2_group<1>(table, m0 + 2 * g, stride, p, acc, x + g * kBitmaskGroup);
    y[n] = activate(sum8(acc[0]) + (bias ? bias[n] : 0.0f), relu);
  }
}

// RT rows per x load; AHEAD_KB: how far ahead the row blocks are prefetched.
template <int RT, int AHEAD_KB>
static void spmv_avx2_kernel(const BitmaskMatrix& w, const SpmmArgs& a) {
  const bool relu = a.epilogue == Epilogue::kRelu;
  spmv_per_token(w, a, [&](const float* x, float* y, int64_t r0, int64_t r1) {
    spmv_avx2_rows<RT, AHEAD_KB>(w, x, y, r0, r1, a.bias, relu);
  });
}
#endif  // SPARSERT_BITMASK_AVX2 || SPARSERT_BITMASK_AVX512

#if defined(SPARSERT_BITMASK_AVX512)
// ---------------------------------------------------------------------------
// spmv on AVX-512 with vexpandps: one expand load per row and 16 weights
// ---------------------------------------------------------------------------
// Per 16 weights of a row: a 16-bit mask load into a mask register, the
// expand load (popcount(mask) floats into the set lanes, zeros elsewhere),
// the FMA, popcnt and the pointer add - ~5 instructions against the permute
// kernel's 14 (two 8-lane halves). Where the expand load is cheap (Intel
// cores: 2 uops) this is the faster decode; Zen 4 runs it at 1.8 ns per row
// and group against the permute's 1.0, so it is registered after the permute
// kernel there (fast_expand_load, common/isa.h). Same row blocks, x loads
// shared by RT rows and look-ahead (RowBlockPrefetch) as spmv_avx2_rows.
template <int RT>
static inline void spmv_expand_group(const uint16_t* m0, int64_t stride, const float** p, __m512* acc,
                                     const float* x16) {
  const __m512 x = _mm512_loadu_ps(x16);
  for (int r = 0; r < RT; ++r) {
    const unsigned m = m0[r * stride];
    acc[r] = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m), p[r]), x, acc[r]);
    p[r] += __builtin_popcount(m);
  }
}

template <int RT, int AHEAD_KB>
static void spmv_expand_rows(const BitmaskMatrix& w, const float* x, float* y, int64_t r0, int64_t r1,
                             const float* bias, bool relu) {
  const int64_t groups = w.group_count();
  const int64_t stride = groups;  // 16-bit masks per row
  const auto* masks = reinterpret_cast<const uint16_t*>(w.masks);
  RowBlockPrefetch<RT, AHEAD_KB> prefetch(w, r0, r1);
  int64_t n = r0;
  for (; n + RT <= r1; n += RT) {
    const float* p[RT];
    __m512 acc[RT];
    for (int r = 0; r < RT; ++r) {
      p[r] = w.values + w.row_offsets[n + r];
      acc[r] = _mm512_setzero_ps();
    }
    const uint16_t* m0 = masks + n * stride;
    if constexpr (AHEAD_KB > 0) {
      prefetch.start(n);
      for (int64_t g = 0; g < groups; ++g) {
        prefetch.group();
        spmv_expand_group<RT>(m0 + g, stride, p, acc, x + g * kBitmaskGroup);
      }
    } else {
      for (int64_t g = 0; g < groups; ++g) spmv_expand_group<RT>(m0 + g, stride, p, acc, x + g * kBitmaskGroup);
    }
    for (int r = 0; r < RT; ++r)
      y[n + r] = activate(_mm512_reduce_add_ps(acc[r]) + (bias ? bias[n + r] : 0.0f), relu);
  }
  for (; n < r1; ++n) {  // the last < RT rows, one at a time
    const float* p[1] = {w.values + w.row_offsets[n]};
    __m512 acc[1] = {_mm512_setzero_ps()};
    for (int64_t g = 0; g < groups; ++g) spmv_expand_group<1>(masks + n * stride + g, stride, p, acc, x + g * kBitmaskGroup);
    y[n] = activate(_mm512_reduce_add_ps(acc[0]) + (bias ? bias[n] : 0.0f), relu);
  }
}

template <int RT, int AHEAD_KB>
static void spmv_expand_kernel(const BitmaskMatrix& w, const SpmmArgs& a) {
  const bool relu = a.epilogue == Epilogue::kRelu;
  spmv_per_token(w, a, [&](const float* x, float* y, int64_t r0, int64_t r1) {
    spmv_expand_rows<RT, AHEAD_KB>(w, x, y, r0, r1, a.bias, relu);
  });
}
#endif  // SPARSERT_BITMASK_AVX512

// ---------------------------------------------------------------------------
// spmm: token panels, one broadcast FMA per stored value and vector of tokens
// ---------------------------------------------------------------------------

constexpr int kRowBlock = 32;  // rows whose accumulators stay in L1 together

// Columns per step for a panel of P tokens: a step's slice of the panel
// (kStep * P floats, ~16 KB) stays in L1 while a row block goes by. Wide
// steps for narrow panels keep the per-(row, step) overhead (accumulator
// load/store, one loop exit) small against the FMAs of the step.
// Narrow panels (<= 16 tokens) are small enough for L2 whole, so they take
// the row in one step (like CSR: one loop per row) instead.
template <int P>
inline int64_t step_columns(int64_t cols) {
  if (P <= 16) return std::min<int64_t>((cols + 15) / 16 * 16, 1 << 15);
  return P >= 64 ? 64 : 128;
}

// decode8[b] lists the set bits of byte b, lowest first (8 slots, unused 0).
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint16_t v8u16_unaligned __attribute__((vector_size(16), aligned(2)));
struct DecodeTable {
  alignas(16) uint16_t pos[256][8];
  DecodeTable() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int j = 0; j < 8; ++j) pos[b][j] = 0;
      for (int j = 0; j < 8; ++j)
        if (b >> j & 1) pos[b][n++] = static_cast<uint16_t>(j);
    }
  }
};
static const DecodeTable& decode_table() {
  static const DecodeTable table;
  return table;
}

// Writes the columns (relative to the step) of row n's stored values in
// groups [g0, g1) to idx, without branches: 8 columns at a time, a table
// lookup and a store that the popcount advances. Returns their count.
static inline int decode_columns(const DecodeTable& t, const uint16_t* masks, int64_t g0, int64_t g1,
                                 uint16_t* idx) {
  uint16_t* out = idx;
  for (int64_t g = g0; g < g1; ++g) {
    const unsigned m = masks[g];
    const uint16_t base = static_cast<uint16_t>((g - g0) * kBitmaskGroup);
    const unsigned lo = m & 0xFF, hi = m >> 8;
    *reinterpret_cast<v8u16_unaligned*>(out) = *reinterpret_cast<const v8u16*>(t.pos[lo]) + base;
    out += __builtin_popcount(lo);
    *reinterpret_cast<v8u16_unaligned*>(out) =
        *reinterpret_cast<const v8u16*>(t.pos[hi]) + static_cast<uint16_t>(base + 8);
    out += __builtin_popcount(hi);
  }
  return static_cast<int>(out - idx);
}

// The packed panel: step s holds columns [s * KS, s * KS + KS) at
// xp + s * (KS + 1) * P, followed by one zero row that padded loop slots
// point at. xp[.][t] = x[t0 + t][k], zero for t >= valid and k >= cols.
template <int P>
static void pack_panel(const SpmmArgs& a, int64_t cols, int64_t KS, int64_t steps, int64_t t0,
                       int64_t valid, float* xp) {
  constexpr int TB = 8;  // tokens per pass: 8 input rows stream, the panel fills in lines
  for (int64_t s = 0; s < steps; ++s) {
    float* slice = xp + s * (KS + 1) * P;
    const int64_t k0 = s * KS, kn = std::min<int64_t>(KS, cols - k0);
    for (int64_t tb = 0; tb < P; tb += TB) {
      for (int64_t k = 0; k < kn; ++k) {
        float* dst = slice + k * P + tb;
        for (int t = 0; t < TB; ++t)
          dst[t] = tb + t < valid ? a.x[(t0 + tb + t) * a.x_row_stride + k0 + k] : 0.0f;
      }
    }
    std::memset(slice + kn * P, 0, sizeof(float) * (KS + 1 - kn) * P);
  }
}

// Rows [r0, r1) over one packed panel (tokens [t0, t0 + valid)). Per row
// and step the columns are decoded first, then one loop does S stored
// values per trip into S accumulator sets (hiding FMA latency when the
// panel is narrow); the last trip's surplus slots multiply the value after
// the row's end (finite: the format rejects NaN and inf) by the zero row.
template <int NV, int S>
static void spmm_panel_rows(const BitmaskMatrix& w, const SpmmArgs& a, const float* xp, int64_t t0,
                            int64_t valid, int64_t r0, int64_t r1) {
  constexpr int P = NV * VW;
  const int64_t KS = step_columns<P>(w.cols);
  const int64_t GS = KS / kBitmaskGroup;  // groups per step
  const int64_t groups = w.group_count();
  const int64_t steps = (groups + GS - 1) / GS;
  const bool relu = a.epilogue == Epilogue::kRelu;
  const DecodeTable& table = decode_table();
  static thread_local Scratch acc_scratch;
  float* acc = acc_scratch.get(static_cast<size_t>(kRowBlock) * P);
  const float* cursor[kRowBlock];
  // Two column buffers: row i + 1 is decoded while row i's FMAs run, so
  // the 16-byte decode stores have retired before their 2-byte entries are
  // loaded (loading them straight after the overlapping stores stalled on
  // store forwarding: a quarter of the time at 50%, 128 tokens).
  const int64_t idx_stride = KS + 8 + S;
  static thread_local std::vector<uint16_t> idx_buffer;
  idx_buffer.resize(static_cast<size_t>(2 * idx_stride));
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, r1 - rb));
    for (int i = 0; i < nr; ++i) {
      const vf b = splat(a.bias ? a.bias[rb + i] : 0.0f);
      for (int v = 0; v < NV; ++v) store(acc + i * P + v * VW, b);
      cursor[i] = w.values + w.row_offsets[rb + i];
    }
    for (int64_t step = 0; step < steps; ++step) {
      const float* xs = xp + step * (KS + 1) * P;
      const int64_t g0 = step * GS, g1 = std::min<int64_t>(groups, g0 + GS);
      int next_count = decode_columns(table, w.masks + rb * groups, g0, g1, idx_buffer.data());
      for (int i = 0; i < nr; ++i) {
        uint16_t* idx = idx_buffer.data() + (i & 1) * idx_stride;
        const int count = next_count;
        if (i + 1 < nr)
          next_count = decode_columns(table, w.masks + (rb + i + 1) * groups, g0, g1,
                                      idx_buffer.data() + ((i + 1) & 1) * idx_stride);
        // A row block reads 32 rows' values a step at a time: 32 short
        // streams, more than the hardware prefetcher follows. Fetch the
        // step's values two rows ahead (3 lines: ~48 values).
        if (i + 2 < nr) {
          __builtin_prefetch(cursor[i + 2]);
          __builtin_prefetch(cursor[i + 2] + 16);
          __builtin_prefetch(cursor[i + 2] + 32);
        }
        if (!count) continue;
        for (int q = 0; q < S; ++q) idx[count + q] = static_cast<uint16_t>(KS);  // the zero row
        const float* v = cursor[i];
        cursor[i] = v + count;
        vf s[S][NV];
        for (int u = 0; u < NV; ++u) s[0][u] = load(acc + i * P + u * VW);
        for (int q = 1; q < S; ++q)
          for (int u = 0; u < NV; ++u) s[q][u] = vf{};
        for (int n = 0; n < count; n += S) {
          for (int q = 0; q < S; ++q) {
            const float* xr = xs + static_cast<int64_t>(idx[n + q]) * P;
            const vf wv = splat(v[n + q]);
            for (int u = 0; u < NV; ++u) s[q][u] += wv * load(xr + u * VW);
          }
        }
        for (int u = 0; u < NV; ++u) {
          vf sum = s[0][u];
          for (int q = 1; q < S; ++q) sum += s[q][u];
          store(acc + i * P + u * VW, sum);
        }
      }
    }
    // acc (rows x P) -> y (tokens x rows), with the activation.
    for (int64_t t = 0; t < valid; ++t) {
      float* yr = a.y + (t0 + t) * a.y_row_stride + rb;
      for (int i = 0; i < nr; ++i) yr[i] = activate(acc[i * P + t], relu);
    }
  }
}

template <int NV, int S>
static void spmm_run(const BitmaskMatrix& w, const SpmmArgs& a) {
  constexpr int P = NV * VW;
  const int64_t KS = step_columns<P>(w.cols);
  const int64_t steps = (w.group_count() + KS / kBitmaskGroup - 1) / (KS / kBitmaskGroup);
  const int64_t panel_floats = steps * (KS + 1) * P;
  const int64_t panels = (a.tokens + P - 1) / P;
  const int threads = std::max(1, a.num_threads);
  if (threads > 1 && panels % threads == 0) {
    // Whole panels per thread: each packs and reads only its own.
    std::atomic<int64_t> next{0};
    parallel_run(threads, [&](int, int) {
      static thread_local Scratch panel_scratch;
      float* xp = panel_scratch.get(static_cast<size_t>(panel_floats));
      for (int64_t p = next.fetch_add(1, std::memory_order_relaxed); p < panels;
           p = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t valid = std::min<int64_t>(P, a.tokens - p * P);
        pack_panel<P>(a, w.cols, KS, steps, p * P, valid, xp);
        spmm_panel_rows<NV, S>(w, a, xp, p * P, valid, 0, w.rows);
      }
    });
    return;
  }
  // Otherwise rows are split; each thread packs every panel for itself
  // (reading what another core just wrote costs more than packing it again).
  std::vector<int64_t> bounds;
  balanced_rows(w, threads, bounds);
  parallel_run(threads, [&](int tid, int) {
    static thread_local Scratch panel_scratch;
    float* xp = panel_scratch.get(static_cast<size_t>(panel_floats));
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t valid = std::min<int64_t>(P, a.tokens - p * P);
      pack_panel<P>(a, w.cols, KS, steps, p * P, valid, xp);
      spmm_panel_rows<NV, S>(w, a, xp, p * P, valid, bounds[tid], bounds[tid + 1]);
    }
  });
}

// Accumulator sets for NV vectors: about 8 independent FMA chains.
constexpr int sets_for(int nv) { return nv >= 8 ? 1 : 8 / nv; }

// The narrowest panel (NV a power of two <= NVMAX) that holds every token.
template <int NVMAX>
static void spmm_kernel(const BitmaskMatrix& w, const SpmmArgs& a) {
  int nv = 1;
  while (nv < NVMAX && static_cast<int64_t>(nv) * VW < a.tokens) nv *= 2;
  switch (nv) {
    case 1: return spmm_run<1, sets_for(1)>(w, a);
    case 2: if constexpr (NVMAX >= 2) return spmm_run<2, sets_for(2)>(w, a); break;
    case 4: if constexpr (NVMAX >= 4) return spmm_run<4, sets_for(4)>(w, a); break;
    case 8: if constexpr (NVMAX >= 8) return spmm_run<8, sets_for(8)>(w, a); break;
  }
}

}  // namespace bitmask
}  // namespace SPARSERT_ISA
}  // namespace sparsert

// Registration runs on every CPU: compiled for the baseline ISA, so the
// target region ends here (an AVX-512 string copy would crash an AVX2 CPU).
#include "common/isa_target_end.inc"

#define SPARSERT_BITMASK_STR2(x) #x
#define SPARSERT_BITMASK_STR(x) SPARSERT_BITMASK_STR2(x)

namespace sparsert {
namespace SPARSERT_ISA {

// Registers this ISA's spmv (RT rows per x load) and spmm (panels of up to
// NVMAX vectors) bitmask kernels.
template <int RT, int NVMAX>
void add_bitmask_kernels(std::vector<BitmaskKernelInfo>& out) {
  const std::string isa = SPARSERT_BITMASK_STR(SPARSERT_ISA);
#if defined(SPARSERT_BITMASK_AVX2) || defined(SPARSERT_BITMASK_AVX512)
  // 4 rows per x load, the row block ~16 KB ahead prefetched into L2. AVX-512 has the same
  // 8-lane permute-table kernel too: on Zen 4 it measured 1.0 ns per row and 16 weights against
  // 1.8 for vexpandps (memory or register form) and 1.3 for a 16-lane vpermt2ps; on an Intel
  // Xeon the expand load was 1.35-1.59x faster (1 token, 2 threads, 50% and 70%).
#if defined(SPARSERT_BITMASK_AVX512)
  // The expand-load kernel: first (selected) where the expand load is cheap, else second.
  const BitmaskKernelInfo expand{"f32_spmv_bitmask16_expand_" + isa, isa, "spmv", 1, kBitmaskGroup,
                                 &bitmask::spmv_expand_kernel<4, 16>};
  if (fast_expand_load()) out.push_back(expand);
#endif
  out.push_back({"f32_spmv_bitmask16_" + isa, isa, "spmv", 1, kBitmaskGroup, &bitmask::spmv_avx2_kernel<4, 16>});
#if defined(SPARSERT_BITMASK_AVX512)
  if (!fast_expand_load()) out.push_back(expand);
#endif
#else
  out.push_back({"f32_spmv_bitmask16_" + isa, isa, "spmv", 1, kBitmaskGroup, &bitmask::spmv_kernel<RT>});
#endif
  out.push_back({"f32_spmm_bitmask16_" + isa, isa, "spmm", 1, kBitmaskGroup, &bitmask::spmm_kernel<NVMAX>});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
