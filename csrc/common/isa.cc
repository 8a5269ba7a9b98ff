// CPU feature detection, shared by the kernel registries of every op.
#include "common/isa.h"

#include <cstdlib>
#include <string>

namespace sparsert {

bool isa_supported(const std::string& isa) {
  if (isa == "reference" || isa == "scalar") return true;
#if SPARSERT_HAVE_X86_KERNELS
  // __builtin_cpu_supports also checks that the OS saves the wide registers.
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  // int8 kernels only (best_isa never returns it): vpdpbusd plus the byte/word masks they use
  if (isa == "avx512vnni")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
  return false;
}

std::string best_isa() {
  // Decided once: it is asked on every call, and the CPU does not change.
  static const std::string best = [] {
    if (const char* forced = std::getenv("SPARSERT_ISA")) {
      const std::string isa(forced);
      if ((isa == "scalar" || isa == "avx2" || isa == "avx512") && isa_supported(isa)) return isa;
    }
    for (const char* isa : {"avx512", "avx2"})
      if (isa_supported(isa)) return std::string(isa);
    return std::string("scalar");
  }();
  return best;
}

}  // namespace sparsert
