// AVX2+FMA decoder ops: 8-float vectors.
#define SPARSERT_ISA avx2
#define SPARSERT_VEC_FLOATS 8
#define SPARSERT_TARGET "avx2,fma"
#include "decoder/decoder_impl.h"

namespace sparsert {
namespace avx2 {

void register_decoder_kernels(std::vector<DecoderKernelInfo>& out) { add_decoder_kernel(out); }

}  // namespace avx2
}  // namespace sparsert
