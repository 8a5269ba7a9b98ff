// The plain integer reference every int8 kernel is tested against: one
// product at a time, accumulated in int64, then the shared dequantisation.
#include <cmath>
#include <cstdint>
#include <vector>

#include "spmm_int8/spmm_int8.h"

namespace sparsert {
namespace reference {

static void int8_reference_kernel(const Int8BlockMatrix& w, const Int8Activations& x, const Int8Output& o) {
  for (int64_t t = 0; t < x.tokens; ++t) {
    const int8_t* xq = x.xq + t * x.xq_stride;
    for (int64_t n = 0; n < w.rows; ++n) {
      int64_t acc = 0;
      for (int64_t b = w.row_ptr[n]; b < w.row_ptr[n + 1]; ++b) {
        const int64_t kb = w.index_bits == 16 ? static_cast<const uint16_t*>(w.col_idx)[b]
                                              : static_cast<const int32_t*>(w.col_idx)[b];
        for (int j = 0; j < kInt8BlockCols; ++j) {
          const int64_t k = kb * kInt8BlockCols + j;
          if (k < w.cols) acc += static_cast<int64_t>(w.values[4 * b + j]) * xq[k];
        }
      }
      const float scale = x.x_scales[t] * w.scales[n];
      const float v = std::fma(static_cast<float>(acc), scale, o.bias ? o.bias[n] : 0.0f);
      o.y[t * o.y_row_stride + n] = o.epilogue == Epilogue::kRelu && v < 0.0f ? 0.0f : v;
    }
  }
}

void register_int8_kernels(std::vector<Int8KernelInfo>& out) {
  out.push_back({"s8_spmm_bsr1x4_reference", "reference", "reference", 1, kInt8BlockCols, &int8_reference_kernel});
}

}  // namespace reference
}  // namespace sparsert
