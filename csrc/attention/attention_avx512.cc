// AVX-512F attention kernel: 16-float vectors (a 64-token row of scores in 4 zmm).
#define SPARSERT_ISA avx512
#define SPARSERT_VEC_FLOATS 16
#define SPARSERT_TARGET "avx512f,avx2,fma"
#include "attention/attention_impl.h"

namespace sparsert {
namespace avx512 {

void register_attention_kernels(std::vector<AttentionKernelInfo>& out) { add_attention_kernel(out); }

}  // namespace avx512
}  // namespace sparsert
