// The row-group kernels (see spmm_rowgroup/spmm_rowgroup.h), written once
// over a GCC/Clang vector of SPARSERT_VEC_FLOATS floats and compiled per ISA:
// spmm_rowgroup_{scalar,avx2,avx512}.cc define SPARSERT_ISA (a namespace),
// SPARSERT_VEC_FLOATS and the target, then include this file.
//
// x is packed once per call into token panels xp[panel][k][P] (P = NV
// vectors of tokens). Per row group and panel, each of the 15 pattern
// segments runs its own loop: per column, NV x vectors are loaded once and
// each feeds popcount(pattern) FMAs (one per row of the pattern), each value
// is broadcast once and feeds NV FMAs. Loads per FMA = (NV + rows) / (NV *
// rows): 0.75 for a 4-row column, 1.5 for a 1-row column (AVX2, NV = 2),
// ~0.97 on average at 50% density. Small patterns take several accumulator
// sets so that at least ~8 FMA chains hide the FMA latency. The loop order
// over K-blocks, panels and groups (what stays in L1 and L2) is described at
// spmm_kernel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "spmm_rowgroup/spmm_rowgroup.h"
#include "common/scratch.h"
#include "common/isa.h"
#include "common/thread_pool.h"

#if defined(SPARSERT_TRANSPOSE_AVX2) || SPARSERT_VEC_FLOATS == 16
#include <immintrin.h>
#endif

#include "common/isa_target_begin.inc"

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including spmm_rowgroup_impl.h"
#endif

#include "common/transpose_impl.h"
#include "common/vec_impl.h"

