// The one list of bitmask kernels and their selection.
#include <string>
#include <vector>

#include "spmm/spmm_bitmask.h"

namespace sparsert {

namespace reference { void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out); }
namespace scalar { void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out); }
namespace avx512 { void register_bitmask_kernels(std::vector<BitmaskKernelInfo>& out); }
#endif

const std::vector<BitmaskKernelInfo>& bitmask_kernel_registry() {
  static const std::vector<BitmaskKernelInfo> kernels = [] {
    std::vector<BitmaskKernelInfo> all;
    reference::register_bitmask_kernels(all);
    scalar::register_bitmask_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_bitmask_kernels(all);
    avx512::register_bitmask_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

// Up to this many tokens the per-token spmv kernels (weights expanded once
// per token) beat packing token panels.
constexpr int64_t kBitmaskSpmvMaxTokens = 2;

const BitmaskKernelInfo* select_bitmask_kernel(int64_t tokens, const std::string& isa) {
  const char* kind = tokens <= kBitmaskSpmvMaxTokens ? "spmv" : "spmm";
  const BitmaskKernelInfo* fallback = nullptr;
  for (const auto& k : bitmask_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == isa && k.kind == kind) return &k;
  }
  return fallback;
}

}  // namespace sparsert
