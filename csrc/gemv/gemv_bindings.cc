// The thin binding of the GEMV kernels (gemv/gemv.h): sparsert._C.gemv, gemv_kernels and
// select_gemv_kernel. Tensors arrive as raw addresses with their strides; the Python side
// (sparsert/ops/backends/best_dense.py) checks that they hold what the strides say. Here: sizes
// are non-negative and the strides cover the rows.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/arg_checks.h"
#include "common/isa.h"
#include "common/registry_bindings.h"
#include "gemv/gemv.h"

namespace py = pybind11;

namespace {

std::string gemv(uintptr_t w, int64_t w_stride, uintptr_t x, int64_t x_stride, uintptr_t bias, uintptr_t y,
                 int64_t y_stride, int64_t out_features, int64_t in_features, int64_t rows, int64_t num_threads,
                 const std::string& kernel) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (out_features < 0 || in_features < 0 || rows < 0) fail("sizes must be non-negative");
  if (out_features > 1 && w_stride < in_features) fail("w_stride must cover in_features");
  if (rows > 1 && (x_stride < in_features || y_stride < out_features)) fail("row strides must cover the rows");
  if (rows * out_features > 0 && (w == 0 || x == 0 || y == 0)) fail("null tensor address");
  sparsert::GemvArgs a;
  a.w = reinterpret_cast<const float*>(w);
  a.w_stride = w_stride;
  a.x = reinterpret_cast<const float*>(x);
  a.x_stride = x_stride;
  a.bias = reinterpret_cast<const float*>(bias);
  a.y = reinterpret_cast<float*>(y);
  a.y_stride = y_stride;
  a.out_features = out_features;
  a.in_features = in_features;
  a.rows = rows;
  a.num_threads = sparsert::clamp_threads(num_threads);
  const sparsert::GemvKernelInfo* kern =
      kernel.empty() ? sparsert::select_gemv_kernel(sparsert::best_isa())
                     : &sparsert_bindings::forced_kernel(sparsert::gemv_kernel_registry(), kernel, "gemv kernel");
  if (rows * out_features > 0) {
    py::gil_scoped_release release;
    kern->fn(a);
  }
  return kern->name;
}

}  // namespace

void bind_gemv(py::module_& m) {
  m.def("gemv_kernels", [] { return sparsert_bindings::describe_registry(sparsert::gemv_kernel_registry()); },
        "Every dense GEMV kernel in this build: name, isa, kind, and whether this CPU runs it.");
  m.def("select_gemv_kernel", [](const std::string& isa) {
    const auto* k = sparsert::select_gemv_kernel(isa.empty() ? sparsert::best_isa() : isa);
    return k ? k->name : std::string();
  }, py::arg("isa") = "");
  m.def("gemv", &gemv, py::arg("w"), py::arg("w_stride"), py::arg("x"), py::arg("x_stride"), py::arg("bias"),
        py::arg("y"), py::arg("y_stride"), py::arg("out_features"), py::arg("in_features"), py::arg("rows"),
        py::arg("num_threads"), py::arg("kernel") = "",
        "y = W x + bias per row of x (float32, raw addresses, strides in floats; bias 0 for none). Returns the\n"
        "kernel used.");
}
