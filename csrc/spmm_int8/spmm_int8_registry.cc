// The one list of int8 kernels, their selection, the shared per-token
// quantisation and the entry that runs both.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/scratch.h"
#include "common/thread_pool.h"
#include "spmm_int8/spmm_int8.h"

namespace sparsert {

namespace reference { void register_int8_kernels(std::vector<Int8KernelInfo>& out); }
namespace scalar {
void register_int8_kernels(std::vector<Int8KernelInfo>& out);
void quantize_rows_s8(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride, int8_t* q,
                      int64_t q_stride, float* scales, int num_threads);
}
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 {
void register_int8_kernels(std::vector<Int8KernelInfo>& out);
void quantize_rows_s8(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride, int8_t* q,
                      int64_t q_stride, float* scales, int num_threads);
}
namespace avx512vnni { void register_int8_kernels(std::vector<Int8KernelInfo>& out); }
#endif

const std::vector<Int8KernelInfo>& int8_kernel_registry() {
  static const std::vector<Int8KernelInfo> kernels = [] {
    std::vector<Int8KernelInfo> all;
    reference::register_int8_kernels(all);
    scalar::register_int8_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_int8_kernels(all);
    avx512vnni::register_int8_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

// Up to this many tokens the per-token kernel (gathers, no packing) beats the
// panels (which waste lanes below 8 or 16 tokens). Measured: 2 on Zen 3 (AVX2);
// on Zen 4 the VNNI panel kernel already wins at 2 tokens (101 vs 153-163 us on
// 768->3072 at 50%), so VNNI keeps 1. At that one token both per-token kernels
// are bound by their gathers, and AVX2's measured 3-7% faster than VNNI's on
// Zen 4 (83 vs 89 us, 82 vs 87 us at 50%), so a VNNI CPU runs AVX2's there.
constexpr int64_t kInt8SpmvMaxTokens = 2;
constexpr int64_t kInt8SpmvMaxTokensVnni = 1;

const Int8KernelInfo* select_int8_kernel(int64_t tokens, const std::string& isa) {
  // int8 needs more than AVX-512F: an AVX-512 CPU with VNNI runs the VNNI kernels, one without runs AVX2's.
  std::string use = isa;
  if (use == "avx512") use = isa_supported("avx512vnni") ? "avx512vnni" : "avx2";
  const bool vnni = use == "avx512vnni";
  const char* kind = tokens <= (vnni ? kInt8SpmvMaxTokensVnni : kInt8SpmvMaxTokens) ? "spmv" : "spmm";
  if (vnni && std::string(kind) == "spmv") use = "avx2";
  const Int8KernelInfo* fallback = nullptr;
  for (const auto& k : int8_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == use && k.kind == kind) return &k;
  }
  return fallback;
}

void quantize_rows_s8(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride, int8_t* q,
                      int64_t q_stride, float* scales, int num_threads, const std::string& isa) {
  const std::string use = isa.empty() ? best_isa() : isa;
#if SPARSERT_HAVE_X86_KERNELS
  if ((use == "avx2" || use == "avx512" || use == "avx512vnni") && isa_supported("avx2"))
    return avx2::quantize_rows_s8(x, tokens, cols, x_row_stride, q, q_stride, scales, num_threads);
#endif
  scalar::quantize_rows_s8(x, tokens, cols, x_row_stride, q, q_stride, scales, num_threads);
}

const Int8KernelInfo* int8_linear(const Int8BlockMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                                  const Int8Output& out, const Int8KernelInfo* kernel) {
  if (kernel == nullptr) kernel = select_int8_kernel(tokens, best_isa());
  if (tokens <= 0 || w.rows <= 0) return kernel;
  // Rows of whole 32-byte lines: the gathers and panel packing read 4-byte lanes up to block_col_count() * 4.
  const int64_t stride = (w.block_col_count() * kInt8BlockCols + 31) / 32 * 32;
  static thread_local Scratch q_scratch, scale_scratch;
  int8_t* xq = reinterpret_cast<int8_t*>(q_scratch.get(static_cast<size_t>((tokens * stride + 3) / 4)));
  // scales of whole 64-token panels (the spmm kernels load 8 or 16 at a time), zero past the tokens
  const int64_t padded_tokens = (tokens + 63) / 64 * 64;
  float* scales = scale_scratch.get(static_cast<size_t>(padded_tokens));
  std::fill(scales + tokens, scales + padded_tokens, 0.0f);
  quantize_rows_s8(x, tokens, w.cols, x_row_stride, xq, stride, scales, out.num_threads,
                   kernel->isa == "reference" ? "scalar" : kernel->isa);
  Int8Activations a;
  a.xq = xq;
  a.xq_stride = stride;
  a.x_scales = scales;
  a.tokens = tokens;
  kernel->fn(w, a, out);
  return kernel;
}

}  // namespace sparsert
