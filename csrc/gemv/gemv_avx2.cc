// AVX2+FMA GEMV: 8-float vectors.
#define SPARSERT_ISA avx2
#define SPARSERT_VEC_FLOATS 8
#define SPARSERT_TARGET "avx2,fma"
#include "gemv/gemv_impl.h"

namespace sparsert {
namespace avx2 {

void register_gemv_kernels(std::vector<GemvKernelInfo>& out) { add_gemv_kernel(out); }

}  // namespace avx2
}  // namespace sparsert
