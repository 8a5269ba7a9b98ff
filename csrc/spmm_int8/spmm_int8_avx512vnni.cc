// AVX-512 VNNI int8 kernels: one vpdpbusd per 64 MACs on u8-offset activations (see the top of
// spmm_int8_impl.h), 8-lane gathers for the per-token kernel, panels of 16/32/64 tokens, the
// few-token lanes kernel and the many-token groups kernel.
// GCC 12's AVX-512 headers build masked loads and reductions on _mm512_undefined_*(), which
// -Wmaybe-uninitialized reports as a use of an uninitialised value (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SPARSERT_ISA avx512vnni
#define SPARSERT_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma"
#define SPARSERT_INT8_VNNI 1
#include "spmm_int8/spmm_int8_impl.h"

namespace sparsert {
namespace avx512vnni {

// spmm: panels of up to 64 tokens (4 zmm accumulators per row).
void register_int8_kernels(std::vector<Int8KernelInfo>& out) { add_int8_kernels<4>(out); }

}  // namespace avx512vnni
}  // namespace sparsert
