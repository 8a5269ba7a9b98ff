// Portable row-group kernel: 4-float vectors (SSE2 on x86-64, NEON on ARM), 16-token panels.
#define SPARSERT_ISA scalar
#define SPARSERT_VEC_FLOATS 4
#include "spmm_rowgroup/spmm_rowgroup_impl.h"

namespace sparsert {
namespace scalar {

void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out) { add_rowgroup_kernel<4>(out); }

}  // namespace scalar
}  // namespace sparsert
