// sparsert int8 sparse Linear kernels: the public, torch-free interface.
//
//     y[t, n] = act(bias[n] + w_scale[n] * x_scale[t] * sum_k Wq[n, k] * xq[t, k])
//
// Wq (rows x cols, int8 in [-127, 127]) is stored as 1x4 blocks along the
// input dimension (BSR with R = 1, C = 4): one block is 4 int8 weights, one
// 32-bit lane of a SIMD dot product (vpdpbusd on VNNI, vpmaddubsw+vpmaddwd
// on AVX2). w_scale: fp32 per output channel (symmetric, no zero point).
// x is fp32 and quantised inside the call, dynamically per token, to s8 in
// [-127, 127] (quantize_rows_s8). Accumulation is int32, exact.
//
// Why s8 activations in [-127, 127] (and not u8 with a zero point): AVX2's
// vpmaddubsw multiplies u8 by s8 and adds product pairs with int16
// saturation. The kernels feed it |w| (u8, <= 128) and sign(w) * x (s8,
// |x| <= 127): each pair sum is at most 2 * 128 * 127 = 32512 < 32767, so
// it never saturates, and every ISA path (portable, AVX2, VNNI) produces
// the same int32 sums as the plain integer reference. A u8 activation with
// a zero point would reach 2 * 255 * 127 and saturate. The price is one bit
// of activation range against u8 (8-bit symmetric instead of asymmetric).
//
// Dequantisation is one fused multiply-add per output, the same in every
// kernel: y = fma(float(acc), x_scale[t] * w_scale[n], bias[n]), then the
// epilogue; so every kernel is bit-exact with the reference.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/epilogue.h"
#include "common/isa.h"
#include "spmm_rowgroup/spmm_rowgroup.h"

namespace sparsert {

constexpr int kInt8BlockCols = 4;  // weights per block (one 32-bit lane)
// Largest cols whose int32 sums cannot overflow: 128 * 127 * cols < 2^31.
constexpr int64_t kInt8MaxCols = 132000;

// A rows x cols int8 matrix in 1x4 blocks. Row n's blocks are
// [row_ptr[n], row_ptr[n + 1]); block b covers columns [col_idx[b] * 4, +4)
// and holds 4 int8 weights at values + 4 * b. Weights of a block past the
// last column must be zero.
struct Int8BlockMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  const int32_t* row_ptr = nullptr;  // rows + 1 entries
  const void* col_idx = nullptr;     // row_ptr[rows] block-column indices
  int index_bits = 32;               // 16 (uint16_t) or 32 (int32_t)
  const int8_t* values = nullptr;    // 4 * row_ptr[rows] weights in [-128, 127]
  const float* scales = nullptr;     // rows per-channel weight scales

  int64_t block_col_count() const { return (cols + kInt8BlockCols - 1) / kInt8BlockCols; }
};

// The quantised activations of one call: xq[t * xq_stride + k] for k <
// block_col_count() * 4 (zero past cols), x_scales[t] per token.
struct Int8Activations {
  const int8_t* xq = nullptr;
  int64_t xq_stride = 0;  // a multiple of 4, >= block_col_count() * 4
  const float* x_scales = nullptr;  // tokens rounded up to 64 entries (zero past tokens)
  int64_t tokens = 0;
};

// The output of one call.
struct Int8Output {
  float* y = nullptr;  // y[t * y_row_stride + n]
  int64_t y_row_stride = 0;
  const float* bias = nullptr;  // rows floats, or null
  Epilogue epilogue = Epilogue::kNone;
  int num_threads = 1;
};

using Int8SpmmFn = void (*)(const Int8BlockMatrix& w, const Int8Activations& x, const Int8Output& out);

// One entry per int8 kernel; tests and benchmarks iterate this list.
struct Int8KernelInfo {
  std::string name;  // e.g. "s8_spmm_bsr1x4_avx2"
  std::string isa;   // "reference", "scalar", "avx2", "avx512vnni"
  std::string kind;  // "spmm" (token panels), "spmv" (per token) or "reference"
  int block_rows = 1;
  int block_cols = kInt8BlockCols;
  Int8SpmmFn fn = nullptr;
};

const std::vector<Int8KernelInfo>& int8_kernel_registry();

// The kernel for this token count on `isa` (the reference when none matches).
const Int8KernelInfo* select_int8_kernel(int64_t tokens, const std::string& isa);

// Per-token symmetric quantisation, the one definition every path uses:
//   amax = max_k |x[t, k]|, scale[t] = amax / 127,
//   q[t, k] = clamp(nearbyint(x[t, k] * (127 / amax)), -127, 127)
// (round half to even); amax == 0 gives scale 0 and q = 0; a token with a
// NaN or infinity gets scale NaN (its outputs are NaN) and q = 0.
// Writes q[t * q_stride + k] for k < q_stride (zeros past cols). Every ISA's
// version gives the same bytes; `isa` picks one ("": the best this CPU runs).
void quantize_rows_s8(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride, int8_t* q,
                      int64_t q_stride, float* scales, int num_threads, const std::string& isa = "");

