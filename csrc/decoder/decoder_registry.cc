// The one list of decoder kernel sets and their selection.
#include <string>
#include <vector>

#include "decoder/decoder.h"

namespace sparsert {

namespace reference { void register_decoder_kernels(std::vector<DecoderKernelInfo>& out); }
namespace scalar { void register_decoder_kernels(std::vector<DecoderKernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_decoder_kernels(std::vector<DecoderKernelInfo>& out); }
namespace avx512 { void register_decoder_kernels(std::vector<DecoderKernelInfo>& out); }
#endif

const std::vector<DecoderKernelInfo>& decoder_kernel_registry() {
  static const std::vector<DecoderKernelInfo> kernels = [] {
    std::vector<DecoderKernelInfo> all;
    reference::register_decoder_kernels(all);
    scalar::register_decoder_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_decoder_kernels(all);
    avx512::register_decoder_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

const DecoderKernelInfo* select_decoder_kernel(const std::string& isa) {
  const DecoderKernelInfo* fallback = nullptr;
  for (const auto& k : decoder_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == isa && k.kind == "decoder") return &k;
  }
  return fallback;
}

}  // namespace sparsert
