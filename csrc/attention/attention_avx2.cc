// AVX2 + FMA attention kernel: 8-float vectors.
#define SPARSERT_ISA avx2
#define SPARSERT_VEC_FLOATS 8
#define SPARSERT_TARGET "avx2,fma"
#include "attention/attention_impl.h"

namespace sparsert {
namespace avx2 {

void register_attention_kernels(std::vector<AttentionKernelInfo>& out) { add_attention_kernel(out); }

}  // namespace avx2
}  // namespace sparsert
