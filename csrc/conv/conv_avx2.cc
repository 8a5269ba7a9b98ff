// AVX2+FMA convolution kernels (8 floats per vector).
#define SPARSERT_ISA avx2
#define SPARSERT_VEC_FLOATS 8
#define SPARSERT_TARGET "avx2,fma"
#include "conv/conv_impl.h"

namespace sparsert {
namespace avx2 {

void register_conv_kernels(std::vector<ConvKernelInfo>& out) {
  //             R  C  RT NV S      tile = RT rows x NV * 8 pixels
  add_conv_tile<1, 1, 1, 4, 2>(out);
  add_conv_tile<1, 4, 1, 4, 2>(out);
  add_conv_tile<4, 1, 4, 2, 1>(out);
  add_conv_tile<8, 1, 4, 2, 1>(out);
  add_conv_tile<16, 1, 4, 2, 1>(out);
  add_conv_tile<4, 4, 4, 2, 1>(out);
}

}  // namespace avx2
}  // namespace sparsert
