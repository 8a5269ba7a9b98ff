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
namespace scalar { void register_int8_kernels(std::vector<Int8KernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_int8_kernels(std::vector<Int8KernelInfo>& out); }
#endif

const std::vector<Int8KernelInfo>& int8_kernel_registry() {
  static const std::vector<Int8KernelInfo> kernels = [] {
    std::vector<Int8KernelInfo> all;
    reference::register_int8_kernels(all);
    scalar::register_int8_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_int8_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

// Up to this many tokens the per-token kernel (gathers, no packing) beats
// 8-token panels (which waste lanes below 8 tokens).
constexpr int64_t kInt8SpmvMaxTokens = 2;

const Int8KernelInfo* select_int8_kernel(int64_t tokens, const std::string& isa) {
  // AVX-512 CPUs run the AVX2 kernels (no VNNI kernel yet).
  const std::string use = isa == "avx512" ? "avx2" : isa;
  const char* kind = tokens <= kInt8SpmvMaxTokens ? "spmv" : "spmm";
  const Int8KernelInfo* fallback = nullptr;
  for (const auto& k : int8_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == use && k.kind == kind) return &k;
  }
  return fallback;
}

void quantize_rows_s8(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride, int8_t* q,
                      int64_t q_stride, float* scales, int num_threads) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, tokens / 4)));
  parallel_run(threads, [&](int tid, int parts) {
    for (int64_t t = tid; t < tokens; t += parts) {
      const float* xr = x + t * x_row_stride;
      int8_t* qr = q + t * q_stride;
      float amax = 0.0f;
      bool finite = true;
      for (int64_t k = 0; k < cols; ++k) {
        const float a = std::fabs(xr[k]);
        finite &= a <= std::numeric_limits<float>::max();  // false for NaN and infinity
        amax = a > amax ? a : amax;
      }
      std::memset(qr, 0, static_cast<size_t>(q_stride));
      if (!finite) {
        scales[t] = std::nanf("");
        continue;
      }
      scales[t] = amax / 127.0f;
      if (amax == 0.0f) continue;
      const float inv = 127.0f / amax;
      for (int64_t k = 0; k < cols; ++k) {
        const float r = std::nearbyint(xr[k] * inv);
        qr[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
      }
    }
  });
}

const Int8KernelInfo* int8_linear(const Int8BlockMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                                  const Int8Output& out, const Int8KernelInfo* kernel) {
  if (kernel == nullptr) kernel = select_int8_kernel(tokens, best_isa());
  if (tokens <= 0 || w.rows <= 0) return kernel;
  // Rows of whole 32-byte lines: the gathers and panel packing read 4-byte lanes up to block_col_count() * 4.
  const int64_t stride = (w.block_col_count() * kInt8BlockCols + 31) / 32 * 32;
  static thread_local Scratch q_scratch, scale_scratch;
  int8_t* xq = reinterpret_cast<int8_t*>(q_scratch.get(static_cast<size_t>((tokens * stride + 3) / 4)));
  float* scales = scale_scratch.get(static_cast<size_t>(tokens));
  quantize_rows_s8(x, tokens, w.cols, x_row_stride, xq, stride, scales, out.num_threads);
  Int8Activations a;
  a.xq = xq;
  a.xq_stride = stride;
  a.x_scales = scales;
  a.tokens = tokens;
  kernel->fn(w, a, out);
  return kernel;
}

}  // namespace sparsert
