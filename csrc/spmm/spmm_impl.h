// The fast sparse kernels, written once over a SIMD vector of
// SPARSERT_VEC_FLOATS floats (GCC/Clang vector extensions) and compiled once
// per ISA: spmm_scalar.cc (portable), spmm_avx2.cc (-mavx2 -mfma) and
// spmm_avx512.cc (-mavx512f). Each of those files defines SPARSERT_ISA (a
// namespace name) and SPARSERT_VEC_FLOATS, then includes this file.
//
// Two kernel families:
//   spmm  Many tokens. x is packed once per call into token panels
//         xp[panel][k][P] (P = NV vectors of tokens, zero padded), so every
//         nonzero block loads NV contiguous vectors and does R*C*NV FMAs into
//         an R x NV register tile of accumulators. The tile is written to a
//         small per-thread scratch, then transposed into y (tokens x rows).
//   spmv  Few tokens (decode). Per token, each block row is a dot product of
//         its blocks with x; R-row blocks give R independent sums.
// Threads split block rows into contiguous ranges of equal nonzero count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include <functional>
#include <string>

#include "spmm/spmm.h"
#include "common/scratch.h"
#include "common/thread_pool.h"

#if defined(SPARSERT_TRANSPOSE_AVX2)
#include <immintrin.h>
#endif

#include "common/isa_target_begin.inc"

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including spmm_impl.h"
#endif
#ifndef SPARSERT_VEC_FLOATS
#error "define SPARSERT_VEC_FLOATS before including spmm_impl.h"
#endif

#include "common/transpose_impl.h"

namespace sparsert {
namespace SPARSERT_ISA {

constexpr int VW = SPARSERT_VEC_FLOATS;  // floats per vector
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_unaligned __attribute__((vector_size(VW * 4), aligned(4)));

static inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
static inline vf splat(float s) { return vf{} + s; }
static inline vf relu(vf v) {
  const vf zero{};
  return v > zero ? v : zero;  // lane-wise select
}

// Splits block rows [0, block_rows) into `parts` contiguous ranges with about
// equal cost, where a block row costs its block count plus a fixed overhead.
// row_ptr may point into a larger matrix's row pointer (one group of a
// grouped convolution): offsets are taken relative to row_ptr[0].
inline void balanced_ranges(const int32_t* row_ptr, int64_t block_rows, int parts,
                            std::vector<int64_t>& bounds) {
  bounds.assign(parts + 1, block_rows);
  bounds[0] = 0;
  const double row_cost = 2.0;  // loop + store overhead of a row, in blocks
  const double base = row_ptr[0];
  const double total = (row_ptr[block_rows] - base) + row_cost * block_rows;
  int64_t row = 0;
  for (int p = 1; p < parts; ++p) {
    const double target = total * p / parts;
    // First row whose prefix cost reaches the target (cost is monotone).
    int64_t lo = row, hi = block_rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if ((row_ptr[mid] - base) + row_cost * mid < target) lo = mid + 1; else hi = mid;
    }
    row = lo;
    bounds[p] = row;
  }
}

// ---------------------------------------------------------------------------
// spmm: token panels
// ---------------------------------------------------------------------------

#ifndef SPARSERT_MIN_CHAINS
// Independent accumulators needed to hide FMA latency (2 pipes x 4 cycles).
#define SPARSERT_MIN_CHAINS 8
#endif

// Accumulator sets for an RT x NV tile: enough chains, at most 4 sets.
constexpr int sets_for(int rt, int nv) {
  return rt * nv >= SPARSERT_MIN_CHAINS ? 1 : (SPARSERT_MIN_CHAINS / (rt * nv) > 4 ? 4 : SPARSERT_MIN_CHAINS / (rt * nv));
}


// Accumulates one register tile: rows [r0, r0 + RT) of block row `br` (a
// block has R rows, C columns) over the panel `xp` of P = NV * VW tokens, and
// stores act(acc + bias) to out[r][P]. S independent accumulator sets hide
// FMA latency when the tile is small; they are summed at the end.
//
// x rows (one per input column k) are `x_stride` floats apart and hold at
// least NV * VW readable tokens; output row r goes to out + r * out_stride.
// (Token panels use x_stride = P; a 1x1 convolution over an NCHW image uses
// the image itself, x_stride = H * W.)
// Always inlined: as a call, its argument setup and the spills around it
// cost ~20% of a CSR product with short rows (nearly empty 768 -> 3072 at
// 128 tokens, 1 thread: 240 -> 200 us).
template <int R, int C, int RT, int NV, int S, typename Idx>
__attribute__((always_inline)) static inline void spmm_tile(
    const int32_t* row_ptr, const Idx* col_idx, const float* values, const float* xp,
    int64_t x_stride, int64_t br, int r0, const float* bias_rows, bool relu_out, float* out,
    int64_t out_stride) {
  vf acc[S][RT][NV];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < RT; ++r)
      for (int v = 0; v < NV; ++v) acc[s][r][v] = vf{};

