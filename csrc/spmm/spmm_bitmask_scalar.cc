// Portable bitmask kernels: 4-float vectors (SSE2 on x86-64, NEON on ARM).
#define SPARSERT_ISA scalar
#define SPARSERT_VEC_FLOATS 4
#include "spmm/spmm_bitmask_impl.h"

namespace sparsert {
namespace scalar {

void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out) {
  add_bitmask_kernels<2, 4>(out);  // spmv: 2 rows per x load; spmm: panels of up to 16 tokens
}

}  // namespace scalar
}  // namespace sparsert
