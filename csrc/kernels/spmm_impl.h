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
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <functional>
#include <string>

#include "sparsert/spmm.h"
#include "../runtime/thread_pool.h"

// The ISA is switched on with a pragma *after* every header, instead of with
// -mavx2 on the command line: otherwise std:: templates instantiated here
// (vector, function, ...) would be compiled for AVX2/AVX-512 and the linker
// could pick those copies for the portable path, crashing older CPUs.
#define SPARSERT_PRAGMA(x) _Pragma(#x)
#define SPARSERT_PRAGMA_EXPANDED(x) SPARSERT_PRAGMA(x)
#if defined(SPARSERT_TARGET)
#if defined(__clang__)
SPARSERT_PRAGMA_EXPANDED(clang attribute push(__attribute__((target(SPARSERT_TARGET))), apply_to = function))
#else
#pragma GCC push_options
SPARSERT_PRAGMA_EXPANDED(GCC target(SPARSERT_TARGET))
#endif
#endif

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including spmm_impl.h"
#endif
#ifndef SPARSERT_VEC_FLOATS
#error "define SPARSERT_VEC_FLOATS before including spmm_impl.h"
#endif

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

// 64-byte aligned scratch that only grows; one per thread.
struct Scratch {
  float* data = nullptr;
  size_t capacity = 0;
  float* get(size_t floats) {
    if (floats > capacity) {
      std::free(data);
      const size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      capacity = bytes / sizeof(float);
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};

// Splits block rows [0, block_rows) into `parts` contiguous ranges with about
// equal cost, where a block row costs its block count plus a fixed overhead.
inline void balanced_ranges(const int32_t* row_ptr, int64_t block_rows, int parts,
                            std::vector<int64_t>& bounds) {
  bounds.assign(parts + 1, block_rows);
  bounds[0] = 0;
  const double row_cost = 2.0;  // loop + store overhead of a row, in blocks
  const double total = row_ptr[block_rows] + row_cost * block_rows;
  int64_t row = 0;
  for (int p = 1; p < parts; ++p) {
    const double target = total * p / parts;
    // First row whose prefix cost reaches the target (cost is monotone).
    int64_t lo = row, hi = block_rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (row_ptr[mid] + row_cost * mid < target) lo = mid + 1; else hi = mid;
    }
    row = lo;
    bounds[p] = row;
  }
}

// ---------------------------------------------------------------------------
// spmm: token panels
// ---------------------------------------------------------------------------

// Accumulates one register tile: rows [r0, r0 + RT) of block row `br` (a
// block has R rows, C columns) over the panel `xp` of P = NV * VW tokens, and
// stores act(acc + bias) to out[r][P]. S independent accumulator sets hide
// FMA latency when the tile is small; they are summed at the end.
//
// x rows (one per input column k) are `x_stride` floats apart and hold at
// least NV * VW readable tokens; output row r goes to out + r * out_stride.
// (Token panels use x_stride = P; a 1x1 convolution over an NCHW image uses
// the image itself, x_stride = H * W.)
template <int R, int C, int RT, int NV, int S, typename Idx>
static inline void spmm_tile(const int32_t* row_ptr, const Idx* col_idx, const float* values,
                             const float* xp, int64_t x_stride, int64_t br, int r0,
                             const float* bias_rows, bool relu_out, float* out,
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

// Packs tokens [t0, t0 + P) of x into xp[k][P] for k < cols_padded, zero
// filling tokens past `tokens` and columns past `cols`.
template <int P>
static void pack_panel(const float* x, int64_t tokens, int64_t x_row_stride, int64_t cols,
                       int64_t cols_padded, int64_t t0, int64_t k_begin, int64_t k_end,
                       float* xp) {
  const int64_t valid = std::min<int64_t>(P, tokens - t0);
  // Walk k in chunks so the strided reads of `valid` token rows stay in cache
  // and every write is a whole vector.
  constexpr int64_t kChunk = 64;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
    const int64_t k1 = std::min(k_end, k0 + kChunk);
    for (int64_t k = k0; k < k1; ++k) {
      float* dst = xp + k * P;
      if (k >= cols) {
        std::memset(dst, 0, sizeof(float) * P);
        continue;
      }
      const float* src = x + t0 * x_row_stride + k;
      int64_t t = 0;
      for (; t < valid; ++t) dst[t] = src[t * x_row_stride];
      for (; t < P; ++t) dst[t] = 0.0f;
    }
  }
  (void)cols_padded;
}

template <int R, int C, int RT, int NV, int S, typename Idx>
static void spmm_run(const BlockSparseMatrix& w, const SpmmArgs& a) {
  static_assert(R % RT == 0, "register tile rows must divide the block rows");
  constexpr int P = NV * VW;
  const int64_t block_rows = w.block_row_count();
  const int64_t cols_padded = w.block_col_count() * C;
  const int64_t panels = (a.tokens + P - 1) / P;
  const int threads = std::max(1, a.num_threads);
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);

