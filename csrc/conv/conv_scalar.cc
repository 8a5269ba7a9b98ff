// Portable convolution kernels: 4-float vectors (SSE2 on x86-64, NEON on ARM).
#define SPARSERT_ISA scalar
#define SPARSERT_VEC_FLOATS 4
#include "conv/conv_impl.h"

namespace sparsert {
namespace scalar {

void register_conv_kernels(std::vector<ConvKernelInfo>& out) {
  //             R  C  RT NV S      tile = RT rows x NV * 4 pixels
  add_conv_tile<1, 1, 1, 4, 2>(out);
  add_conv_tile<1, 4, 1, 4, 2>(out);
  add_conv_tile<4, 1, 4, 2, 1>(out);
  add_conv_tile<8, 1, 4, 2, 1>(out);
  add_conv_tile<16, 1, 4, 2, 1>(out);
  add_conv_tile<4, 4, 4, 2, 1>(out);
}

}  // namespace scalar
}  // namespace sparsert
