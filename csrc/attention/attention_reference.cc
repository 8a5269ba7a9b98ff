// The plain attention every kernel is tested against: scores in double, one (batch, head,
// query) at a time, std::exp.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/attention.h"

namespace sparsert {
namespace reference {

static void attention(const AttentionArgs& a) {
  std::vector<double> p(static_cast<size_t>(a.tokens));
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t h = 0; h < a.heads; ++h) {
      const int64_t off = b * a.batch_stride + h * a.head_dim;
      for (int64_t i = 0; i < a.tokens; ++i) {
        double top = -INFINITY;
        for (int64_t j = 0; j < a.tokens; ++j) {
          double s = 0;
          for (int64_t d = 0; d < a.head_dim; ++d)
            s += static_cast<double>(a.q[off + i * a.row_stride + d]) * a.k[off + j * a.row_stride + d];
          s *= a.scale;
          // (rounded to float as the kernels add it: a mask of -3.4e38 absorbs the score, so a
          // row whose keys are all masked averages v there as in torch)
          if (a.key_bias != nullptr) s = static_cast<float>(s + a.key_bias[b * a.tokens + j]);
          p[j] = s;
          top = std::max(top, s);
        }
        double sum = 0;
        for (int64_t j = 0; j < a.tokens; ++j) sum += (p[j] = std::exp(p[j] - top));
        float* o = a.out + b * a.out_batch_stride + i * a.out_row_stride + h * a.head_dim;
        for (int64_t d = 0; d < a.head_dim; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < a.tokens; ++j) acc += p[j] * a.v[off + j * a.row_stride + d];
          o[d] = static_cast<float>(acc / sum);
        }
      }
    }
  }
}

void register_attention_kernels(std::vector<AttentionKernelInfo>& out) {
  out.push_back({"f32_attention_reference", "reference", "reference", 1, 1, &attention});
}

}  // namespace reference
}  // namespace sparsert
