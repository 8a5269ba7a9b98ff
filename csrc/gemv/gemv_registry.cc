// The one list of GEMV kernels and their selection.
#include <string>
#include <vector>

#include "gemv/gemv.h"

namespace sparsert {

namespace reference { void register_gemv_kernels(std::vector<GemvKernelInfo>& out); }
namespace scalar { void register_gemv_kernels(std::vector<GemvKernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_gemv_kernels(std::vector<GemvKernelInfo>& out); }
namespace avx512 { void register_gemv_kernels(std::vector<GemvKernelInfo>& out); }
#endif

const std::vector<GemvKernelInfo>& gemv_kernel_registry() {
  static const std::vector<GemvKernelInfo> kernels = [] {
    std::vector<GemvKernelInfo> all;
    reference::register_gemv_kernels(all);
    scalar::register_gemv_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_gemv_kernels(all);
    avx512::register_gemv_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

const GemvKernelInfo* select_gemv_kernel(const std::string& isa) {
  const GemvKernelInfo* fallback = nullptr;
  for (const auto& k : gemv_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == isa && k.kind == "gemv") return &k;
  }
  return fallback;
}

}  // namespace sparsert
