// Python binding of the conv kernels: sparsert._C.conv2d and conv_kernels
// (the module is declared in common/module.cc; the rules of every binding are
// in spmm/spmm_bindings.cc: raw addresses validated by the Python ops layer,
// no torch headers, bad scalars are ValueErrors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/arg_checks.h"
#include "common/registry_bindings.h"
#include "conv/conv.h"

namespace py = pybind11;

namespace {

// y = act(conv2d(x, W) + bias) for a block-sparse flattened W. `kernel` names
// a registry entry, or is empty to let sparsert choose. Returns the kernel used.
std::string conv2d(int64_t out_channels, int64_t block_rows, int64_t block_cols, uintptr_t row_ptr,
                   uintptr_t col_idx, int64_t index_bits, uintptr_t values, uintptr_t x,
                   int64_t batch, int64_t in_channels, int64_t height, int64_t width,
                   int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                   int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups, uintptr_t y,
                   uintptr_t bias, int64_t activation, int64_t num_threads, const std::string& kernel) {
  using sparsert::int_in_range;
  using sparsert::size_in_range;
  if (index_bits != 16 && index_bits != 32)
    throw std::invalid_argument("index_bits must be 16 or 32; got " + std::to_string(index_bits));
  const sparsert::Epilogue epilogue = sparsert::epilogue_from_code(activation, "activation");
  // Each size below 2**31 (conv_check bounds their products and sums).
  constexpr int64_t kMaxDim = INT32_MAX;
  sparsert::ConvShape sh;
  sh.batch = size_in_range("batch", batch, 0, kMaxDim);
  sh.in_channels = size_in_range("in_channels", in_channels, 1, kMaxDim);
  sh.height = size_in_range("height", height, 1, kMaxDim);
  sh.width = size_in_range("width", width, 1, kMaxDim);
  sh.out_channels = size_in_range("out_channels", out_channels, 1, kMaxDim);
  sh.kernel_h = int_in_range("kernel_h", kernel_h, 1);
  sh.kernel_w = int_in_range("kernel_w", kernel_w, 1);
  sh.stride_h = int_in_range("stride_h", stride_h, 1);
  sh.stride_w = int_in_range("stride_w", stride_w, 1);
  sh.pad_h = int_in_range("pad_h", pad_h, 0);
  sh.pad_w = int_in_range("pad_w", pad_w, 0);
  sh.dilation_h = int_in_range("dilation_h", dilation_h, 1);
  sh.dilation_w = int_in_range("dilation_w", dilation_w, 1);
  sh.groups = int_in_range("groups", groups, 1);
  sparsert::require_address("row_ptr", row_ptr);
  if (batch > 0) {
    sparsert::require_address("x", x);
    sparsert::require_address("y", y);
  }
  sparsert::BlockSparseMatrix w;
  w.rows = out_channels;
  w.cols = in_channels % groups == 0 ? sh.patch() : 0;
  w.block_rows = int_in_range("block_rows", block_rows, 1);
  w.block_cols = int_in_range("block_cols", block_cols, 1);
  // An all-zero weight may come as empty (address 0) index and value arrays.
  if (reinterpret_cast<const int32_t*>(row_ptr)[w.block_row_count()] > 0) {
    sparsert::require_address("col_idx", col_idx);
    sparsert::require_address("values", values);
  }
  w.row_ptr = reinterpret_cast<const int32_t*>(row_ptr);
  w.col_idx = reinterpret_cast<const void*>(col_idx);
  w.index_bits = index_bits;
  w.values = reinterpret_cast<const float*>(values);
  sparsert::ConvArgs a;
  a.x = reinterpret_cast<const float*>(x);
  a.y = reinterpret_cast<float*>(y);
  a.bias = bias ? reinterpret_cast<const float*>(bias) : nullptr;
  a.epilogue = epilogue;
  a.num_threads = sparsert::clamp_threads(num_threads);

  const sparsert::ConvKernelInfo* k;
  if (kernel.empty()) {
    k = sparsert::select_conv_kernel(w.block_rows, w.block_cols, sh, sparsert::best_isa());
  } else {
    k = &sparsert_bindings::forced_kernel(sparsert::conv_kernel_registry(), kernel, "conv kernel");
  }
  const std::string problem = sparsert::conv_check(*k, w, sh);
  if (!problem.empty()) throw std::invalid_argument(problem);
  if (batch > 0) {
    py::gil_scoped_release release;
    k->fn(w, sh, a);
  }
  return k->name;
}

}  // namespace

void bind_conv(py::module_& m) {
  m.def("conv_kernels", [] { return sparsert_bindings::describe_registry(sparsert::conv_kernel_registry()); },
        "Every convolution kernel in this build: name, isa, kind (pointwise | conv | reference), "
        "block tile, and whether this CPU runs it.");
  m.def("conv2d", &conv2d, py::arg("out_channels"), py::arg("block_rows"), py::arg("block_cols"),
        py::arg("row_ptr"), py::arg("col_idx"), py::arg("index_bits"), py::arg("values"),
        py::arg("x"), py::arg("batch"), py::arg("in_channels"), py::arg("height"),
        py::arg("width"), py::arg("kernel_h"), py::arg("kernel_w"), py::arg("stride_h"),
        py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dilation_h"),
        py::arg("dilation_w"), py::arg("groups"), py::arg("y"), py::arg("bias"),
        py::arg("activation"), py::arg("num_threads"), py::arg("kernel") = "",
        "y = act(conv2d(x, W) + bias) over NCHW float32 for a block-sparse flattened W given as "
        "raw addresses; returns the kernel used. num_threads is clamped to [1, 1024].");
}
