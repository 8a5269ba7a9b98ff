// AVX-512F bitmask kernels (spmv: the AVX2 permute-table kernel, which measured faster
// than vexpandps on Zen 4; spmm in 16-float panel vectors).
#define SPARSERT_ISA avx512
#define SPARSERT_VEC_FLOATS 16
#define SPARSERT_TARGET "avx512f,avx2,fma,popcnt,bmi"
#define SPARSERT_BITMASK_AVX512 1
// GCC 12 flags the intentionally undefined upper half inside its own
// _mm512_extractf64x4_pd as maybe-uninitialized; nothing of ours is.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "spmm/spmm_bitmask_impl.h"

namespace sparsert {
namespace avx512 {

void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out) {
  //                  RT NVMAX    spmv: 4 rows per x load;
  add_bitmask_kernels<4, 4>(out);  // spmm: panels of up to 64 tokens
}

}  // namespace avx512
}  // namespace sparsert
