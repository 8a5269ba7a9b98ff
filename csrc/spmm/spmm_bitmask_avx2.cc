// AVX2 + FMA bitmask kernels (spmv expands 8 lanes at a time with a permute
// table; popcnt and tzcnt come with every AVX2 CPU).
#define SPARSERT_ISA avx2
#define SPARSERT_VEC_FLOATS 8
#define SPARSERT_TARGET "avx2,fma,popcnt,bmi"
#define SPARSERT_BITMASK_AVX2 1
#include "spmm/spmm_bitmask_impl.h"

namespace sparsert {
namespace avx2 {

void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out) {
  //                  RT NVMAX    spmv: spmv_avx2_kernel (4 rows per x load; RT is unused here);
  add_bitmask_kernels<4, 8>(out);  // spmm: panels of up to 64 tokens
}

}  // namespace avx2
}  // namespace sparsert
