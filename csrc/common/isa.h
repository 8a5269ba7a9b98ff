// Which instruction sets this CPU runs, for the kernel registries of every op
// (kernels are compiled once per ISA; the registries pick at run time), and the
// cache sizes kernels size their blocking by.
#pragma once

#include <cstdint>
#include <string>

namespace sparsert {

// True when this CPU (and OS) can run kernels of `isa`
// ("reference", "scalar", "avx2", "avx512").
bool isa_supported(const std::string& isa);

// Best ISA of this CPU, or the one forced by the SPARSERT_ISA environment
// variable (scalar | avx2 | avx512), if supported.
std::string best_isa();

// Bytes of the last-level (L3) cache, as the OS reports it; 32 MiB where it does not say.
int64_t last_level_cache_bytes();

}  // namespace sparsert
