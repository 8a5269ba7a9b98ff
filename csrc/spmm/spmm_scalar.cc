// Portable kernels: 4-float vectors, which every compiler lowers to the
// baseline SIMD of the target (SSE2 on x86-64, NEON on ARM) or to scalars.
#define SPARSERT_ISA scalar
#define SPARSERT_VEC_FLOATS 4
#include "spmm/spmm_impl.h"

namespace sparsert {
namespace scalar {

void register_kernels(std::vector<KernelInfo>& out) {
  //        R   C  RT NVMAX     panel = NV * 4 tokens, NV <= NVMAX chosen per call
  add_tile<1, 1, 1, 4>(out);
  add_tile<1, 4, 1, 4>(out);
  add_tile<4, 1, 4, 2>(out);
  add_tile<8, 1, 4, 2>(out);
  add_tile<16, 1, 4, 2>(out);
  add_tile<4, 4, 4, 2>(out);
  add_any_tile<8, 2>(out);
}

}  // namespace scalar
}  // namespace sparsert
