// AVX-512F row-group kernel: 4 rows x 16 tokens (4 zmm accumulators) for the 4-row pattern up
// to 16 tokens (AVX2's panel at half the instructions), 4 rows x 32 tokens beyond.
#define SPARSERT_ISA avx512
#define SPARSERT_VEC_FLOATS 16
#define SPARSERT_TRANSPOSE_AVX2 1
#define SPARSERT_TARGET "avx512f,avx2,fma"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC's own _mm512_extractf32x4_ps
#endif
#include "spmm_rowgroup/spmm_rowgroup_impl.h"

namespace sparsert {
namespace avx512 {

void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out) { add_rowgroup_kernel<1, 2>(out); }

}  // namespace avx512
}  // namespace sparsert
