// The plain reference every fast kernel is tested against: one loop over
// the stored blocks, accumulating in double, for any tile and any tokens.
#include <cstdint>
#include <vector>

#include "spmm/spmm.h"

namespace sparsert {
namespace reference {

template <typename Idx>
static void run(const BlockSparseMatrix& w, const SpmmArgs& a) {
  const int R = w.block_rows, C = w.block_cols;
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);
  std::vector<double> acc(static_cast<size_t>(w.rows));
  for (int64_t t = 0; t < a.tokens; ++t) {
    const float* x = a.x + t * a.x_row_stride;
    for (int64_t n = 0; n < w.rows; ++n) acc[n] = a.bias ? a.bias[n] : 0.0;
    for (int64_t br = 0; br < w.block_row_count(); ++br) {
      for (int32_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
        const float* block = w.values + static_cast<int64_t>(b) * R * C;
        for (int r = 0; r < R; ++r) {
          const int64_t n = br * R + r;
          if (n >= w.rows) break;
          for (int c = 0; c < C; ++c) {
            const int64_t k = static_cast<int64_t>(col_idx[b]) * C + c;
            if (k < w.cols) acc[n] += static_cast<double>(block[r * C + c]) * x[k];
          }
        }
      }
    }
    float* y = a.y + t * a.y_row_stride;
    for (int64_t n = 0; n < w.rows; ++n) {
      const double v = acc[n];
      y[n] = static_cast<float>(a.epilogue == Epilogue::kRelu && v < 0 ? 0.0 : v);
    }
  }
}

static void reference_kernel(const BlockSparseMatrix& w, const SpmmArgs& a) {
  if (w.index_bits == 16) run<uint16_t>(w, a); else run<int32_t>(w, a);
}

void register_kernels(std::vector<KernelInfo>& out) {
  out.push_back({"f32_spmm_bsr_reference", "reference", "reference", 0, 0, &reference_kernel});
}

}  // namespace reference
}  // namespace sparsert
