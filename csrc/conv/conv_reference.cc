// The plain reference every convolution kernel is tested against: a direct
// loop over the stored blocks and the taps, accumulating in double.
#include <cstdint>
#include <vector>

#include "conv/conv.h"

namespace sparsert {
namespace reference {

template <typename Idx>
static void run(const BlockSparseMatrix& w, const ConvShape& sh, const ConvArgs& a) {
  const int R = w.block_rows, C = w.block_cols;
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);
  const int64_t oh = sh.out_h(), ow = sh.out_w(), ohw = oh * ow;
  const int64_t cin_g = sh.in_channels_per_group(), cout_g = sh.out_channels_per_group();
  const int64_t taps = static_cast<int64_t>(sh.kernel_h) * sh.kernel_w;
  std::vector<double> acc(static_cast<size_t>(ohw));
  for (int64_t n = 0; n < sh.batch; ++n) {
    const float* x = a.x + n * sh.in_channels * sh.height * sh.width;
    for (int64_t br = 0; br < w.block_row_count(); ++br) {
      for (int r = 0; r < R; ++r) {
        const int64_t o = br * R + r;
        if (o >= w.rows) break;
        const int64_t g = o / cout_g;
        for (int64_t p = 0; p < ohw; ++p) acc[p] = a.bias ? a.bias[o] : 0.0;
        for (int32_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
          for (int c = 0; c < C; ++c) {
            const int64_t k = static_cast<int64_t>(col_idx[b]) * C + c;
            if (k >= w.cols) break;
            const double v = w.values[static_cast<int64_t>(b) * R * C + r * C + c];
            const int64_t ci = g * cin_g + k / taps;
            const int64_t ky = (k % taps) / sh.kernel_w, kx = k % sh.kernel_w;
            for (int64_t oy = 0; oy < oh; ++oy) {
              const int64_t iy = oy * sh.stride_h - sh.pad_h + ky * sh.dilation_h;
              if (iy < 0 || iy >= sh.height) continue;
              for (int64_t ox = 0; ox < ow; ++ox) {
                const int64_t ix = ox * sh.stride_w - sh.pad_w + kx * sh.dilation_w;
                if (ix < 0 || ix >= sh.width) continue;
                acc[oy * ow + ox] += v * x[(ci * sh.height + iy) * sh.width + ix];
              }
            }
          }
        }
        float* y = a.y + (n * sh.out_channels + o) * ohw;
        for (int64_t p = 0; p < ohw; ++p) {
          const double v = acc[p];
          y[p] = static_cast<float>(a.epilogue == Epilogue::kRelu && v < 0 ? 0.0 : v);
        }
      }
    }
  }
}

static void reference_conv(const BlockSparseMatrix& w, const ConvShape& sh, const ConvArgs& a) {
  if (w.index_bits == 16) run<uint16_t>(w, sh, a); else run<int32_t>(w, sh, a);
}

void register_conv_kernels(std::vector<ConvKernelInfo>& out) {
  out.push_back({"f32_conv_bsr_reference", "reference", "reference", 0, 0, &reference_conv});
}

}  // namespace reference
}  // namespace sparsert