  // 1. Pack x into token panels (shared by all threads).
  static thread_local Scratch packed;
  float* xp = packed.get(static_cast<size_t>(panels) * cols_padded * P);
  parallel_run(threads, [&](int tid, int nt) {
    // Split the (panel, k) space evenly.
    const int64_t total = panels * cols_padded;
    const int64_t begin = total * tid / nt, end = total * (tid + 1) / nt;
    for (int64_t p = begin / cols_padded; p < panels && p * cols_padded < end; ++p) {
      const int64_t kb = std::max<int64_t>(begin - p * cols_padded, 0);
      const int64_t ke = std::min<int64_t>(end - p * cols_padded, cols_padded);
      pack_panel<P>(a.x, a.tokens, a.x_row_stride, w.cols, cols_padded, p * P, kb, ke,
                    xp + p * cols_padded * P);
    }
  });

  // 2. Each thread owns a contiguous range of block rows, for every panel.
  std::vector<int64_t> bounds;
  balanced_ranges(w.row_ptr, block_rows, threads, bounds);
  const bool relu_out = a.activation == Activation::kRelu;
  parallel_run(threads, [&](int tid, int) {
    constexpr int64_t kChunkBlockRows = std::max(1, 64 / R);  // rows per transpose
    static thread_local Scratch tile_scratch;
    float* tile = tile_scratch.get(static_cast<size_t>(kChunkBlockRows) * R * P);
    const int64_t row_begin = bounds[tid], row_end = bounds[tid + 1];
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel = xp + p * cols_padded * P;
      const int64_t t0 = p * P;
      const int64_t valid_tokens = std::min<int64_t>(P, a.tokens - t0);
      for (int64_t br0 = row_begin; br0 < row_end; br0 += kChunkBlockRows) {
        const int64_t br1 = std::min(row_end, br0 + kChunkBlockRows);
        for (int64_t br = br0; br < br1; ++br) {
          for (int r0 = 0; r0 < R; r0 += RT) {
            const int64_t row = br * R + r0;
            // Bias rows past the matrix edge read as zero (padding rows).
            float bias_tile[RT];
            const float* bias_rows = nullptr;
            if (a.bias) {
              for (int r = 0; r < RT; ++r) bias_tile[r] = row + r < w.rows ? a.bias[row + r] : 0.0f;
              bias_rows = bias_tile;
            }
            spmm_tile<R, C, RT, NV, S, Idx>(w.row_ptr, col_idx, w.values, panel, P, br, r0,
                                            bias_rows, relu_out,
                                            tile + ((br - br0) * R + r0) * P, P);
          }
        }
        // Transpose the chunk (rows x P) into y (tokens x rows).
        const int64_t row0 = br0 * R;
        const int64_t nrows = std::min<int64_t>(br1 * R, w.rows) - row0;
        for (int64_t t = 0; t < valid_tokens; ++t) {
          float* dst = a.y + (t0 + t) * a.y_row_stride + row0;
          const float* src = tile + t;
          for (int64_t r = 0; r < nrows; ++r) dst[r] = src[r * P];
        }
      }
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
  const bool relu_out = a.activation == Activation::kRelu;
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
          // Unstructured: four interleaved partial sums over the nonzeros.
          float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
          int32_t b = begin;
          const float* v = w.values;
          for (; b + 4 <= end; b += 4) {
            s0 += v[b] * x[col_idx[b]];
            s1 += v[b + 1] * x[col_idx[b + 1]];
            s2 += v[b + 2] * x[col_idx[b + 2]];
            s3 += v[b + 3] * x[col_idx[b + 3]];
          }
          for (; b < end; ++b) s0 += v[b] * x[col_idx[b]];
          out[0] = (s0 + s1) + (s2 + s3);
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

// Dispatches on the index width, which the formats pick per matrix.
template <void (*F16)(const BlockSparseMatrix&, const SpmmArgs&),
          void (*F32)(const BlockSparseMatrix&, const SpmmArgs&)>
static void by_index(const BlockSparseMatrix& w, const SpmmArgs& a) {
  if (w.index_bits == 16) F16(w, a); else F32(w, a);
}

template <int R, int C, int RT, int NV, int S>
static void spmm_kernel(const BlockSparseMatrix& w, const SpmmArgs& a) {
  by_index<spmm_run<R, C, RT, NV, S, uint16_t>, spmm_run<R, C, RT, NV, S, int32_t>>(w, a);
}

template <int R, int C>
static void spmv_kernel(const BlockSparseMatrix& w, const SpmmArgs& a) {
  by_index<spmv_run<R, C, uint16_t>, spmv_run<R, C, int32_t>>(w, a);
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert

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

// Registers the spmm kernel (register tile RT x NV vectors, S accumulator
// sets) and the spmv kernel for R x C blocks.
template <int R, int C, int RT, int NV, int S>
void add_tile(std::vector<KernelInfo>& out) {
  const std::string isa = SPARSERT_STR(SPARSERT_ISA);
  out.push_back({"f32_spmm_" + tile_name(R, C) + "_" + isa, isa, "spmm", R, C,
                 &spmm_kernel<R, C, RT, NV, S>});
  out.push_back({"f32_spmv_" + tile_name(R, C) + "_" + isa, isa, "spmv", R, C,
                 &spmv_kernel<R, C>});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert

#if defined(SPARSERT_TARGET)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
