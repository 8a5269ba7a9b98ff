// The one list of int8 kernels, their selection, the shared per-token
// quantisation and the entry that runs both.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
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
namespace avx512vnni {
void register_int8_kernels(std::vector<Int8KernelInfo>& out);
void spmm_int8_lanes(const Int8LaneMatrix& w, const Int8Activations& x, const Int8Output& o);
void spmm_int8_groups(const Int8GroupMatrix& w, const Int8Activations& x, const Int8Output& o);
}
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
constexpr int64_t kInt8LanesMaxTokens = 8;

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

// x quantised into per-thread scratch, as every int8 kernel reads it.
static Int8Activations quantize_for_kernels(const float* x, int64_t tokens, int64_t cols, int64_t x_row_stride,
                                            int num_threads, const std::string& isa) {
  // Rows of whole 32-byte lines: the gathers and panel packing read 4-byte lanes up to the last block's.
  const int64_t blocks = (cols + kInt8BlockCols - 1) / kInt8BlockCols;
  const int64_t stride = (blocks * kInt8BlockCols + 31) / 32 * 32;
  static thread_local Scratch q_scratch, scale_scratch;
  int8_t* xq = reinterpret_cast<int8_t*>(q_scratch.get(static_cast<size_t>((tokens * stride + 3) / 4)));
  // scales of whole 64-token panels (the spmm kernels load 8 or 16 at a time), zero past the tokens
  const int64_t padded_tokens = (tokens + 63) / 64 * 64;
  float* scales = scale_scratch.get(static_cast<size_t>(padded_tokens));
  std::fill(scales + tokens, scales + padded_tokens, 0.0f);
  quantize_rows_s8(x, tokens, cols, x_row_stride, xq, stride, scales, num_threads, isa);
  Int8Activations a;
  a.xq = xq;
  a.xq_stride = stride;
  a.x_scales = scales;
  a.tokens = tokens;
  return a;
}

const Int8KernelInfo* int8_linear(const Int8BlockMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                                  const Int8Output& out, const Int8KernelInfo* kernel) {
  if (kernel == nullptr) kernel = select_int8_kernel(tokens, best_isa());
  if (tokens <= 0 || w.rows <= 0) return kernel;
  const Int8Activations a = quantize_for_kernels(x, tokens, w.cols, x_row_stride, out.num_threads,
                                                 kernel->isa == "reference" ? "scalar" : kernel->isa);
  kernel->fn(w, a, out);
  return kernel;
}

// ---- the lanes layout (spmm_int8.h) ----

template <typename Index>
static int64_t lanes_plan_typed(const Int8BlockMatrix& w, const Index* ci, int32_t* step_ptr) {
  Int8LaneMatrix shape;
  shape.rows = w.rows;
  shape.cols = w.cols;
  const int64_t groups = shape.groups(), chunks = shape.chunks();
  std::vector<int32_t> most(static_cast<size_t>(chunks)), count(static_cast<size_t>(chunks));
  int64_t total = 0;
  step_ptr[0] = 0;
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(most.begin(), most.end(), 0);
    for (int64_t n = g * kLaneRows; n < std::min<int64_t>(w.rows, (g + 1) * kLaneRows); ++n) {
      std::fill(count.begin(), count.end(), 0);
      for (int64_t b = w.row_ptr[n]; b < w.row_ptr[n + 1]; ++b) ++count[static_cast<size_t>(ci[b] / kLaneChunkBlocks)];
      for (int64_t c = 0; c < chunks; ++c) most[c] = std::max(most[c], count[c]);
    }
    for (int64_t c = 0; c < chunks; ++c) {
      total += most[c];
      if (total > std::numeric_limits<int32_t>::max()) throw std::length_error("int8 lanes layout: too many steps");
      step_ptr[g * chunks + c + 1] = static_cast<int32_t>(total);
    }
  }
  return total;
}

