// The thin binding of the bitmask spmm kernels (spmm/spmm_bitmask.h): sparsert._C.spmm_bitmask,
// select_bitmask_kernel and bitmask_kernels. Arrays
// arrive as raw addresses the Python side has validated; the O(1) facts
// (lengths, the ends of the row offsets) are checked here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/registry_bindings.h"
#include "spmm/spmm_bindings.h"
#include "spmm/spmm_bitmask.h"

namespace py = pybind11;

namespace {

using sparsert_bindings::ptr;

// y = act(x @ W^T + bias) for a bitmask W; returns the kernel used. `kernel`
// names a registry entry, or is empty to let sparsert choose.
std::string spmm_bitmask(int64_t rows, int64_t cols, uintptr_t masks, int64_t masks_len,
                         uintptr_t row_offsets, int64_t row_offsets_len, uintptr_t values,
                         int64_t values_len, uintptr_t x, int64_t tokens, int64_t x_row_stride,
                         uintptr_t y, int64_t y_row_stride, uintptr_t bias, int activation,
                         int64_t num_threads, const std::string& kernel) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (rows < 0 || cols < 0 || tokens < 0) fail("sizes must be non-negative");
  const sparsert::Epilogue epilogue = sparsert::epilogue_from_code(activation, "activation");
  sparsert::BitmaskMatrix w;
  w.rows = rows;
  w.cols = cols;
  if (masks_len != rows * w.group_count())
    fail("masks has " + std::to_string(masks_len) + " entries, expected " + std::to_string(rows * w.group_count()));
  if (row_offsets_len != rows + 1) fail("row_offsets must have rows + 1 entries");
  const auto* offsets = ptr<const int64_t>(row_offsets);
  if (offsets[0] != 0 || offsets[rows] < 0) fail("row_offsets must start at 0 and end at the number of values");
  if (values_len != offsets[rows] + sparsert::kBitmaskValuePadding)
    fail("values must hold the stored values plus " + std::to_string(sparsert::kBitmaskValuePadding) +
         " padding floats");
  if (tokens > 0 && (x_row_stride < cols || y_row_stride < rows)) fail("bad row strides");
  w.masks = ptr<const uint16_t>(masks);
  w.row_offsets = offsets;
  w.values = ptr<const float>(values);
  const sparsert::SpmmArgs a =
      sparsert_bindings::spmm_args(x, tokens, x_row_stride, y, y_row_stride, bias, epilogue, num_threads);
  const sparsert::BitmaskKernelInfo* k =
      kernel.empty() ? sparsert::select_bitmask_kernel(tokens, sparsert::best_isa())
                     : &sparsert_bindings::forced_kernel(sparsert::bitmask_kernel_registry(), kernel, "bitmask kernel");
  if (tokens > 0 && rows > 0) {
    py::gil_scoped_release release;
    k->fn(w, a);
  }
  return k->name;
}

}  // namespace

void bind_spmm_bitmask(py::module_& m) {
  m.def("bitmask_kernels", [] { return sparsert_bindings::describe_registry(sparsert::bitmask_kernel_registry()); },
        "Every bitmask kernel in this build: name, isa, kind, group, and whether this CPU runs it.");
  m.def("select_bitmask_kernel", [](int64_t tokens, const std::string& isa) {
    const auto* k = sparsert::select_bitmask_kernel(tokens, isa.empty() ? sparsert::best_isa() : isa);
    return k ? k->name : std::string();
  }, py::arg("tokens"), py::arg("isa") = "");
  m.def("spmm_bitmask", &spmm_bitmask, py::arg("rows"), py::arg("cols"), py::arg("masks"),
        py::arg("masks_len"), py::arg("row_offsets"), py::arg("row_offsets_len"), py::arg("values"),
        py::arg("values_len"), py::arg("x"), py::arg("tokens"), py::arg("x_row_stride"), py::arg("y"),
        py::arg("y_row_stride"), py::arg("bias"), py::arg("activation"), py::arg("num_threads"),
        py::arg("kernel") = "",
        "y = act(x @ W^T + bias) for a bitmask W given as raw addresses; returns the kernel used.");
}
