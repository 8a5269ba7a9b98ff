// Portable decoder ops: 4-float vectors (SSE2 on x86-64, NEON on ARM).
#define SPARSERT_ISA scalar
#define SPARSERT_VEC_FLOATS 4
#include "decoder/decoder_impl.h"

namespace sparsert {
namespace scalar {

void register_decoder_kernels(std::vector<DecoderKernelInfo>& out) { add_decoder_kernel(out); }

}  // namespace scalar
}  // namespace sparsert
