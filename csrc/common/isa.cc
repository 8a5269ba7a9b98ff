// CPU feature detection, shared by the kernel registries of every op.
#include "common/isa.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <unistd.h>
#endif

namespace sparsert {

bool fast_expand_load() {
#if SPARSERT_HAVE_X86_KERNELS
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

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

int64_t last_level_cache_bytes() {
  // sysfs first (what lscpu reports): in VMs sysconf(_SC_LEVEL3_CACHE_SIZE) can report the
  // host's (320 MiB on this project's 32 MiB Zen 4 guest).
  static const int64_t bytes = [] {
    int64_t reported = 0;
    if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long long value = 0;
      char unit = 0;
      if (std::fscanf(f, "%lld%c", &value, &unit) >= 1 && value > 0)
        reported = value << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0);
      std::fclose(f);
    }
#if defined(__linux__) && defined(_SC_LEVEL3_CACHE_SIZE)
    if (reported <= 0) reported = static_cast<int64_t>(sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    return reported > 0 ? reported : int64_t{32} << 20;
  }();
  return bytes;
}

bool same_weights_as_last_product(const void* weights) {
  static std::atomic<const void*> last{nullptr};
  return last.exchange(weights, std::memory_order_relaxed) == weights;
}

}  // namespace sparsert