namespace sparsert {
namespace SPARSERT_ISA {
namespace rowgroup {

using namespace vec;  // (VW, vf, vi, load, store, splat: common/vec_impl.h)

// Accumulator sets: segment_sets (spmm_rowgroup.h). The padding of RowGroup.from_dense
// (SEGMENT_MULTIPLES: 4, 2, 2, 1 columns for 1-4 rows) is a multiple of the sets for
// every panel width (NV = 2 on AVX2 and on AVX-512 past 16 tokens, 4 portable; AVX-512's
// 16-token panel takes the remainder loop for 2-4 rows).
// Tried on Zen 3 and measured no faster at 128-512 tokens, so not kept: a 24-token
// AVX2 panel (NV = 3), and two 16-token panels per pass over a segment (each
// broadcast value feeding 4 x vectors: 1.25 instead of 1.5 loads per FMA for a
// 1-row column) - the loads are not what limits this kernel once x is in L1.

// How far ahead the segment loops of a one-panel product over weights larger than the cache
// prefetch their values (floats; the column indices half as far): 4096 x 4096 at 70%, 16
// tokens, 2 threads, Zen 4: 2037 -> 1455 us (50%: 3063 -> 2682); 256 and 1024 did no better.
// (With several panels the later ones read the weights from L2: the prefetches cost 2-5%.)
constexpr int kStreamAheadFloats = 512;

// tile[r] += the products of one pattern segment: `count` columns, each
// followed in v by the values of the pattern's rows. The tile is a value
// (registers once inlined), and it is the first accumulator set: a segment
// adds into it without a tile load and store.
template <int PAT, int NV, bool STREAM>
__attribute__((always_inline)) static inline void pattern_segment(const int32_t* col, int32_t count,
                                                                  const float* v, const float* xp,
                                                                  vf (&tile)[kRowGroup][NV]) {
  constexpr int P = NV * VW;
  constexpr int NR = pattern_rows(PAT);
  constexpr int S = segment_sets(NR * NV);
  constexpr auto rows = pattern_row_list<PAT>();
  if (count == 0) return;
  vf acc[S][NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NV; ++u) acc[0][r][u] = tile[rows[r]][u];
  for (int s = 1; s < S; ++s)
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < NV; ++u) acc[s][r][u] = vf{};
  int32_t i = 0;
  for (; i + S <= count; i += S) {
    if constexpr (STREAM) {
      __builtin_prefetch(v + static_cast<int64_t>(i) * NR + kStreamAheadFloats);
      __builtin_prefetch(col + i + kStreamAheadFloats / 2);
    }
    for (int s = 0; s < S; ++s) {
      const float* xr = xp + static_cast<int64_t>(col[i + s]) * P;
      const float* vv = v + static_cast<int64_t>(i + s) * NR;
      vf wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = splat(vv[r]);
      for (int u = 0; u < NV; ++u) {
        const vf xv = load(xr + u * VW);
        for (int r = 0; r < NR; ++r) acc[s][r][u] += wv[r] * xv;
      }
    }
  }
  for (; i < count; ++i) {  // the remainder goes to set 0
    const float* xr = xp + static_cast<int64_t>(col[i]) * P;
    const float* vv = v + static_cast<int64_t>(i) * NR;
    for (int u = 0; u < NV; ++u) {
      const vf xv = load(xr + u * VW);
      for (int r = 0; r < NR; ++r) acc[0][r][u] += splat(vv[r]) * xv;
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NV; ++u) {
      vf sum = acc[0][r][u];
      for (int s = 1; s < S; ++s) sum += acc[s][r][u];
      tile[rows[r]][u] = sum;
    }
}

// The 15 segments of one unit (a group in one K-block, RowGroupMatrix::unit)
// over one panel, PAT = 1 .. 15 in order; returns the values consumed.
template <int NV, bool STREAM, int PAT = 1>
__attribute__((always_inline)) static inline const float* group_segments(const RowGroupMatrix& w, int64_t unit,
                                                                         const float* v, const float* xp,
                                                                         vf (&tile)[kRowGroup][NV]) {
  const int64_t s = unit * kRowGroupPatterns + PAT - 1;
  const int32_t begin = w.seg_ptr[s], count = w.seg_ptr[s + 1] - begin;
  pattern_segment<PAT, NV, STREAM>(w.columns + begin, count, v, xp, tile);
  v += static_cast<int64_t>(count) * pattern_rows(PAT);
  if constexpr (PAT < kRowGroupPatterns) return group_segments<NV, STREAM, PAT + 1>(w, unit, v, xp, tile);
  return v;
}

// Values of each group over all its K-blocks, as a prefix sum (groups + 1 entries).
static void group_value_prefix(const RowGroupMatrix& w, const int64_t* unit_offsets,
                               std::vector<int64_t>& out) {
  const int64_t groups = w.group_count();
  out.assign(groups + 1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t n = 0;
    for (int64_t kb = 0; kb < w.kblocks; ++kb) n += unit_offsets[w.unit(kb, g) + 1] - unit_offsets[w.unit(kb, g)];
    out[g + 1] = out[g] + n;
  }
}

// Splits groups [0, groups) into `parts` contiguous ranges of about equal
// cost: their values plus a fixed cost per group (15 loops and the tile).
static void split_groups(const std::vector<int64_t>& offsets, int64_t groups, int parts,
                         std::vector<int64_t>& bounds) {
  bounds.assign(parts + 1, groups);
  bounds[0] = 0;
  const double per_group = 64.0;
  const double total = static_cast<double>(offsets[groups]) + per_group * groups;
  for (int part = 1; part < parts; ++part) {
    int64_t lo = bounds[part - 1], hi = groups;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<double>(offsets[mid]) + per_group * mid < total * part / parts) lo = mid + 1; else hi = mid;
    }
    bounds[part] = lo;
  }
}

// spmv (1-2 tokens): a panel would leave 15 of 16 lanes idle, so each token
// runs alone, scalar: per column one x load feeds the pattern's rows, 4-8
// accumulator chains (1, 2 or 4 sets) hide the FMA latency.
template <int PAT>
__attribute__((always_inline)) static inline void pattern_segment_token(const int32_t* col, int32_t count,
                                                                        const float* v, const float* x,
                                                                        float* acc_rows) {
  constexpr int NR = pattern_rows(PAT);
  constexpr int S = segment_sets(NR * 2);  // 4, 2, 2, 1: from_dense's padding, so no remainder loop runs
  constexpr auto rows = pattern_row_list<PAT>();
  float acc[S][NR] = {};
  int32_t i = 0;
  for (; i + S <= count; i += S)
    for (int s = 0; s < S; ++s) {
      const float xk = x[col[i + s]];
      for (int r = 0; r < NR; ++r) acc[s][r] += v[(i + s) * NR + r] * xk;
    }
  for (; i < count; ++i) {
    const float xk = x[col[i]];
    for (int r = 0; r < NR; ++r) acc[0][r] += v[i * NR + r] * xk;
  }
  for (int r = 0; r < NR; ++r) {
    float sum = 0.0f;
    for (int s = 0; s < S; ++s) sum += acc[s][r];
    acc_rows[rows[r]] += sum;
  }
}

template <int PAT = 1>
__attribute__((always_inline)) static inline void group_segments_token(const RowGroupMatrix& w, int64_t unit,
                                                                       const float* v, const float* x,
                                                                       float* acc_rows) {
  const int64_t s = unit * kRowGroupPatterns + PAT - 1;
  const int32_t begin = w.seg_ptr[s], count = w.seg_ptr[s + 1] - begin;
  pattern_segment_token<PAT>(w.columns + begin, count, v, x, acc_rows);
  if constexpr (PAT < kRowGroupPatterns)
    group_segments_token<PAT + 1>(w, unit, v + static_cast<int64_t>(count) * pattern_rows(PAT), x, acc_rows);
}

static void spmv_kernel(const RowGroupMatrix& w, const SpmmArgs& a) {
  const int64_t groups = w.group_count();
  const int threads = std::max(1, a.num_threads);
  const bool relu = a.epilogue == Epilogue::kRelu;
  std::vector<int64_t> offset_storage, group_values, bounds;
  const int64_t* offsets = unit_value_offsets(w, offset_storage);
  group_value_prefix(w, offsets, group_values);
  split_groups(group_values, groups, threads, bounds);
  parallel_run(threads, [&](int tid, int) {
    for (int64_t t = 0; t < a.tokens; ++t) {
      const float* x = a.x + t * a.x_row_stride;
      float* y = a.y + t * a.y_row_stride;
      // K-blocks outermost, in storage order (one stream of weights, not kblocks);
      // y holds the partial sums between K-blocks.
      for (int64_t kb = 0; kb < w.kblocks; ++kb) {
        const bool first = kb == 0, last = kb + 1 == w.kblocks;
        for (int64_t g = bounds[tid]; g < bounds[tid + 1]; ++g) {
          const int64_t row0 = g * kRowGroup;
          const int nrows = static_cast<int>(std::min<int64_t>(kRowGroup, w.rows - row0));
          float acc[kRowGroup] = {};
          for (int r = 0; r < nrows; ++r) acc[r] = !first ? y[row0 + r] : a.bias ? a.bias[row0 + r] : 0.0f;
          group_segments_token(w, w.unit(kb, g), w.values + offsets[w.unit(kb, g)], x, acc);
          for (int r = 0; r < nrows; ++r) y[row0 + r] = last && relu && acc[r] < 0.0f ? 0.0f : acc[r];
        }
      }
    }
  });
}

// xp[k][t] = x[t0 + t][k] for the P tokens of panel `p` (zero past the last token), columns
// [k0, k1) only, by 8 x 8 transposes; the threads pack column ranges of every panel. (Packed a
// token at a time, every store went to a line of its own and the panel left L1 from 768
// columns: 0.7 ns per value on Zen 4, 33 us of a 180 us call of a 1536 -> 384 layer at 32
// tokens; and at up to 32 tokens one panel, one thread packing it while the other waited.)
template <int P>
static void pack_panel(const SpmmArgs& a, int64_t p, int64_t k0, int64_t k1, float* xp) {
  const int64_t t0 = p * P, valid = std::min<int64_t>(P, a.tokens - t0);
  if (valid < P)
    for (int64_t k = k0; k < k1; ++k)
      for (int u = 0; u < P / VW; ++u) store(xp + k * P + u * VW, vf{});
  transpose(a.x + t0 * a.x_row_stride + k0, a.x_row_stride, valid, k1 - k0, xp + k0 * P, P);
}

// Loop order (GotoBLAS-like), per thread over its range of groups:
//   K-block -> chunk of panels (their x rows of the K-block, <= kChunkBytes,
//   stay in L2) -> row block (consecutive groups whose values in this K-block,
//   <= kBlockWeightBytes, stay in L2) -> panel of the chunk -> group -> its 15
//   pattern segments.
// One panel's x rows of a K-block (cols / kblocks x 64 B) are read from L2 by
// the first group of a row block and from L1 by the others; the row block's
// weights are read from memory once per chunk and from L2 by its panels. Each
// group's 4 x P output tile is updated in L1 (a stack copy) and kept between
// K-blocks in a scratch (tokens x rows floats): one tile load and store per
// group, panel and K-block (a few % of the segments' work). With kblocks = 1
// (files saved before column blocks) a chunk is what fits in L2 of whole x
// panels and the tile goes straight to y, as before.
// Measured on Zen 3, 1 thread, 128-512 tokens (benchmarks/bench_rowgroup.py):
// K-blocks of 256-512 columns 5-40% faster than unblocked (x from L1 instead of
// L2; the more columns and tokens, the larger the gain); 192 or fewer columns
// lose it again to short segments (more loop exits and tile updates per FMA).
constexpr int64_t kChunkBytes = 256 << 10;
constexpr int64_t kBlockWeightBytes = 128 << 10;

#if SPARSERT_VEC_FLOATS == 16
// A full 4-row tile of NV 16-token vectors into y (tokens x rows, 4 consecutive floats per
// token): per vector, 4 unpacks and 4 shuffles make each 128-bit lane one token's 4 rows,
// then 16 stores of 16 bytes, instead of 64 scalar loads and stores through a stack copy.
// Intel Xeon (AVX-512, 1 thread, kblock 384, A/B in one process): 1.04-1.05x at 768 -> 3072
// (32 and 128 tokens, 50% and 70%), 1.00-1.01x at 3072 -> 768 (a quarter of the outputs). A
// similar shuffle transpose measured 0.95-0.99x on Zen 4 (Round 14 of benchmarks/RESULTS.md).
template <int NV>
__attribute__((always_inline)) static inline void store_tile_rows4(const vf (&acc)[kRowGroup][NV], bool relu,
                                                                   float* y, int64_t y_stride) {
  for (int u = 0; u < NV; ++u) {
    __m512 r0 = (__m512)acc[0][u], r1 = (__m512)acc[1][u], r2 = (__m512)acc[2][u], r3 = (__m512)acc[3][u];
    if (relu) {
      const __m512 z = _mm512_setzero_ps();
      r0 = _mm512_max_ps(r0, z); r1 = _mm512_max_ps(r1, z); r2 = _mm512_max_ps(r2, z); r3 = _mm512_max_ps(r3, z);
    }
    const __m512 lo01 = _mm512_unpacklo_ps(r0, r1), hi01 = _mm512_unpackhi_ps(r0, r1);
    const __m512 lo23 = _mm512_unpacklo_ps(r2, r3), hi23 = _mm512_unpackhi_ps(r2, r3);
    // q[i] lane j = token 4j + i of this vector
    const __m512 q[4] = {_mm512_shuffle_ps(lo01, lo23, 0x44), _mm512_shuffle_ps(lo01, lo23, 0xEE),
                         _mm512_shuffle_ps(hi01, hi23, 0x44), _mm512_shuffle_ps(hi01, hi23, 0xEE)};
    float* yu = y + static_cast<int64_t>(u) * VW * y_stride;
    for (int i = 0; i < 4; ++i) {
      _mm_storeu_ps(yu + i * y_stride, _mm512_castps512_ps128(q[i]));
      _mm_storeu_ps(yu + (4 + i) * y_stride, _mm512_extractf32x4_ps(q[i], 1));
      _mm_storeu_ps(yu + (8 + i) * y_stride, _mm512_extractf32x4_ps(q[i], 2));
      _mm_storeu_ps(yu + (12 + i) * y_stride, _mm512_extractf32x4_ps(q[i], 3));
    }
  }
}
#endif

template <int NV, bool STREAM>
static void spmm_kernel(const RowGroupMatrix& w, const SpmmArgs& a) {
  constexpr int P = NV * VW;
  constexpr int64_t T = kRowGroup * P;  // floats per tile
  const int64_t groups = w.group_count();
  const int64_t panels = (a.tokens + P - 1) / P;
  const int threads = std::max(1, a.num_threads);
  const bool relu = a.epilogue == Epilogue::kRelu;
  std::vector<int64_t> offset_storage, group_values, bounds;
  const int64_t* offsets = unit_value_offsets(w, offset_storage);
  group_value_prefix(w, offsets, group_values);
  static thread_local Scratch packed, accumulators;
  const int64_t packed_floats = panels * w.cols * P;
  const bool private_pack = threads > 1 && packed_floats * 4 <= kPrivatePackBytes;
  float* shared = private_pack ? nullptr : packed.get(static_cast<size_t>(packed_floats));
  // Partial sums between K-blocks: [panel][group][row][P] (none with one K-block).
  float* partial = w.kblocks > 1 ? accumulators.get(static_cast<size_t>(panels * groups * T)) : nullptr;
  if (!private_pack)
    parallel_run(threads, [&](int tid, int nt) {
      const int64_t share = (w.cols + 8 * nt - 1) / (8 * nt) * 8;  // whole 8 x 8 transposes
      const int64_t k0 = std::min<int64_t>(w.cols, tid * share), k1 = std::min<int64_t>(w.cols, k0 + share);
      for (int64_t p = 0; p < panels && k0 < k1; ++p) pack_panel<P>(a, p, k0, k1, shared + p * w.cols * P);
    });
  split_groups(group_values, groups, threads, bounds);
  parallel_run(threads, [&](int tid, int) {
    const float* xp = shared;
    if (private_pack) {
      static thread_local Scratch own_panels;
      float* mine = own_panels.get(static_cast<size_t>(packed_floats));
      for (int64_t p = 0; p < panels; ++p) pack_panel<P>(a, p, 0, w.cols, mine + p * w.cols * P);
      xp = mine;
    }
    const int64_t g_begin = bounds[tid], g_end = bounds[tid + 1];
    const int64_t block_cols = (w.cols + w.kblocks - 1) / w.kblocks;
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, block_cols * P * 4));
    alignas(64) float tile[T];  // the finished tile, for its transpose into y
    for (int64_t kb = 0; kb < w.kblocks; ++kb) {
      const bool first = kb == 0, last = kb + 1 == w.kblocks;
      for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
        const int64_t p1 = std::min(panels, p0 + chunk);
        for (int64_t b0 = g_begin, b1; b0 < g_end; b0 = b1) {
          // ~6 bytes per value: the value and its share of the column index (2+ rows per column).
          b1 = b0 + 1;
          while (b1 < g_end && (offsets[w.unit(kb, b1) + 1] - offsets[w.unit(kb, b0)]) * 6 <= kBlockWeightBytes) ++b1;
          for (int64_t p = p0; p < p1; ++p) {
            const float* xpp = xp + p * w.cols * P;
            for (int64_t g = b0; g < b1; ++g) {
              const int64_t unit = w.unit(kb, g), row0 = g * kRowGroup;
              float* saved = first && last ? nullptr : partial + (p * groups + g) * T;
              vf acc[kRowGroup][NV];
              for (int r = 0; r < kRowGroup; ++r)
                for (int u = 0; u < NV; ++u)
                  acc[r][u] = !first ? load(saved + r * P + u * VW)
                                     : splat(a.bias && row0 + r < w.rows ? a.bias[row0 + r] : 0.0f);
              group_segments<NV, STREAM>(w, unit, w.values + offsets[unit], xpp, acc);
              if (!last) {
                for (int r = 0; r < kRowGroup; ++r)
                  for (int u = 0; u < NV; ++u) store(saved + r * P + u * VW, acc[r][u]);
                continue;
              }
              // tile (rows x P) -> y (tokens x rows), with the activation.
              const int64_t t0 = p * P, valid = std::min<int64_t>(P, a.tokens - t0);
              const int nrows = static_cast<int>(std::min<int64_t>(kRowGroup, w.rows - row0));
#if SPARSERT_VEC_FLOATS == 16
              if (nrows == kRowGroup && valid == P) {
                store_tile_rows4(acc, relu, a.y + t0 * a.y_row_stride + row0, a.y_row_stride);
                continue;
              }
#endif
              for (int r = 0; r < kRowGroup; ++r)
                for (int u = 0; u < NV; ++u) store(tile + r * P + u * VW, acc[r][u]);
              for (int64_t t = 0; t < valid; ++t) {
                float* yr = a.y + (t0 + t) * a.y_row_stride + row0;
                for (int r = 0; r < nrows; ++r) {
                  const float v = tile[r * P + t];
                  yr[r] = relu && v < 0.0f ? 0.0f : v;
                }
              }
            }
          }
        }
      }
    }
  });
}