// The "lanes" layout of the few-token VNNI kernel, derived from an
// Int8BlockMatrix (int8_lanes_plan / int8_lanes_fill) and held by the caller.
// Rows go in groups of 16 (one row per 32-bit lane of a zmm register), columns
// in chunks of 32 blocks (128 activations: a token's chunk is two registers, and
// vpermt2d fetches any of its 32 four-byte lanes by a 5-bit index). For group g
// and chunk c, steps [step_ptr[g * chunks + c], step_ptr[g * chunks + c + 1])
// hold, per step s and lane r, the next block of row 16 g + r in that chunk:
// 4 weights at lane_w[64 s + 4 r] and its block column within the chunk at
// lane_cols[16 s + r] (zero weights where the row has no more blocks there).
// One step is one vpermt2d and one vpdpbusd for 16 rows: no gather, no
// horizontal sum. Steps per (g, c) are the largest count of the 16 rows, so
// lanes idle where rows differ (measured in the layout's `steps`).
constexpr int kLaneRows = 16;
constexpr int kLaneChunkBlocks = 32;
struct Int8LaneMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  const int32_t* step_ptr = nullptr;  // groups() * chunks() + 1 entries
  const uint8_t* lane_cols = nullptr;  // 16 per step, each < 32
  const int8_t* lane_w = nullptr;      // 64 per step
  const float* scales = nullptr;       // rows per-channel weight scales

  int64_t groups() const { return (rows + kLaneRows - 1) / kLaneRows; }
  int64_t chunks() const {
    return ((cols + kInt8BlockCols - 1) / kInt8BlockCols + kLaneChunkBlocks - 1) / kLaneChunkBlocks;
  }
};

// Fills step_ptr (groups * chunks + 1 entries) for `w`; returns the total steps
// (throws std::length_error past INT32_MAX).
int64_t int8_lanes_plan(const Int8BlockMatrix& w, int32_t* step_ptr);
// Writes the steps' lane_cols and lane_w (both zeroed by the caller).
void int8_lanes_fill(const Int8BlockMatrix& w, const int32_t* step_ptr, uint8_t* lane_cols, int8_t* lane_w);
// True when this CPU runs the lanes kernel (AVX-512 VNNI).
bool int8_lanes_supported();
// Up to this many tokens a call should take the lanes kernel (measured).
int64_t int8_lanes_max_tokens();
// Quantises x and runs the lanes kernel (int8_lanes_supported() must hold).
void int8_lanes_linear(const Int8LaneMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                       const Int8Output& out);

// The "groups" layout of the many-token VNNI kernel, derived from an Int8BlockMatrix
// (built by the caller, sparsert/ops/quantized.py) and held by the caller: the row-group
// layout of spmm_rowgroup.h over block columns. Rows go in groups of kRowGroup (4); per group, the block columns where any of its rows holds a block are
// sorted by which rows hold one (the pattern p, a 4-bit mask, 1..15): the columns of
// group g and pattern p are columns[seg_ptr[15 g + p - 1], seg_ptr[15 g + p]), and each
// column is followed in `blocks` by popcount(p) 4-weight blocks, one per row of the
// pattern in increasing row order (group g's blocks start at group_ptr[g]). One load of
// a panel vector (16 tokens' 4 activations of the column) then feeds a vpdpbusd per row
// of the pattern: ~2.1 rows per load at 50% block density, where the 1x4 panel kernel
// loads the panel once per block. row_offsets[n] = 128 * (the sum of row n's weights),
// wrapping in int32: the u8 offset of the activations, taken off once per row.
struct Int8GroupMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  const int32_t* seg_ptr = nullptr;      // groups() * 15 + 1 entries
  const int32_t* columns = nullptr;      // seg_ptr[groups() * 15] block-column indices
  const int32_t* blocks = nullptr;       // the 4-weight blocks, as 32-bit lanes
  const int32_t* group_ptr = nullptr;    // groups() + 1 entries: each group's first block
  const int32_t* row_offsets = nullptr;  // rows entries
  const float* scales = nullptr;         // rows per-channel weight scales

  int64_t groups() const { return (rows + kRowGroup - 1) / kRowGroup; }
  int64_t block_col_count() const { return (cols + kInt8BlockCols - 1) / kInt8BlockCols; }
};
// True when this CPU runs the groups kernel (AVX-512 VNNI).
bool int8_groups_supported();
// Quantises x and runs the groups kernel (int8_groups_supported() must hold).
void int8_groups_linear(const Int8GroupMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                        const Int8Output& out);

// Quantises x (tokens x cols, fp32) and runs `kernel` (nullptr: select):
// the whole int8 Linear. Returns the kernel used.
const Int8KernelInfo* int8_linear(const Int8BlockMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                                  const Int8Output& out, const Int8KernelInfo* kernel);

}  // namespace sparsert
