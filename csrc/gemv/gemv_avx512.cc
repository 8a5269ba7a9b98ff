// AVX-512F GEMV: 16-float vectors.
#define SPARSERT_ISA avx512
#define SPARSERT_VEC_FLOATS 16
#define SPARSERT_TARGET "avx512f,avx2,fma"
#include "gemv/gemv_impl.h"

namespace sparsert {
namespace avx512 {

void register_gemv_kernels(std::vector<GemvKernelInfo>& out) { add_gemv_kernel(out); }

}  // namespace avx512
}  // namespace sparsert
