// AVX-512F decoder ops: 16-float vectors (a head of 64 in 4 zmm).
#define SPARSERT_ISA avx512
#define SPARSERT_VEC_FLOATS 16
#define SPARSERT_TARGET "avx512f,avx2,fma"
#include "decoder/decoder_impl.h"

namespace sparsert {
namespace avx512 {

void register_decoder_kernels(std::vector<DecoderKernelInfo>& out) { add_decoder_kernel(out); }

}  // namespace avx512
}  // namespace sparsert