  const int32_t begin = row_ptr[br], end = row_ptr[br + 1];
  int32_t b = begin;
  for (; b + S <= end; b += S) {
    for (int s = 0; s < S; ++s) {
      const float* xb = xp + static_cast<int64_t>(col_idx[b + s]) * C * x_stride;
      const float* wb = values + static_cast<int64_t>(b + s) * (R * C) + r0 * C;
      for (int c = 0; c < C; ++c) {
        vf xv[NV];
        for (int v = 0; v < NV; ++v) xv[v] = load(xb + c * x_stride + v * VW);
        for (int r = 0; r < RT; ++r) {
          const vf w = splat(wb[r * C + c]);
          for (int v = 0; v < NV; ++v) acc[s][r][v] += w * xv[v];
        }
      }
    }
  }
  for (; b < end; ++b) {  // the remainder goes to set 0
    const float* xb = xp + static_cast<int64_t>(col_idx[b]) * C * x_stride;
    const float* wb = values + static_cast<int64_t>(b) * (R * C) + r0 * C;
    for (int c = 0; c < C; ++c) {
      vf xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = load(xb + c * x_stride + v * VW);
      for (int r = 0; r < RT; ++r) {
        const vf w = splat(wb[r * C + c]);
        for (int v = 0; v < NV; ++v) acc[0][r][v] += w * xv[v];
      }
    }
  }
  for (int r = 0; r < RT; ++r) {
    const vf bias = splat(bias_rows ? bias_rows[r] : 0.0f);
    for (int v = 0; v < NV; ++v) {
      vf sum = acc[0][r][v];
      for (int s = 1; s < S; ++s) sum += acc[s][r][v];
      sum += bias;
      if (relu_out) sum = relu(sum);
      store(out + r * out_stride + v * VW, sum);
    }
  }
}

// Any block shape (R x C known only at run time): a small dense
// micro-kernel per block. For each of the block's C columns it loads the NV
// x vectors of that input column once and broadcasts RT weights of the
// column into an RT x NV register tile, so a weight costs one broadcast load
// and NV FMAs, and an x vector is reused RT times: (NV + RT) loads per
// RT * NV FMAs (AVX2, RT = 4, NV = 2: 0.75). The weights are streamed once
// per panel, the x rows of a block stay in L1 across its RT-row passes.
// Short tiles (R < RT, e.g. 1 x 8 blocks) take S accumulator sets over
// alternate blocks, so that RT * NV * S chains hide the FMA latency.
template <int RT, int NV, int S, typename Idx>
__attribute__((always_inline)) static inline void spmm_block_any(
    vf (&acc)[RT][NV], const Idx* col_idx, const float* values, int64_t block_size, int C,
    const float* xp, int64_t x_stride, int r0, int32_t b) {
  const float* xb = xp + static_cast<int64_t>(col_idx[b]) * C * x_stride;
  const float* wb = values + b * block_size + static_cast<int64_t>(r0) * C;
  for (int c = 0; c < C; ++c) {
    vf xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = load(xb + c * x_stride + v * VW);
    for (int r = 0; r < RT; ++r) {
      const vf wv = splat(wb[r * C + c]);
      for (int v = 0; v < NV; ++v) acc[r][v] += wv * xv[v];
    }
  }
}

template <int RT, int NV, int S, typename Idx>
__attribute__((always_inline)) static inline void spmm_tile_any(
    const int32_t* row_ptr, const Idx* col_idx, const float* values, int R, int C, const float* xp,
    int64_t x_stride, int64_t br, int r0, const float* bias_rows, bool relu_out, float* out,
    int64_t out_stride) {
  vf acc[S][RT][NV];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < RT; ++r)
      for (int v = 0; v < NV; ++v) acc[s][r][v] = vf{};
  const int64_t block_size = static_cast<int64_t>(R) * C;
  const int32_t end = row_ptr[br + 1];
  int32_t b = row_ptr[br];
  for (; b + S <= end; b += S)
    for (int s = 0; s < S; ++s)
      spmm_block_any<RT, NV, S, Idx>(acc[s], col_idx, values, block_size, C, xp, x_stride, r0, b + s);
  for (; b < end; ++b)  // the remainder goes to set 0
    spmm_block_any<RT, NV, S, Idx>(acc[0], col_idx, values, block_size, C, xp, x_stride, r0, b);
  for (int r = 0; r < RT; ++r) {
    const vf bias = splat(bias_rows ? bias_rows[r] : 0.0f);
    for (int v = 0; v < NV; ++v) {
      vf sum = acc[0][r][v] + bias;
      for (int s = 1; s < S; ++s) sum += acc[s][r][v];
      if (relu_out) sum = relu(sum);
      store(out + r * out_stride + v * VW, sum);
    }
  }
}

