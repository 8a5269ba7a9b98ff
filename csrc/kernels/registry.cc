// The one list of kernels, CPU feature detection and kernel selection.
#include <cstdlib>
#include <string>
#include <vector>

#include "sparsert/spmm.h"

namespace sparsert {

namespace reference { void register_kernels(std::vector<KernelInfo>& out); }
namespace scalar { void register_kernels(std::vector<KernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_kernels(std::vector<KernelInfo>& out); }
namespace avx512 { void register_kernels(std::vector<KernelInfo>& out); }
#endif

const std::vector<KernelInfo>& kernel_registry() {
  static const std::vector<KernelInfo> kernels = [] {
    std::vector<KernelInfo> all;
    reference::register_kernels(all);
    scalar::register_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_kernels(all);
    avx512::register_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

bool isa_supported(const std::string& isa) {
  if (isa == "reference" || isa == "scalar") return true;
#if SPARSERT_HAVE_X86_KERNELS
  // __builtin_cpu_supports also checks that the OS saves the wide registers.
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
#endif
  return false;
}

std::string best_isa() {
  // Decided once: it is asked on every call, and the CPU does not change.
  static const std::string best = [] {
    if (const char* forced = std::getenv("SPARSERT_ISA")) {
      const std::string isa(forced);
      if (!isa.empty() && isa_supported(isa)) return isa;
    }
    for (const char* isa : {"avx512", "avx2"})
      if (isa_supported(isa)) return std::string(isa);
    return std::string("scalar");
  }();
  return best;
}

// Up to this many tokens the per-token spmv kernels beat packing panels.
constexpr int64_t kSpmvMaxTokens = 2;

const KernelInfo* select_kernel(int block_rows, int block_cols, int64_t tokens,
                                const std::string& isa) {
  const char* kind = tokens <= kSpmvMaxTokens ? "spmv" : "spmm";
  const KernelInfo* fallback = nullptr;
  for (const auto& k : kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == isa && k.kind == kind && k.block_rows == block_rows &&
        k.block_cols == block_cols)
      return &k;
  }
  return fallback;
}

}  // namespace sparsert
