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

// True where AVX-512's expand load (vexpandps from memory) is cheap: Intel cores (2 uops). On
// Zen 4 it measured 1.8x slower than an 8-lane permute (bitmask spmv, spmm_bitmask_impl.h).
bool fast_expand_load();

// Bytes of the last-level (L3) cache, as the OS reports it; 32 MiB where it does not say.
int64_t last_level_cache_bytes();

// True when the previous sparse product of this process (any kernel that asks) ran on the
// weights at `weights`, which it then records as the last. Weights a product repeats on stay in
// L2; in a model the layers take turns, and each evicts the others' weights: those come from L3
// or memory, where software prefetches pay (spmm_rowgroup_impl.h; the CSR kernels' row-ahead
// prefetch was tried and lost 3-15% at MiniLM's sizes).
bool same_weights_as_last_product(const void* weights);

// Cold weights below this size are not prefetched: too short a stream to pay.
constexpr int64_t kPrefetchMinWeightBytes = 64 * 1024;

}  // namespace sparsert
