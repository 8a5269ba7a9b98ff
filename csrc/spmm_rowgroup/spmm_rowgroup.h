// sparsert row-group kernels: an unstructured sparse Linear layer for many
// tokens at moderate sparsity (30-80% zeros), the public, torch-free interface.
//
//     y[t, n] = act(bias[n] + sum_k W[n, k] * x[t, k])     t < tokens, n < rows
//
// Rows go in groups of 4. Within a group, every column with a nonzero in any
// of the 4 rows has a pattern (bit r: row 4g + r is nonzero there), and the
// columns are stored sorted by pattern: segment s = g * 15 + (pattern - 1)
// lists its columns, each followed in `values` by the popcount(pattern)
// values of its rows (lowest row first). A kernel then runs one branch-free
// loop per pattern in which each loaded vector of x feeds every row of the
// pattern: at 50% density a column feeds 2.1 rows on average, so a 4 x 16
// register tile (rows x tokens) does ~0.97 vector loads per FMA instead of
// CSR's 1.25-1.5 (an index, a broadcast and an x vector per nonzero and NV FMAs).
//
// Column blocks: the columns may be split into `kblocks` contiguous blocks
// (K-blocks) and each group's segments stored once per K-block, K-block
// major: segment s = (kb * groups + g) * 15 + (pattern - 1). A kernel then
// runs every group of a row block over one K-block before the next, so the
// x rows of that K-block (a few KB per token panel) stay in L1 instead of
// streaming a whole x panel from L2 once per group. kblocks = 1 is the
// unblocked layout. The kernels read a K-block's columns from its segments
// only (they never assume which columns a K-block holds), so any kblocks >= 1
// gives the same result; the blocking only changes the speed.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "spmm/spmm.h"

namespace sparsert {

constexpr int kRowGroup = 4;                             // rows per group
constexpr int kRowGroupPatterns = (1 << kRowGroup) - 1;  // nonempty row patterns per group

// Rows of a pattern (its popcount): the values (blocks) stored per column of its segment.
constexpr int pattern_rows(int pattern) {
  return (pattern & 1) + (pattern >> 1 & 1) + (pattern >> 2 & 1) + (pattern >> 3 & 1);
}

// The rows (0-3) of a pattern, lowest first: the row of each value a column of its segment stores.
template <int PATTERN>
constexpr std::array<int, pattern_rows(PATTERN)> pattern_row_list() {
  std::array<int, pattern_rows(PATTERN)> rows{};
  for (int r = 0, i = 0; r < kRowGroup; ++r)
    if (PATTERN >> r & 1) rows[i++] = r;
  return rows;
}

// The segment loops of the row-group kernels (fp32 here, int8 in spmm_int8) keep `chains` =
// rows x vectors of tokens accumulator chains; ~8+ hide the multiply-add latency with at most
// 12 registers: 4, 2 or 1 sets of them (columns go round-robin over the sets). 4, 2, 2, 1 for
// 1-4 rows at 2 vectors, which RowGroup.from_dense's padding (SEGMENT_MULTIPLES) matches.
constexpr int segment_sets(int chains) { return chains >= 8 ? 1 : 4 * chains <= 12 ? 4 : 2; }

struct RowGroupMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t kblocks = 1;  // column blocks (>= 1)
  // kblocks * group_count() * 15 + 1 entries, non-decreasing from 0: segment s
  // lists columns [seg_ptr[s], seg_ptr[s + 1]) of `columns`.
  const int32_t* seg_ptr = nullptr;
  // seg_ptr[last] column indices in [0, cols) (a column twice in a group adds up).
  const int32_t* columns = nullptr;
  // sum over segments of count * popcount(pattern) floats, segment by segment.
  const float* values = nullptr;
  // Optional: kblocks * group_count() + 1 entries, the values stored before each unit
  // (rowgroup_value_offsets), derived once with the validated arrays; null: each call
  // computes them (an O(segments) pass: 8 us a call at 3072 x 768 in K-blocks of 384).
  const int64_t* value_offsets = nullptr;

  int64_t group_count() const { return (rows + kRowGroup - 1) / kRowGroup; }
  // The unit (kb, g): its 15 segments start at segment unit(kb, g) * 15.
  int64_t unit(int64_t kb, int64_t g) const { return kb * group_count() + g; }
};

using RowGroupSpmmFn = void (*)(const RowGroupMatrix& w, const SpmmArgs& args);

struct RowGroupKernelInfo {
  std::string name;  // e.g. "f32_spmm_rowgroup4_avx2"
  std::string isa;   // "reference", "scalar", "avx2", "avx512"
  std::string kind;  // "spmm" (token panels), "spmv" (per token) or "reference"
  int block_rows = kRowGroup;
  int block_cols = 1;
  RowGroupSpmmFn fn = nullptr;
};

const std::vector<RowGroupKernelInfo>& rowgroup_kernel_registry();

// The kernel for this token count on `isa` (the reference when none matches).
const RowGroupKernelInfo* select_rowgroup_kernel(int64_t tokens, const std::string& isa);

// Values stored before each unit (kb, g) (see RowGroupMatrix::unit): out has
// kblocks * group_count() + 1 entries.
void rowgroup_value_offsets(const RowGroupMatrix& w, std::vector<int64_t>& out);

// w.value_offsets when set, else rowgroup_value_offsets computed into `storage`.
const int64_t* unit_value_offsets(const RowGroupMatrix& w, std::vector<int64_t>& storage);

}  // namespace sparsert
