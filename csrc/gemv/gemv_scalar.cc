// Portable GEMV: 4-float vectors (SSE2 on x86-64, NEON on ARM).
#define SPARSERT_ISA scalar
#define SPARSERT_VEC_FLOATS 4
#include "gemv/gemv_impl.h"

namespace sparsert {
namespace scalar {

void register_gemv_kernels(std::vector<GemvKernelInfo>& out) { add_gemv_kernel(out); }

}  // namespace scalar
}  // namespace sparsert