template <typename Index>
static void lanes_fill_typed(const Int8BlockMatrix& w, const Index* ci, const int32_t* step_ptr, uint8_t* lane_cols,
                             int8_t* lane_w) {
  Int8LaneMatrix shape;
  shape.rows = w.rows;
  shape.cols = w.cols;
  const int64_t chunks = shape.chunks();
  std::vector<int32_t> next(static_cast<size_t>(chunks));
  for (int64_t n = 0; n < w.rows; ++n) {
    const int64_t g = n / kLaneRows, r = n % kLaneRows;
    for (int64_t c = 0; c < chunks; ++c) next[c] = step_ptr[g * chunks + c];
    for (int64_t b = w.row_ptr[n]; b < w.row_ptr[n + 1]; ++b) {
      const int64_t kb = ci[b], c = kb / kLaneChunkBlocks;
      const int64_t s = next[c]++;
      lane_cols[16 * s + r] = static_cast<uint8_t>(kb % kLaneChunkBlocks);
      std::memcpy(lane_w + 64 * s + 4 * r, w.values + 4 * b, 4);
    }
  }
}

int64_t int8_lanes_plan(const Int8BlockMatrix& w, int32_t* step_ptr) {
  if (w.index_bits == 16) return lanes_plan_typed(w, static_cast<const uint16_t*>(w.col_idx), step_ptr);
  return lanes_plan_typed(w, static_cast<const int32_t*>(w.col_idx), step_ptr);
}

void int8_lanes_fill(const Int8BlockMatrix& w, const int32_t* step_ptr, uint8_t* lane_cols, int8_t* lane_w) {
  if (w.index_bits == 16)
    return lanes_fill_typed(w, static_cast<const uint16_t*>(w.col_idx), step_ptr, lane_cols, lane_w);
  lanes_fill_typed(w, static_cast<const int32_t*>(w.col_idx), step_ptr, lane_cols, lane_w);
}

bool int8_lanes_supported() {
#if SPARSERT_HAVE_X86_KERNELS
  return isa_supported("avx512vnni");
#else
  return false;
#endif
}

// Measured on Zen 4 (benchmarks/RESULTS.md): the lanes kernel re-reads the layout per 4
// tokens, the panel kernel packs once and reads each block once per 16-64 tokens.
int64_t int8_lanes_max_tokens() { return kInt8LanesMaxTokens; }

// The VNNI-only kernels over a derived layout (lanes, groups): `kernel` is null where this
// build has no x86 kernels.
template <typename Matrix>
using LayoutKernel = void (*)(const Matrix&, const Int8Activations&, const Int8Output&);
#if SPARSERT_HAVE_X86_KERNELS
constexpr LayoutKernel<Int8LaneMatrix> kLanesKernel = &avx512vnni::spmm_int8_lanes;
constexpr LayoutKernel<Int8GroupMatrix> kGroupsKernel = &avx512vnni::spmm_int8_groups;
#else
constexpr LayoutKernel<Int8LaneMatrix> kLanesKernel = nullptr;
constexpr LayoutKernel<Int8GroupMatrix> kGroupsKernel = nullptr;
#endif

// Quantises x (the AVX2 quantiser: every VNNI CPU has AVX2) and runs a layout kernel.
template <typename Matrix>
static void layout_linear(const char* name, LayoutKernel<Matrix> kernel, const Matrix& w, const float* x,
                          int64_t tokens, int64_t x_row_stride, const Int8Output& out) {
  if (tokens <= 0 || w.rows <= 0) return;
  if (kernel == nullptr || !int8_lanes_supported())
    throw std::runtime_error(std::string("the int8 ") + name + " kernel needs AVX-512 VNNI");
  const Int8Activations a = quantize_for_kernels(x, tokens, w.cols, x_row_stride, out.num_threads, "avx2");
  kernel(w, a, out);
}

void int8_lanes_linear(const Int8LaneMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                       const Int8Output& out) {
  layout_linear("lanes", kLanesKernel, w, x, tokens, x_row_stride, out);
}

bool int8_groups_supported() { return int8_lanes_supported(); }

void int8_groups_linear(const Int8GroupMatrix& w, const float* x, int64_t tokens, int64_t x_row_stride,
                        const Int8Output& out) {
  layout_linear("groups", kGroupsKernel, w, x, tokens, x_row_stride, out);
}

}  // namespace sparsert