// Rows [r0, R) of block row `br` with run-time R x C blocks: passes of RT
// rows while they fit, then halves of RT for the rest (R = 7: 4 + 2 + 1).
template <int RT, int NV, typename Idx>
static inline void spmm_rows_any(const BlockSparseMatrix& w, const Idx* col_idx, const float* panel,
                                 int64_t br, int r0, const float* bias, bool relu_out, float* out) {
  constexpr int P = NV * VW;
  const int R = w.block_rows;
  for (; r0 + RT <= R; r0 += RT) {
    const int64_t row = br * R + r0;
    float bias_tile[RT];
    if (bias)
      for (int r = 0; r < RT; ++r) bias_tile[r] = row + r < w.rows ? bias[row + r] : 0.0f;
    spmm_tile_any<RT, NV, sets_for(RT, NV), Idx>(w.row_ptr, col_idx, w.values, R, w.block_cols, panel, P, br, r0,
                               bias ? bias_tile : nullptr, relu_out, out + static_cast<int64_t>(r0) * P, P);
  }
  if constexpr (RT > 1)
    if (r0 < R) spmm_rows_any<RT / 2, NV, Idx>(w, col_idx, panel, br, r0, bias, relu_out, out);
}

// Packs tokens [t0, t0 + P) of x into xp[k][P] for k < cols_padded, zero
// filling tokens past `tokens` and columns past `cols`.
template <int P>
static void pack_panel(const float* x, int64_t tokens, int64_t x_row_stride, int64_t cols,
                       int64_t t0, int64_t k_begin, int64_t k_end, float* xp) {
  const int64_t valid = std::min<int64_t>(P, tokens - t0);
  const int64_t k_real_end = std::min(k_end, cols);
  if (k_begin < k_real_end) {
    // The tokens past the end are zero: zero whole rows with vector stores
    // first (a memset call per row cost ~30 us of a ~100 us one-token
    // product over 3072 columns) ...
    if (valid < P)
      for (int64_t k = k_begin; k < k_real_end; ++k)
        for (int v = 0; v < P / VW; ++v) store(xp + k * P + v * VW, vf{});
    // ... then xp[k][t] = x[t0 + t][k]: a transpose of the valid tokens.
    transpose(x + t0 * x_row_stride + k_begin, x_row_stride, valid, k_real_end - k_begin,
              xp + k_begin * P, P);
  }
  // Columns past the matrix edge (padding of edge blocks) are zero.
  for (int64_t k = std::max(k_begin, cols); k < k_end; ++k) std::memset(xp + k * P, 0, sizeof(float) * P);
}

