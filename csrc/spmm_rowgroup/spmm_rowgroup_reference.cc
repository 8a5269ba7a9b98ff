// The plain row-group reference every fast row-group kernel is tested
// against: walks the segments entry by entry, accumulating in double.
#include <vector>

#include "spmm_rowgroup/spmm_rowgroup.h"

namespace sparsert {
namespace reference {

static void rowgroup_reference_kernel(const RowGroupMatrix& w, const SpmmArgs& a) {
  std::vector<int64_t> offsets;
  rowgroup_value_offsets(w, offsets);
  std::vector<double> acc(kRowGroup);
  for (int64_t t = 0; t < a.tokens; ++t) {
    const float* x = a.x + t * a.x_row_stride;
    float* y = a.y + t * a.y_row_stride;
    for (int64_t g = 0; g < w.group_count(); ++g) {
      for (int r = 0; r < kRowGroup; ++r) {
        const int64_t n = g * kRowGroup + r;
        acc[r] = a.bias && n < w.rows ? a.bias[n] : 0.0;
      }
      for (int64_t kb = 0; kb < w.kblocks; ++kb) {
        const float* v = w.values + offsets[w.unit(kb, g)];
        for (int p = 1; p <= kRowGroupPatterns; ++p) {
          const int64_t s = w.unit(kb, g) * kRowGroupPatterns + p - 1;
          for (int32_t i = w.seg_ptr[s]; i < w.seg_ptr[s + 1]; ++i) {
            const double xk = x[w.columns[i]];
            for (int r = 0; r < kRowGroup; ++r)
              if (p >> r & 1) acc[r] += static_cast<double>(*v++) * xk;
          }
        }
      }
      for (int r = 0; r < kRowGroup; ++r) {
        const int64_t n = g * kRowGroup + r;
        if (n < w.rows) y[n] = static_cast<float>(a.epilogue == Epilogue::kRelu && acc[r] < 0 ? 0.0 : acc[r]);
      }
    }
  }
}

void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out) {
  out.push_back({"f32_spmm_rowgroup4_reference", "reference", "reference", kRowGroup, 1,
                 &rowgroup_reference_kernel});
}

}  // namespace reference
}  // namespace sparsert
