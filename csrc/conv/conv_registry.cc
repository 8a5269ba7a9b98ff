// The one list of convolution kernels, their selection and their preconditions.
#include <string>
#include <vector>

#include "conv/conv.h"

namespace sparsert {

namespace reference { void register_conv_kernels(std::vector<ConvKernelInfo>& out); }
namespace scalar { void register_conv_kernels(std::vector<ConvKernelInfo>& out); }
#if SPARSERT_HAVE_X86_KERNELS
namespace avx2 { void register_conv_kernels(std::vector<ConvKernelInfo>& out); }
namespace avx512 { void register_conv_kernels(std::vector<ConvKernelInfo>& out); }
#endif

const std::vector<ConvKernelInfo>& conv_kernel_registry() {
  static const std::vector<ConvKernelInfo> kernels = [] {
    std::vector<ConvKernelInfo> all;
    reference::register_conv_kernels(all);
    scalar::register_conv_kernels(all);
#if SPARSERT_HAVE_X86_KERNELS
    avx2::register_conv_kernels(all);
    avx512::register_conv_kernels(all);
#endif
    return all;
  }();
  return kernels;
}

const ConvKernelInfo* select_conv_kernel(int block_rows, int block_cols, const ConvShape& shape,
                                         const std::string& isa) {
  const char* kind = shape.is_pointwise() ? "pointwise" : "conv";
  const ConvKernelInfo* fallback = nullptr;
  for (const auto& k : conv_kernel_registry()) {
    if (k.kind == "reference") fallback = &k;
    if (k.isa == isa && k.kind == kind && k.block_rows == block_rows && k.block_cols == block_cols)
      return &k;
  }
  return fallback;
}

namespace {

// Each image dimension and channel count of a call is below this (2**31): far
// beyond any real layer, and small enough that no size sum or product of a
// few of them overflows 64 bits.
constexpr int64_t kMaxDim = int64_t{1} << 31;
constexpr int64_t kMaxOffset = 2147483647;  // the general kernels keep xq offsets in int32

// a * b, saturated at INT64_MAX (inputs are non-negative).
int64_t sat_mul(int64_t a, int64_t b) {
  int64_t out;
  return __builtin_mul_overflow(a, b, &out) ? INT64_MAX : out;
}

}  // namespace

std::string conv_check(const ConvKernelInfo& kernel, const BlockSparseMatrix& w, const ConvShape& sh) {
  if (sh.batch < 0 || sh.in_channels < 1 || sh.out_channels < 1 || sh.height < 1 || sh.width < 1)
    return "sizes must be positive";
  if (sh.batch >= kMaxDim || sh.in_channels >= kMaxDim || sh.out_channels >= kMaxDim ||
      sh.height >= kMaxDim || sh.width >= kMaxDim)
    return "batch, channels, height and width must each be below 2**31";
  if (sh.kernel_h < 1 || sh.kernel_w < 1 || sh.stride_h < 1 || sh.stride_w < 1 ||
      sh.dilation_h < 1 || sh.dilation_w < 1 || sh.pad_h < 0 || sh.pad_w < 0)
    return "kernel size, stride and dilation must be >= 1 and padding >= 0";
  if (sh.groups < 1 || sh.in_channels % sh.groups || sh.out_channels % sh.groups)
    return "groups must divide in_channels and out_channels";
  // Every operand below is < 2**32, so these sums and products fit in 64 bits.
  if (sh.out_h() < 1 || sh.out_w() < 1) return "the output would be empty (kernel larger than the padded input)";
  if (sat_mul(sat_mul(sh.batch, sh.in_channels), sat_mul(sh.height, sh.width)) > INT64_MAX / 4 ||
      sat_mul(sat_mul(sh.batch, sh.out_channels), sat_mul(sh.out_h(), sh.out_w())) > INT64_MAX / 4)
    return "the input or output has more than 2**61 elements";
  if (w.rows != sh.out_channels || w.cols != sh.patch())
    return "the weight must be out_channels x (in_channels / groups * kernel_h * kernel_w)";
  if (w.block_rows < 1 || w.block_cols < 1) return "block sizes must be positive";
  if (kernel.block_rows != 0 &&
      (kernel.block_rows != w.block_rows || kernel.block_cols != w.block_cols))
    return "kernel '" + kernel.name + "' does not handle " + std::to_string(w.block_rows) + "x" +
           std::to_string(w.block_cols) + " blocks";
  if (sh.groups > 1 && sh.out_channels_per_group() % w.block_rows)
    return "with groups > 1, out_channels / groups must be a multiple of the block rows (" +
           std::to_string(w.block_rows) + ")";
  if (kernel.kind == "pointwise" && !sh.is_pointwise())
    return "kernel '" + kernel.name + "' handles only 1x1 convolutions with stride 1 and no padding";
  if (kernel.kind == "conv") {
    // The general kernels address the padded, phase-split input (conv_impl.h,
    // PhaseLayout) with int32 offsets: at most stride_h * stride_w phases of
    // in_channels planes of hq x wq floats, plus a few rows of slack.
    const int64_t hq = (sh.height + 2 * static_cast<int64_t>(sh.pad_h) + sh.stride_h - 1) / sh.stride_h;
    const int64_t wq = (sh.width + 2 * static_cast<int64_t>(sh.pad_w) + sh.stride_w - 1) / sh.stride_w;
    const int64_t phases = static_cast<int64_t>(sh.stride_h) * sh.stride_w;
    const int64_t planes = sat_mul(sat_mul(phases, sh.in_channels), sat_mul(hq, wq));
    if (planes > kMaxOffset - 4 * wq - 4096)
      return "padding, dilation or stride too large: the padded input (" +
             std::to_string(sh.height + 2 * static_cast<int64_t>(sh.pad_h)) + " x " +
             std::to_string(sh.width + 2 * static_cast<int64_t>(sh.pad_w)) + " per channel, " +
             std::to_string(phases) + " stride phases) does not fit 32-bit offsets";
  }
  return std::string();
}

}  // namespace sparsert
