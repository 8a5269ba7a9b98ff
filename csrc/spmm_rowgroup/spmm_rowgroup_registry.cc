// The one list of row-group kernels and their selection.
#include <string>
#include <vector>

#include "spmm_rowgroup/spmm_rowgroup.h"

namespace sparsert {

namespace reference { void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out); }
namespace scalar { void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out); }
namespace avx512 { void register_rowgroup_kernels(std::vector<RowGroupKernelInfo>& out); }
#endif

const std::vector<RowGroupKernelInfo>& rowgroup_kernel_registry() {
  static const std::vector<RowGroupKernelInfo> kernels = [] {
    std::vector<RowGroupKernelInfo> all;
    reference::register_rowgroup_kernels(all);
    scalar::register_rowgroup_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_rowgroup_kernels(all);
    avx512::register_rowgroup_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

// Up to this many tokens the per-token spmv kernel beats packing a panel.
constexpr int64_t kRowGroupSpmvMaxTokens = 2;

const RowGroupKernelInfo* select_rowgroup_kernel(int64_t tokens, const std::string& isa) {
  const std::string& want = isa;
  const char* kind = tokens <= kRowGroupSpmvMaxTokens ? "spmv" : "spmm";
  const RowGroupKernelInfo* fallback = nullptr;
  for (const auto& k : rowgroup_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == want && k.kind == kind) return &k;
  }
  return fallback;
}

void rowgroup_value_offsets(const RowGroupMatrix& w, std::vector<int64_t>& out) {
  const int64_t units = w.kblocks * w.group_count();
  out.assign(units + 1, 0);
  int64_t total = 0;
  for (int64_t u = 0; u < units; ++u) {
    out[u] = total;
    for (int p = 1; p <= kRowGroupPatterns; ++p) {
      const int64_t s = u * kRowGroupPatterns + p - 1;
      total += static_cast<int64_t>(w.seg_ptr[s + 1] - w.seg_ptr[s]) * __builtin_popcount(p);
    }
  }
  out[units] = total;
}

const int64_t* unit_value_offsets(const RowGroupMatrix& w, std::vector<int64_t>& storage) {
  if (w.value_offsets != nullptr) return w.value_offsets;
  rowgroup_value_offsets(w, storage);
  return storage.data();
}

}  // namespace sparsert
