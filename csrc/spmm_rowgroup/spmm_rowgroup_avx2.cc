// AVX2 + FMA row-group kernel: 4 rows x 16 tokens (8 ymm accumulators) for the 4-row pattern.
#define SPARSERT_ISA avx2
#define SPARSERT_VEC_FLOATS 8
#define SPARSERT_TRANSPOSE_AVX2 1
#define SPARSERT_TARGET "avx2,fma"
#include "spmm_rowgroup/spmm_rowgroup_impl.h"

namespace sparsert {
namespace avx2 {

void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out) { add_rowgroup_kernel<2>(out); }

}  // namespace avx2
}  // namespace sparsert
