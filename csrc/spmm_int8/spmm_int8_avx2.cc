// AVX2 int8 kernels: vpmaddubsw + vpmaddwd dot products (see dot4 in spmm_int8_impl.h),
// gathers for the per-token kernel.
#define SPARSERT_ISA avx2
#define SPARSERT_TARGET "avx2,fma"
#define SPARSERT_INT8_AVX2 1
#include "spmm_int8/spmm_int8_impl.h"

namespace sparsert {
namespace avx2 {

// spmm: panels of up to 32 tokens (4 ymm accumulators per row).
void register_int8_kernels(std::vector<Int8KernelInfo>& out) { add_int8_kernels<4>(out); }

}  // namespace avx2
}  // namespace sparsert
