// Portable attention kernel: 4-float vectors (SSE2 on x86-64, NEON on ARM).
#define SPARSERT_ISA scalar
#define SPARSERT_VEC_FLOATS 4
#include "attention/attention_impl.h"

namespace sparsert {
namespace scalar {

void register_attention_kernels(std::vector<AttentionKernelInfo>& out) { add_attention_kernel(out); }

}  // namespace scalar
}  // namespace sparsert
