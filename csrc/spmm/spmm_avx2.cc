// AVX2 + FMA kernels (16 ymm registers: register tiles of at most 8-12
// accumulators, leaving room for the x vectors and the broadcast weight).
#define SPARSERT_ISA avx2
#define SPARSERT_VEC_FLOATS 8
#define SPARSERT_TARGET "avx2,fma"
#define SPARSERT_TRANSPOSE_AVX2 1
#include "spmm/spmm_impl.h"

namespace sparsert {
namespace avx2 {

void register_kernels(std::vector<KernelInfo>& out) {
  //        R   C  RT NVMAX     panel = NV * 8 tokens, NV <= NVMAX chosen per call
  add_tile<1, 1, 1, 8>(out);    // csr: up to 8 accumulators over 64 tokens
  add_tile<1, 4, 1, 4>(out);    // 1x4
  add_tile<4, 1, 4, 2>(out);    // 4x1: 4 rows x 16 tokens
  add_tile<8, 1, 4, 2>(out);    // 8x1 as two 4-row passes
  add_tile<16, 1, 4, 2>(out);   // 16x1 as four 4-row passes
  add_tile<4, 4, 4, 2>(out);    // 4x4
  add_any_tile<8, 4>(out);      // any other R x C: 8 accumulators, 4x16 or 2x32 (rows x tokens)
}

}  // namespace avx2
}  // namespace sparsert
