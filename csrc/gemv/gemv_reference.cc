// The plain GEMV every kernel is tested against: sums in double.
#include <vector>

#include "gemv/gemv.h"

namespace sparsert {
namespace reference {

static void gemv(const GemvArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = a.x + r * a.x_stride;
    for (int64_t o = 0; o < a.out_features; ++o) {
      const float* w = a.w + o * a.w_stride;
      double acc = a.bias != nullptr ? a.bias[o] : 0.0;
      for (int64_t i = 0; i < a.in_features; ++i) acc += static_cast<double>(w[i]) * x[i];
      a.y[r * a.y_stride + o] = static_cast<float>(acc);
    }
  }
}

void register_gemv_kernels(std::vector<GemvKernelInfo>& out) {
  out.push_back({"f32_gemv_reference", "reference", "reference", 1, 1, &gemv});
}

}  // namespace reference
}  // namespace sparsert
