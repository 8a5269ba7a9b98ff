// The one list of spmm kernels and their selection.
#include <string>
#include <vector>

#include "spmm/spmm.h"

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

// Up to this many tokens the per-token spmv kernels beat packing panels.
constexpr int64_t kSpmvMaxTokens = 2;

const KernelInfo* select_kernel(int block_rows, int block_cols, int64_t tokens,
                                const std::string& isa) {
  // The kernel for this exact tile, else this ISA's any-shape kernel (block
  // 0 x 0), else the reference (an ISA without kernels).
  const char* kind = tokens <= kSpmvMaxTokens ? "spmv" : "spmm";
  const KernelInfo* any_shape = nullptr;
  const KernelInfo* reference = nullptr;
  for (const auto& k : kernel_registry()) {
    if (k.kind == "reference") reference = &k;
    if (k.isa != isa || k.kind != kind) continue;
    if (k.block_rows == block_rows && k.block_cols == block_cols) return &k;
    if (k.block_rows == 0 && k.block_cols == 0) any_shape = &k;
  }
  return any_shape ? any_shape : reference;
}

}  // namespace sparsert
