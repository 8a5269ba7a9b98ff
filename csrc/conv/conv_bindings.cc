// Python binding of the conv kernels: sparsert._C.conv2d and conv_kernels
// (the module is declared in common/module.cc; the rules of every binding are
// in spmm/spmm_bindings.cc: raw addresses validated by the Python ops layer,
// no torch headers, bad scalars are ValueErrors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/registry_bindings.h"
#include "conv/conv.h"

namespace py = pybind11;

namespace {

// y = act(conv2d(x, W) + bias) for a block-sparse flattened W. `kernel` names
// a registry entry, or is empty to let sparsert choose. Returns the kernel used.
std::string conv2d(int64_t out_channels, int block_rows, int block_cols, uintptr_t row_ptr,
                   uintptr_t col_idx, int index_bits, uintptr_t values, uintptr_t x,
                   int64_t batch, int64_t in_channels, int64_t height, int64_t width,
                   int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w,
                   int dilation_h, int dilation_w, int groups, uintptr_t y, uintptr_t bias,
                   int activation, int num_threads, const std::string& kernel) {
  if (index_bits != 16 && index_bits != 32) throw std::invalid_argument("index_bits must be 16 or 32");
  const sparsert::Epilogue epilogue = sparsert::epilogue_from_code(activation, "activation");
  sparsert::ConvShape sh;
  sh.batch = batch;
  sh.in_channels = in_channels;
  sh.height = height;
  sh.width = width;
  sh.out_channels = out_channels;
  sh.kernel_h = kernel_h;
  sh.kernel_w = kernel_w;
  sh.stride_h = stride_h;
  sh.stride_w = stride_w;
  sh.pad_h = pad_h;
  sh.pad_w = pad_w;
  sh.dilation_h = dilation_h;
  sh.dilation_w = dilation_w;
  sh.groups = groups;
  sparsert::BlockSparseMatrix w;
  w.rows = out_channels;
  w.cols = groups > 0 && in_channels % groups == 0 ? sh.patch() : 0;
  w.block_rows = block_rows;
  w.block_cols = block_cols;
  w.row_ptr = reinterpret_cast<const int32_t*>(row_ptr);
  w.col_idx = reinterpret_cast<const void*>(col_idx);
  w.index_bits = index_bits;
  w.values = reinterpret_cast<const float*>(values);
  sparsert::ConvArgs a;
  a.x = reinterpret_cast<const float*>(x);
  a.y = reinterpret_cast<float*>(y);
  a.bias = bias ? reinterpret_cast<const float*>(bias) : nullptr;
  a.epilogue = epilogue;
  a.num_threads = num_threads < 1 ? 1 : num_threads;

  const sparsert::ConvKernelInfo* k;
  if (kernel.empty()) {
    k = sparsert::select_conv_kernel(block_rows, block_cols, sh, sparsert::best_isa());
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
        "raw addresses; returns the kernel used.");
}
