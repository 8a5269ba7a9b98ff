// The sparse weight layout every CPU kernel reads (spmm and conv alike).
#pragma once

#include <cstdint>

namespace sparsert {

// A rows x cols float matrix stored as R x C blocks (block-sparse row, BSR).
// Block row i covers matrix rows [i*R, i*R+R); its blocks are
// [row_ptr[i], row_ptr[i+1]). Block b covers columns [col_idx[b]*C, +C) and
// holds R*C values, row-major, at values + b*R*C. Blocks on the bottom/right
// edge may stick out of the matrix; their outside entries must be zero and
// are never written or read from x.
struct BlockSparseMatrix {
  int64_t rows = 0;        // logical rows (out_features)
  int64_t cols = 0;        // logical columns (in_features)
  int block_rows = 1;      // R
  int block_cols = 1;      // C
  const int32_t* row_ptr = nullptr;  // ceil(rows / R) + 1 entries
  const void* col_idx = nullptr;     // row_ptr[last] block-column indices
  int index_bits = 32;               // 16 (uint16_t) or 32 (int32_t)
  const float* values = nullptr;     // row_ptr[last] * R * C floats

  int64_t block_row_count() const { return (rows + block_rows - 1) / block_rows; }
  int64_t block_col_count() const { return (cols + block_cols - 1) / block_cols; }
};

}  // namespace sparsert