// Block rows [row_begin, row_end) over one packed panel (tokens [t0, t0 +
// valid_tokens)), in chunks whose tiles are transposed into y.
template <int RB, int CB, int RT, int NV, int S, typename Idx>
static void spmm_panel_rows(const BlockSparseMatrix& w, const SpmmArgs& a, const float* panel,
                            int64_t t0, int64_t valid_tokens, int64_t row_begin, int64_t row_end) {
  // R = C = 0: any block shape, read from w (spmm_rows_any).
  constexpr int P = NV * VW;
  const int R = RB ? RB : w.block_rows;
  const int64_t kChunkBlockRows = std::max(1, 64 / R);  // rows per transpose
  static thread_local Scratch tile_scratch;
  float* tile = tile_scratch.get(static_cast<size_t>(kChunkBlockRows) * R * P);
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);
  const bool relu_out = a.epilogue == Epilogue::kRelu;
  for (int64_t br0 = row_begin; br0 < row_end; br0 += kChunkBlockRows) {
    const int64_t br1 = std::min(row_end, br0 + kChunkBlockRows);
    for (int64_t br = br0; br < br1; ++br) {
      if constexpr (RB == 0) {
        spmm_rows_any<RT, NV, Idx>(w, col_idx, panel, br, 0, a.bias, relu_out,
                                   tile + (br - br0) * R * P);
      } else {
        for (int r0 = 0; r0 < R; r0 += RT) {
          const int64_t row = br * R + r0;
          // Bias rows past the matrix edge read as zero (padding rows).
          float bias_tile[RT];
          const float* bias_rows = nullptr;
          if (a.bias) {
            for (int r = 0; r < RT; ++r) bias_tile[r] = row + r < w.rows ? a.bias[row + r] : 0.0f;
            bias_rows = bias_tile;
          }
          spmm_tile<RB, CB, RT, NV, S, Idx>(w.row_ptr, col_idx, w.values, panel, P, br, r0, bias_rows,
                                            relu_out, tile + ((br - br0) * R + r0) * P, P);
        }
      }
    }
    // Transpose the chunk (rows x P) into y (tokens x rows).
    const int64_t row0 = br0 * R;
    const int64_t nrows = std::min<int64_t>(br1 * R, w.rows) - row0;
    transpose(tile, P, nrows, valid_tokens, a.y + t0 * a.y_row_stride + row0, a.y_row_stride);
  }
}

template <int R, int C, int RT, int NV, int S, typename Idx>
static void spmm_run(const BlockSparseMatrix& w, const SpmmArgs& a) {
  static_assert(R == 0 || R % RT == 0, "register tile rows must divide the block rows");
  constexpr int P = NV * VW;
  const int64_t block_rows = w.block_row_count();
  const int64_t cols_padded = w.block_col_count() * w.block_cols;
  const int64_t panels = (a.tokens + P - 1) / P;
  const int threads = std::max(1, a.num_threads);

  // Enough panels for every thread: each packs and computes whole panels
  // on its own. Splitting rows instead makes every thread read every packed
  // panel, half of it written by the other core a moment before; those
  // cache-to-cache transfers cost more than the FMAs when the panel is
  // large (3072 -> 768 at 128 tokens: 1.2x from the second thread, now 1.9x).
  // A panel count that does not divide evenly is split by rows, unless
  // there are many panels (the last short panel then matters little).
  if (threads > 1 && panels >= threads && (panels % threads == 0 || panels >= 4 * threads)) {
    std::atomic<int64_t> next{0};
    parallel_run(threads, [&](int, int) {
      static thread_local Scratch own_panel;
      float* xp = own_panel.get(static_cast<size_t>(cols_padded) * P);
      for (int64_t p = next.fetch_add(1, std::memory_order_relaxed); p < panels;
           p = next.fetch_add(1, std::memory_order_relaxed)) {
        pack_panel<P>(a.x, a.tokens, a.x_row_stride, w.cols, p * P, 0, cols_padded, xp);
        spmm_panel_rows<R, C, RT, NV, S, Idx>(w, a, xp, p * P, std::min<int64_t>(P, a.tokens - p * P),
                                              0, block_rows);
      }
    });
    return;
  }

  // Otherwise each thread owns a contiguous range of block rows, for every
  // panel. Few tokens (small panels): every thread packs all panels for
  // itself, which costs less than reading the half the other core packed.
  // Else the threads pack the shared panels together first.
  const int64_t packed_floats = panels * cols_padded * P;
  const bool private_pack = threads > 1 && packed_floats * 4 <= kPrivatePackBytes;
  float* shared = nullptr;
  if (!private_pack) {
    static thread_local Scratch packed;
    shared = packed.get(static_cast<size_t>(packed_floats));
    parallel_run(threads, [&](int tid, int nt) {
      // Split the (panel, k) space evenly.
      const int64_t total = panels * cols_padded;
      const int64_t begin = total * tid / nt, end = total * (tid + 1) / nt;
      for (int64_t p = begin / cols_padded; p < panels && p * cols_padded < end; ++p) {
        const int64_t kb = std::max<int64_t>(begin - p * cols_padded, 0);
        const int64_t ke = std::min<int64_t>(end - p * cols_padded, cols_padded);
        pack_panel<P>(a.x, a.tokens, a.x_row_stride, w.cols, p * P, kb, ke, shared + p * cols_padded * P);
      }
    });
  }
  std::vector<int64_t> bounds;
  balanced_ranges(w.row_ptr, block_rows, threads, bounds);
  parallel_run(threads, [&](int tid, int) {
    float* xp = shared;
    if (private_pack) {
      static thread_local Scratch own_panels;
      xp = own_panels.get(static_cast<size_t>(packed_floats));
      for (int64_t p = 0; p < panels; ++p)
        pack_panel<P>(a.x, a.tokens, a.x_row_stride, w.cols, p * P, 0, cols_padded, xp + p * cols_padded * P);
    }
    for (int64_t p = 0; p < panels; ++p) {
      spmm_panel_rows<R, C, RT, NV, S, Idx>(w, a, xp + p * cols_padded * P, p * P,
                                            std::min<int64_t>(P, a.tokens - p * P), bounds[tid],
                                            bounds[tid + 1]);
    }
  });
}

