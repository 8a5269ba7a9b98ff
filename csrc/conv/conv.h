// sparsert CPU sparse convolution kernels: the public, torch-free interface.
//
// Every kernel computes a 2-D convolution over an NCHW float image
//     y[n, o, oy, ox] = act(bias[o] + sum_{ci, ky, kx} W[o, k] *
//                           x[n, g*Cin_g + ci, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw])
// (zero outside the image), with k = (ci * kh + ky) * kw + kx and g = o / Cout_g:
// the semantics of torch.nn.functional.conv2d. W is the flattened
// (out_channels x in_channels/groups * kh * kw) weight stored block-sparse
// (common/block_sparse.h, CSR being 1x1 blocks) and act is a fused epilogue
// (common/epilogue.h). Everything crosses this
// boundary as raw pointers and sizes; the caller validates every array first.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/block_sparse.h"
#include "common/epilogue.h"
#include "common/isa.h"

namespace sparsert {

// Sizes of one convolution. Output sizes follow from the others (out_h(), out_w()).
struct ConvShape {
  int64_t batch = 0;
  int64_t in_channels = 0;   // Cin (all groups)
  int64_t height = 0, width = 0;
  int64_t out_channels = 0;  // Cout (all groups); W.rows
  int kernel_h = 1, kernel_w = 1;
  int stride_h = 1, stride_w = 1;
  int pad_h = 0, pad_w = 0;
  int dilation_h = 1, dilation_w = 1;
  int groups = 1;

  // In 64 bits: 2 * pad and dilation * (kernel - 1) overflow an int. Zero
  // when the dilated kernel is larger than the padded input (C++ division
  // truncates toward zero, so a small negative span must not reach it).
  int64_t out_h() const { return out_size(height, kernel_h, stride_h, pad_h, dilation_h); }
  int64_t out_w() const { return out_size(width, kernel_w, stride_w, pad_w, dilation_w); }
  int64_t in_channels_per_group() const { return in_channels / groups; }
  int64_t out_channels_per_group() const { return out_channels / groups; }
  // Columns of the flattened weight: Cin_g * kh * kw.
  int64_t patch() const { return in_channels_per_group() * kernel_h * static_cast<int64_t>(kernel_w); }
  // A 1x1, stride-1, unpadded convolution is one sparse matrix times the image.
  bool is_pointwise() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 && pad_w == 0;
  }
  // Sizes must be in the ranges conv_check enforces (no 64-bit overflow then).
  static int64_t out_size(int64_t in, int kernel, int stride, int pad, int dilation) {
    const int64_t span = in + 2 * static_cast<int64_t>(pad) - static_cast<int64_t>(dilation) * (kernel - 1) - 1;
    return span < 0 ? 0 : span / stride + 1;
  }
};

// The dense operands of one call. x and y are contiguous NCHW.
struct ConvArgs {
  const float* x = nullptr;     // batch * in_channels * height * width floats
  float* y = nullptr;           // batch * out_channels * out_h * out_w floats
  const float* bias = nullptr;  // out_channels floats, or null
  Epilogue epilogue = Epilogue::kNone;  // applied after the bias
  int num_threads = 1;
};

using ConvFn = void (*)(const BlockSparseMatrix& w, const ConvShape& shape, const ConvArgs& args);

// One entry per convolution kernel; tests and benchmarks iterate this list.
//   kind "pointwise": 1x1 / stride 1 / no padding only (is_pointwise()): the
//                     image is the dense operand, read in place.
//   kind "conv":      any shape (KxK, strides, padding, dilation, groups) via
//                     a zero-padded, stride-phase-split copy of the input and
//                     per-tile offsets (implicit im2col, no im2col buffer).
//   kind "reference": the plain direct loop, accumulating in double.
struct ConvKernelInfo {
  std::string name;    // e.g. "f32_conv_bsr4x1_avx512"
  std::string isa;     // "reference", "scalar", "avx2", "avx512"
  std::string kind;    // "pointwise", "conv", "reference"
  int block_rows = 1;  // tile this kernel handles; 0 = any (reference)
  int block_cols = 1;
  ConvFn fn = nullptr;
};

// All convolution kernels compiled into this build.
const std::vector<ConvKernelInfo>& conv_kernel_registry();

// The kernel sparsert uses for this tile and shape on `isa` (the reference
// kernel when no fast kernel matches).
const ConvKernelInfo* select_conv_kernel(int block_rows, int block_cols, const ConvShape& shape,
                                         const std::string& isa);

// Empty when the kernel can run (w, shape) — else why not. Checked before
// every call: sizes are in range (no size overflows 64 bits, the general
// kernels' offsets fit 32 bits), sizes agree, groups divide the channels, and
// a block row never straddles two groups (out_channels / groups must be a
// multiple of R).
std::string conv_check(const ConvKernelInfo& kernel, const BlockSparseMatrix& w, const ConvShape& shape);

}  // namespace sparsert
