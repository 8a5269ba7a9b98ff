// AVX-512F convolution kernels (16 floats per vector).
#define SPARSERT_ISA avx512
#define SPARSERT_VEC_FLOATS 16
#define SPARSERT_TARGET "avx512f,avx512vl,avx512dq,avx2,fma"
#include "conv/conv_impl.h"

namespace sparsert {
namespace avx512 {

void register_conv_kernels(std::vector<ConvKernelInfo>& out) {
  // Tiles picked by timing variants on ResNet-50/VGG-16 shapes (1 thread):
  // csr NV=4 S=1 beat S=2 and NV=2/3; 8x1 with 3 vectors beat 2. (A KxK csr conv that
  // reads through an im2col slab uses 32-pixel tiles instead: see conv_run.)
  //             R  C  RT NV S      tile = RT rows x NV * 16 pixels
  add_conv_tile<1, 1, 1, 4, 1>(out);   // csr
  add_conv_tile<1, 4, 1, 4, 1>(out);   // 1x4 (expanded to 1x1 per call)
  add_conv_tile<4, 1, 4, 4, 1>(out);   // 4x1
  add_conv_tile<8, 1, 8, 3, 1>(out);   // 8x1
  add_conv_tile<16, 1, 8, 3, 1>(out);  // 16x1 as two 8-row passes
  add_conv_tile<4, 4, 4, 4, 1>(out);   // 4x4 (expanded to 4x1 per call)
}

}  // namespace avx512
}  // namespace sparsert
