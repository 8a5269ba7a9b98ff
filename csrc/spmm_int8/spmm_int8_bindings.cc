// The thin binding of the int8 kernels (spmm_int8/spmm_int8.h):
// sparsert._C.spmm_int8, quantize_rows_s8, select_int8_kernel and int8_kernels.
// Arrays arrive as raw addresses the Python side has validated (row pointer,
// column indices, weights in range); the O(1) facts are checked here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/arg_checks.h"
#include "common/registry_bindings.h"
#include "spmm_int8/spmm_int8.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

// y = act(dequant(quant(x) @ Wq^T) + bias) for int8 1x4 blocks; returns the kernel used.
std::string spmm_int8(int64_t rows, int64_t cols, uintptr_t row_ptr, int64_t row_ptr_len, uintptr_t col_idx,
                      int64_t col_len, int64_t index_bits, uintptr_t values, int64_t values_len, uintptr_t scales,
                      uintptr_t x, int64_t tokens, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride,
                      uintptr_t bias, int64_t activation, int64_t num_threads, const std::string& kernel) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  sparsert::size_in_range("rows", rows, 0, INT32_MAX);
  sparsert::size_in_range("cols", cols, 0, sparsert::kInt8MaxCols);
  sparsert::size_in_range("tokens", tokens, 0, INT64_MAX / 2);
  if (index_bits != 16 && index_bits != 32) fail("index_bits must be 16 or 32; got " + std::to_string(index_bits));
  const sparsert::Epilogue epilogue = sparsert::epilogue_from_code(activation, "activation");
  if (row_ptr_len != rows + 1) fail("row_ptr must have rows + 1 entries");
  sparsert::Int8BlockMatrix w;
  w.rows = rows;
  w.cols = cols;
  if (rows > 0) {
    for (auto [name, address] : {std::pair<const char*, uintptr_t>{"row_ptr", row_ptr}, {"scales", scales}})
      sparsert::require_address(name, address);
    const auto* rp = ptr<const int32_t>(row_ptr);
    if (rp[0] != 0 || rp[rows] < 0 || rp[rows] != col_len) fail("row_ptr must run from 0 to the number of blocks");
    if (values_len != 4 * static_cast<int64_t>(col_len)) fail("values must hold 4 weights per block");
  }
  if (tokens > 0 && rows > 0) {
    sparsert::require_address("x", x);
    sparsert::require_address("y", y);
    if (x_row_stride < cols || y_row_stride < rows) fail("bad row strides");
  }
  w.row_ptr = ptr<const int32_t>(row_ptr);
  w.col_idx = reinterpret_cast<const void*>(col_idx);
  w.index_bits = static_cast<int>(index_bits);
  w.values = ptr<const int8_t>(values);
  w.scales = ptr<const float>(scales);
  sparsert::Int8Output o;
  o.y = ptr<float>(y);
  o.y_row_stride = y_row_stride;
  o.bias = bias ? ptr<const float>(bias) : nullptr;
  o.epilogue = epilogue;
  o.num_threads = sparsert::clamp_threads(num_threads);
  const sparsert::Int8KernelInfo* k =
      kernel.empty() ? sparsert::select_int8_kernel(tokens, sparsert::best_isa())
                     : &sparsert_bindings::forced_kernel(sparsert::int8_kernel_registry(), kernel, "int8 kernel");
  {
    py::gil_scoped_release release;
    sparsert::int8_linear(w, ptr<const float>(x), tokens, x_row_stride, o, k);
  }
  return k->name;
}

}  // namespace

void bind_spmm_int8(py::module_& m) {
  m.def("int8_kernels", [] { return sparsert_bindings::describe_registry(sparsert::int8_kernel_registry()); },
        "Every int8 kernel in this build: name, isa, kind, block, and whether this CPU runs it.");
  m.def("select_int8_kernel", [](int64_t tokens, const std::string& isa) {
    const auto* k = sparsert::select_int8_kernel(tokens, isa.empty() ? sparsert::best_isa() : isa);
    return k ? k->name : std::string();
  }, py::arg("tokens"), py::arg("isa") = "");
  m.def("quantize_rows_s8", [](uintptr_t x, int64_t tokens, int64_t cols, int64_t x_row_stride, uintptr_t q,
                               int64_t q_stride, uintptr_t scales, const std::string& isa) {
    sparsert::size_in_range("tokens", tokens, 0, INT64_MAX / 2);
    sparsert::size_in_range("cols", cols, 0, INT64_MAX / 2);
    if (tokens > 0 && (x_row_stride < cols || q_stride < cols)) throw std::invalid_argument("bad row strides");
    py::gil_scoped_release release;
    sparsert::quantize_rows_s8(ptr<const float>(x), tokens, cols, x_row_stride, ptr<int8_t>(q), q_stride,
                               ptr<float>(scales), 1, isa);
  }, py::arg("x"), py::arg("tokens"), py::arg("cols"), py::arg("x_row_stride"), py::arg("q"), py::arg("q_stride"),
     py::arg("scales"), py::arg("isa") = "", "The kernels' per-token s8 quantisation of x (raw addresses), for tests.");
  m.def("spmm_int8", &spmm_int8, py::arg("rows"), py::arg("cols"), py::arg("row_ptr"), py::arg("row_ptr_len"),
        py::arg("col_idx"), py::arg("col_len"), py::arg("index_bits"), py::arg("values"), py::arg("values_len"),
        py::arg("scales"), py::arg("x"), py::arg("tokens"), py::arg("x_row_stride"), py::arg("y"),
        py::arg("y_row_stride"), py::arg("bias"), py::arg("activation"), py::arg("num_threads"),
        py::arg("kernel") = "",
        "y = act(w_scale * x_scale * (quant(x) @ Wq^T) + bias) for int8 1x4 blocks (raw addresses); "
        "returns the kernel used.");
}