// ---------------------------------------------------------------------------
// spmv: one token at a time
// ---------------------------------------------------------------------------

template <int R, int C, typename Idx>
static void spmv_run(const BlockSparseMatrix& w, const SpmmArgs& a) {
  const int64_t block_rows = w.block_row_count();
  const int64_t cols_padded = w.block_col_count() * C;
  const int threads = std::max(1, a.num_threads);
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);
  const bool relu_out = a.epilogue == Epilogue::kRelu;
  const bool needs_padding = cols_padded != w.cols;

  std::vector<int64_t> bounds;
  balanced_ranges(w.row_ptr, block_rows, threads, bounds);
  parallel_run(threads, [&](int tid, int) {
    static thread_local Scratch padded;
    for (int64_t t = 0; t < a.tokens; ++t) {
      const float* x = a.x + t * a.x_row_stride;
      if (needs_padding) {
        // Edge blocks reach past the last column: read a zero-padded copy.
        float* xpad = padded.get(cols_padded);
        std::memcpy(xpad, x, sizeof(float) * w.cols);
        std::memset(xpad + w.cols, 0, sizeof(float) * (cols_padded - w.cols));
        x = xpad;
      }
      float* y = a.y + t * a.y_row_stride;
      for (int64_t br = bounds[tid]; br < bounds[tid + 1]; ++br) {
        const int32_t begin = w.row_ptr[br], end = w.row_ptr[br + 1];
        float out[R];
        if constexpr (R == 1 && C == 1) {
          // Unstructured: the x entries of 4 nonzeros are loaded into one
          // 4-lane vector and multiplied by 4 values read with one load, so
          // a nonzero costs 1.5 loads instead of 3 (loads are the limit:
          // the FMA work is tiny). Two vectors of partial sums hide latency.
          typedef float v4 __attribute__((vector_size(16)));
          typedef float v4_unaligned __attribute__((vector_size(16), aligned(4)));
          const float* v = w.values;
          const Idx* ci = col_idx;
          v4 acc0{}, acc1{};
          int32_t b = begin;
          for (; b + 8 <= end; b += 8) {
            const v4 x0 = {x[ci[b]], x[ci[b + 1]], x[ci[b + 2]], x[ci[b + 3]]};
            const v4 x1 = {x[ci[b + 4]], x[ci[b + 5]], x[ci[b + 6]], x[ci[b + 7]]};
            acc0 += *reinterpret_cast<const v4_unaligned*>(v + b) * x0;
            acc1 += *reinterpret_cast<const v4_unaligned*>(v + b + 4) * x1;
          }
          const v4 acc = acc0 + acc1;
          float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
          for (; b < end; ++b) s += v[b] * x[ci[b]];
          out[0] = s;
        } else {
          float acc[R][C];
          for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
          for (int32_t b = begin; b < end; ++b) {
            const float* xb = x + static_cast<int64_t>(col_idx[b]) * C;
            const float* wb = w.values + static_cast<int64_t>(b) * (R * C);
            for (int r = 0; r < R; ++r)
              for (int c = 0; c < C; ++c) acc[r][c] += wb[r * C + c] * xb[c];
          }
          for (int r = 0; r < R; ++r) {
            float s = 0.0f;
            for (int c = 0; c < C; ++c) s += acc[r][c];
            out[r] = s;
          }
        }
        const int64_t row0 = br * R;
        const int rows_here = static_cast<int>(std::min<int64_t>(R, w.rows - row0));
        for (int r = 0; r < rows_here; ++r) {
          float s = out[r] + (a.bias ? a.bias[row0 + r] : 0.0f);
          y[row0 + r] = relu_out && s < 0.0f ? 0.0f : s;
        }
      }
    }
  });
}

