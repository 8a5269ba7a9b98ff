// The one list of attention kernels and their selection.
#include <string>
#include <vector>

#include "attention/attention.h"

namespace sparsert {

namespace reference { void register_attention_kernels(std::vector<AttentionKernelInfo>& out); }
namespace scalar { void register_attention_kernels(std::vector<AttentionKernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_attention_kernels(std::vector<AttentionKernelInfo>& out); }
namespace avx512 { void register_attention_kernels(std::vector<AttentionKernelInfo>& out); }
#endif

const std::vector<AttentionKernelInfo>& attention_kernel_registry() {
  static const std::vector<AttentionKernelInfo> kernels = [] {
    std::vector<AttentionKernelInfo> all;
    reference::register_attention_kernels(all);
    scalar::register_attention_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_attention_kernels(all);
    avx512::register_attention_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

const AttentionKernelInfo* select_attention_kernel(const std::string& isa) {
  const AttentionKernelInfo* fallback = nullptr;
  for (const auto& k : attention_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == isa && k.kind == "attention") return &k;
  }
  return fallback;
}

}  // namespace sparsert
