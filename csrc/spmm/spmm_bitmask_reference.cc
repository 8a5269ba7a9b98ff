// The plain bitmask reference every fast bitmask kernel is tested against:
// walks the mask bits one by one, accumulating in double.
#include <cstdint>
#include <vector>

#include "spmm/spmm_bitmask.h"

namespace sparsert {
namespace reference {

static void bitmask_reference_kernel(const BitmaskMatrix& w, const SpmmArgs& a) {
  const int64_t groups = w.group_count();
  for (int64_t t = 0; t < a.tokens; ++t) {
    const float* x = a.x + t * a.x_row_stride;
    float* y = a.y + t * a.y_row_stride;
    for (int64_t n = 0; n < w.rows; ++n) {
      double acc = a.bias ? a.bias[n] : 0.0;
      const float* v = w.values + w.row_offsets[n];
      for (int64_t g = 0; g < groups; ++g) {
        const unsigned mask = w.masks[n * groups + g];
        for (int j = 0; j < kBitmaskGroup; ++j) {
          if (!(mask >> j & 1u)) continue;
          const int64_t k = g * kBitmaskGroup + j;
          const double value = *v++;
          if (k < w.cols) acc += value * x[k];
        }
      }
      y[n] = static_cast<float>(a.epilogue == Epilogue::kRelu && acc < 0 ? 0.0 : acc);
    }
  }
}

void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out) {
  out.push_back({"f32_spmm_bitmask16_reference", "reference", "reference", 1, kBitmaskGroup,
                 &bitmask_reference_kernel});
}

}  // namespace reference
}  // namespace sparsert