// One token, any block shape whose rows hold at least one vector (C >= VW):
// each block row is RQ rows of dot products, vectorised along the block's
// columns; a vector of x serves RQ rows, so a weight vector costs 1 + 1/RQ
// loads. Narrower blocks go through the token-panel kernel instead (one
// panel of VW tokens, the others zero), where a weight is one broadcast.
template <int RQ, typename Idx>
static inline void spmv_rows_any(const BlockSparseMatrix& w, const Idx* col_idx, const float* x,
                                 int64_t br, int r0, float* out) {
  const int R = w.block_rows, C = w.block_cols;
  const int64_t block_size = static_cast<int64_t>(R) * C;
  for (; r0 + RQ <= R; r0 += RQ) {
    // Two accumulator sets (alternate vectors of a row) keep 2 * RQ chains.
    vf acc[2][RQ];
    float tail[RQ];
    for (int r = 0; r < RQ; ++r) acc[0][r] = acc[1][r] = vf{}, tail[r] = 0.0f;
    for (int32_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
      const float* xb = x + static_cast<int64_t>(col_idx[b]) * C;
      const float* wb = w.values + b * block_size + static_cast<int64_t>(r0) * C;
      int c = 0;
      for (; c + 2 * VW <= C; c += 2 * VW) {
        const vf x0 = load(xb + c), x1 = load(xb + c + VW);
        for (int r = 0; r < RQ; ++r) {
          acc[0][r] += load(wb + r * C + c) * x0;
          acc[1][r] += load(wb + r * C + c + VW) * x1;
        }
      }
      for (; c + VW <= C; c += VW) {
        const vf xv = load(xb + c);
        for (int r = 0; r < RQ; ++r) acc[0][r] += load(wb + r * C + c) * xv;
      }
      for (; c < C; ++c)
        for (int r = 0; r < RQ; ++r) tail[r] += wb[r * C + c] * xb[c];
    }
    for (int r = 0; r < RQ; ++r) {
      const vf both = acc[0][r] + acc[1][r];
      float s = tail[r];
      for (int l = 0; l < VW; ++l) s += both[l];
      out[r0 + r] = s;
    }
  }
  if constexpr (RQ > 1)
    if (r0 < R) spmv_rows_any<RQ / 2, Idx>(w, col_idx, x, br, r0, out);
}

// One token, tall R x 1 blocks: a block is a contiguous column of R weights,
// y[r] += w[r] * x[col], vectorised along the rows (one x broadcast and R/VW
// weight loads per block). Rows past a multiple of VW are scalar.
template <typename Idx>
static inline void spmv_column_any(const BlockSparseMatrix& w, const Idx* col_idx, const float* x,
                                   int64_t br, float* out) {
  const int R = w.block_rows;
  for (int r = 0; r < R; ++r) out[r] = 0.0f;
  for (int32_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
    const vf xv = splat(x[col_idx[b]]);
    const float xs = x[col_idx[b]];
    const float* wb = w.values + static_cast<int64_t>(b) * R;
    int r = 0;
    for (; r + VW <= R; r += VW) store(out + r, load(out + r) + load(wb + r) * xv);
    for (; r < R; ++r) out[r] += wb[r] * xs;
  }
}

template <int ACC, typename Idx>
static void spmv_run_any(const BlockSparseMatrix& w, const SpmmArgs& a) {
  const bool column_blocks = w.block_cols == 1 && w.block_rows >= VW;
  // ACC rows x one vector of tokens (the token and VW - 1 zeros).
  if (w.block_cols < VW && !column_blocks) return spmm_run<0, 0, ACC, 1, 1, Idx>(w, a);
  const int R = w.block_rows;
  const int64_t block_rows = w.block_row_count();
  const int64_t cols_padded = w.block_col_count() * w.block_cols;
  const int threads = std::max(1, a.num_threads);
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);
  const bool relu_out = a.epilogue == Epilogue::kRelu;
  const bool needs_padding = cols_padded != w.cols;

  std::vector<int64_t> bounds;
  balanced_ranges(w.row_ptr, block_rows, threads, bounds);
  parallel_run(threads, [&](int tid, int) {
    static thread_local Scratch padded, block_out;
    float* out = block_out.get(static_cast<size_t>(R));
    for (int64_t t = 0; t < a.tokens; ++t) {
      const float* x = a.x + t * a.x_row_stride;
      if (needs_padding) {
        float* xpad = padded.get(cols_padded);
        std::memcpy(xpad, x, sizeof(float) * w.cols);
        std::memset(xpad + w.cols, 0, sizeof(float) * (cols_padded - w.cols));
        x = xpad;
      }
      float* y = a.y + t * a.y_row_stride;
      for (int64_t br = bounds[tid]; br < bounds[tid + 1]; ++br) {
        if (column_blocks) spmv_column_any<Idx>(w, col_idx, x, br, out);
        else spmv_rows_any<4, Idx>(w, col_idx, x, br, 0, out);
        const int64_t row0 = br * R;
        const int64_t rows_here = std::min<int64_t>(R, w.rows - row0);
        for (int64_t r = 0; r < rows_here; ++r) {
          const float s = out[r] + (a.bias ? a.bias[row0 + r] : 0.0f);
          y[row0 + r] = relu_out && s < 0.0f ? 0.0f : s;
        }
      }
    }
  });
}