// Panels of NV_FEW vectors while they hold every token, of NV_MANY beyond: on AVX-512
// (Zen 4) one 16-token vector per panel was 4-19% faster than AVX2's kernel at 16 tokens,
// two (32 tokens) 6-30% at 128.
template <int NV_FEW, int NV_MANY>
static void spmm_panels(const RowGroupMatrix& matrix, const SpmmArgs& a) {
  RowGroupMatrix w = matrix;
  std::vector<int64_t> offset_storage;
  w.value_offsets = unit_value_offsets(matrix, offset_storage);  // once, for the kernel too
  // One panel, so each weight is read once per call: the segment loops prefetch their weight
  // streams (kStreamAheadFloats) where the weights are not in L2 - past half the last-level cache
  // (they come from memory), or when the previous product ran on other weights. In a model the
  // layers take turns and each evicts the others' weights from L2: 8 layers called in turn, 2
  // threads, Zen 4, 1.13-1.26x at 16 tokens and 1.07-1.14x at 32 (384 <-> 1536 and 768 <-> 3072,
  // 50% and 70%); MiniLM streamlined, in the model, 1.07-1.12x at 16 tokens, 1.01-1.07x at 32.
  // A product repeated on the same weights finds them in L2, where the prefetches cost 1-5%.
  const int64_t weight_bytes = 4 * (w.value_offsets[w.kblocks * w.group_count()] + w.seg_ptr[
      w.kblocks * w.group_count() * kRowGroupPatterns]);
  const bool repeated = same_weights_as_last_product(w.values);
  const bool stream = 2 * weight_bytes > last_level_cache_bytes() ||
                      (!repeated && weight_bytes >= kPrefetchMinWeightBytes);
  if (a.tokens <= NV_FEW * VW) return stream ? spmm_kernel<NV_FEW, true>(w, a) : spmm_kernel<NV_FEW, false>(w, a);
  if constexpr (NV_FEW == NV_MANY) return spmm_kernel<NV_FEW, false>(w, a);
  if (a.tokens <= NV_MANY * VW)
    return stream ? spmm_kernel<NV_MANY, true>(w, a) : spmm_kernel<NV_MANY, false>(w, a);
  spmm_kernel<NV_MANY, false>(w, a);
}

}  // namespace rowgroup
}  // namespace SPARSERT_ISA
}  // namespace sparsert

#include "common/isa_target_end.inc"

#define SPARSERT_ROWGROUP_STR2(x) #x
#define SPARSERT_ROWGROUP_STR(x) SPARSERT_ROWGROUP_STR2(x)

namespace sparsert {
namespace SPARSERT_ISA {

// Registers this ISA's row-group kernels: spmv (per token) and spmm (panels of NV_FEW
// vectors of tokens where they hold every token, else of NV_MANY).
template <int NV_FEW, int NV_MANY = NV_FEW>
void add_rowgroup_kernel(std::vector<RowGroupKernelInfo>& out) {
  const std::string isa = SPARSERT_ROWGROUP_STR(SPARSERT_ISA);
  out.push_back({"f32_spmv_rowgroup4_" + isa, isa, "spmv", kRowGroup, 1, &rowgroup::spmv_kernel});
  out.push_back({"f32_spmm_rowgroup4_" + isa, isa, "spmm", kRowGroup, 1, &rowgroup::spmm_panels<NV_FEW, NV_MANY>});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
