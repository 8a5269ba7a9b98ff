// AVX-512F kernels (32 zmm registers: register tiles of up to 16 accumulators).
#define SPARSERT_ISA avx512
#define SPARSERT_VEC_FLOATS 16
#define SPARSERT_TARGET "avx512f,avx512vl,avx512dq,avx2,fma"
#define SPARSERT_TRANSPOSE_AVX2 1
#include "spmm/spmm_impl.h"

namespace sparsert {
namespace avx512 {

void register_kernels(std::vector<KernelInfo>& out) {
  //        R   C  RT NVMAX     panel = NV * 16 tokens, NV <= NVMAX chosen per call
  add_tile<1, 1, 1, 4>(out);    // csr: up to 4 (x2 sets) accumulators over 64 tokens
  add_tile<1, 4, 1, 4>(out);    // 1x4
  add_tile<4, 1, 4, 4>(out);    // 4x1: 4 rows x 64 tokens
  add_tile<8, 1, 8, 2>(out);    // 8x1: 8 rows x 32 tokens
  add_tile<16, 1, 8, 2>(out);   // 16x1 as two 8-row passes
  add_tile<4, 4, 4, 4>(out);    // 4x4
  add_any_tile<16, 4>(out);     // any other R x C: 16 accumulators, 8x32 or 4x64 (rows x tokens)
}

}  // namespace avx512
}  // namespace sparsert