// Dispatches on the index width, which the formats pick per matrix.
template <void (*F16)(const BlockSparseMatrix&, const SpmmArgs&),
          void (*F32)(const BlockSparseMatrix&, const SpmmArgs&)>
static void by_index(const BlockSparseMatrix& w, const SpmmArgs& a) {
  if (w.index_bits == 16) F16(w, a); else F32(w, a);
}

// The panel width (NV vectors, a power of two up to nv_max) for this many
// tokens: padded tokens cost work, narrow panels cost a weight broadcast and
// an index load per NV vectors; pick the cheapest, the wider on ties.
inline int choose_nv(int64_t tokens, int nv_max) {
  int best = 1;
  double best_cost = 0;
  for (int nv = 1; nv <= nv_max; nv *= 2) {
    const int64_t p = static_cast<int64_t>(nv) * VW;
    const double padded = static_cast<double>((tokens + p - 1) / p * p);
    const double cost = padded * (1.0 + 1.0 / nv);
    if (nv == 1 || cost <= best_cost) best = nv, best_cost = cost;
  }
  return best;
}

// Largest packed panel for CSR at <= 15% density; SPARSERT_CSR_PANEL_BYTES
// overrides it (read once; a huge value keeps the token-count choice alone).
inline int64_t csr_panel_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("SPARSERT_CSR_PANEL_BYTES");
    const long long v = env ? std::atoll(env) : 0;
    return v > 0 ? static_cast<int64_t>(v) : int64_t{128 * 1024};
  }();
  return bytes;
}

// The widest panel (in vectors, <= nv_max) that a 1x1-block (CSR) matrix
// should use. Each CSR nonzero loads its x row of the panel for one FMA per
// vector, so the kernel lives on L2 bandwidth, and the packed panel must stay
// in L2 while the weights stream through it. Measured on a Zen 4 (1 MB L2),
// 128 tokens, 2 threads: panels of 196 KB-1 MB lost up to a quarter of the
// speed (4096x4096 at 95%: 16-token panels 2.2 ms, 64-token panels 2.4-2.8
// ms; 768 -> 3072 at 90%: 32-token panels 5-8% faster than 64). Blocks reuse
// every loaded row R times and denser matrices re-read more weight bytes per
// panel, so both keep wide panels.
inline int csr_nv_cap(const BlockSparseMatrix& w, int nv_max) {
  if (w.block_rows != 1 || w.block_cols != 1) return nv_max;
  const int64_t nnz = w.row_ptr[w.block_row_count()];
  if (static_cast<double>(nnz) > 0.15 * static_cast<double>(w.rows) * static_cast<double>(w.cols))
    return nv_max;
  int nv = nv_max;
  // Narrower than one cache line per x row would split lines between panels.
  while (nv > 1 && nv * VW * 4 > 64 && w.cols * nv * VW * 4 > csr_panel_bytes()) nv /= 2;
  return nv;
}

template <int R, int C, int RT, int NVMAX, typename Idx>
static void spmm_any_width(const BlockSparseMatrix& w, const SpmmArgs& a) {
  switch (choose_nv(a.tokens, csr_nv_cap(w, NVMAX))) {
    case 1: return spmm_run<R, C, RT, 1, sets_for(RT, 1), Idx>(w, a);
    case 2: if constexpr (NVMAX >= 2) return spmm_run<R, C, RT, 2, sets_for(RT, 2), Idx>(w, a); break;
    case 4: if constexpr (NVMAX >= 4) return spmm_run<R, C, RT, 4, sets_for(RT, 4), Idx>(w, a); break;
    case 8: if constexpr (NVMAX >= 8) return spmm_run<R, C, RT, 8, sets_for(RT, 8), Idx>(w, a); break;
  }
}

template <int R, int C, int RT, int NVMAX>
static void spmm_kernel(const BlockSparseMatrix& w, const SpmmArgs& a) {
  by_index<spmm_any_width<R, C, RT, NVMAX, uint16_t>, spmm_any_width<R, C, RT, NVMAX, int32_t>>(w, a);
}

template <int R, int C>
static void spmv_kernel(const BlockSparseMatrix& w, const SpmmArgs& a) {
  by_index<spmv_run<R, C, uint16_t>, spmv_run<R, C, int32_t>>(w, a);
}

// Any block shape: the register tile holds ACC accumulator vectors, as
// RT = ACC / NV rows x NV vectors of tokens. Wide panels matter more than
// tall tiles: the weights stream from L2/L3 once per panel (768 -> 3072 at
// 90% is ~0.9 MB of values, more than Zen 3's L2), so NV grows to NVMAX
// with the token count and RT shrinks to keep the accumulators in registers.
template <int ACC, int NV>
constexpr int any_rows() { return ACC / NV > 0 ? ACC / NV : 1; }

template <int ACC, int NVMAX, typename Idx>
static void spmm_any_shape(const BlockSparseMatrix& w, const SpmmArgs& a) {
  switch (choose_nv(a.tokens, NVMAX)) {
    case 1: return spmm_run<0, 0, any_rows<ACC, 1>(), 1, 1, Idx>(w, a);
    case 2: if constexpr (NVMAX >= 2) return spmm_run<0, 0, any_rows<ACC, 2>(), 2, 1, Idx>(w, a); break;
    case 4: if constexpr (NVMAX >= 4) return spmm_run<0, 0, any_rows<ACC, 4>(), 4, 1, Idx>(w, a); break;
    case 8: if constexpr (NVMAX >= 8) return spmm_run<0, 0, any_rows<ACC, 8>(), 8, 1, Idx>(w, a); break;
  }
}

template <int ACC, int NVMAX>
static void spmm_kernel_any(const BlockSparseMatrix& w, const SpmmArgs& a) {
  by_index<spmm_any_shape<ACC, NVMAX, uint16_t>, spmm_any_shape<ACC, NVMAX, int32_t>>(w, a);
}

template <int ACC>
static void spmv_kernel_any(const BlockSparseMatrix& w, const SpmmArgs& a) {
  by_index<spmv_run_any<ACC, uint16_t>, spmv_run_any<ACC, int32_t>>(w, a);
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert

// The registration below runs on every CPU, so it is compiled for the
// baseline ISA: inside the target region GCC may copy a KernelInfo with
// AVX-512 stores, and registering the kernels would then crash a CPU without
// AVX-512 (it did, once this file moved). Kernel templates keep the target
// they were defined under wherever they are instantiated.
#include "common/isa_target_end.inc"

// ---------------------------------------------------------------------------
// Registration: each ISA file lists its tiles with these helpers.
// ---------------------------------------------------------------------------
#define SPARSERT_STR2(x) #x
#define SPARSERT_STR(x) SPARSERT_STR2(x)

namespace sparsert {
namespace SPARSERT_ISA {

inline std::string tile_name(int r, int c) {
  return r == 1 && c == 1 ? std::string("csr")
                          : "bsr" + std::to_string(r) + "x" + std::to_string(c);
}

// Registers the spmm kernel (register tiles of RT rows x up to NVMAX
// vectors of tokens) and the spmv kernel for R x C blocks.
template <int R, int C, int RT, int NVMAX>
void add_tile(std::vector<KernelInfo>& out) {
  const std::string isa = SPARSERT_STR(SPARSERT_ISA);
  out.push_back({"f32_spmm_" + tile_name(R, C) + "_" + isa, isa, "spmm", R, C,
                 &spmm_kernel<R, C, RT, NVMAX>});
  out.push_back({"f32_spmv_" + tile_name(R, C) + "_" + isa, isa, "spmv", R, C,
                 &spmv_kernel<R, C>});
}

// Registers the kernels for any block shape (block 0 x 0 in the registry):
// the tiles above are faster for their own shapes, these keep every other
// shape the formats accept off the reference kernel.
// ACC accumulator vectors per register tile, panels of up to NVMAX vectors.
template <int ACC, int NVMAX>
void add_any_tile(std::vector<KernelInfo>& out) {
  const std::string isa = SPARSERT_STR(SPARSERT_ISA);
  out.push_back({"f32_spmm_bsr_any_" + isa, isa, "spmm", 0, 0, &spmm_kernel_any<ACC, NVMAX>});
  out.push_back({"f32_spmv_bsr_any_" + isa, isa, "spmv", 0, 0, &spmv_kernel_any<ACC>});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
