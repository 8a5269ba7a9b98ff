// The thin binding of the row-group kernels (spmm_rowgroup/spmm_rowgroup.h):
// sparsert._C.spmm_rowgroup, select_rowgroup_kernel and rowgroup_kernels.
// Arrays arrive as raw addresses the Python side has validated (columns in
// range, segments non-decreasing) together with the value offsets it derived
// from them; the facts that are O(1) here (lengths, the ends of seg_ptr and of
// the offsets) are checked again. A call without offsets (0) is checked in full.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/registry_bindings.h"
#include "spmm/spmm_bindings.h"
#include "spmm_rowgroup/spmm_rowgroup.h"

namespace py = pybind11;

namespace {

using sparsert_bindings::ptr;

std::string spmm_rowgroup(int64_t rows, int64_t cols, uintptr_t seg_ptr, int64_t seg_ptr_len, uintptr_t columns,
                          int64_t columns_len, uintptr_t values, int64_t values_len, uintptr_t value_offsets,
                          int64_t value_offsets_len, uintptr_t x, int64_t tokens, int64_t x_row_stride, uintptr_t y,
                          int64_t y_row_stride, uintptr_t bias, int activation, int64_t num_threads,
                          const std::string& kernel) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (rows < 0 || cols < 0 || tokens < 0) fail("sizes must be non-negative");
  const sparsert::Epilogue epilogue = sparsert::epilogue_from_code(activation, "activation");
  sparsert::RowGroupMatrix w;
  w.rows = rows;
  w.cols = cols;
  // kblocks follows from the length: kblocks * ceil(rows / 4) * 15 + 1 entries.
  const int64_t per_block = w.group_count() * sparsert::kRowGroupPatterns;
  if (per_block == 0 ? seg_ptr_len != 1 : (seg_ptr_len < per_block + 1 || (seg_ptr_len - 1) % per_block != 0))
    fail("seg_ptr must have kblocks * ceil(rows / 4) * 15 + 1 entries");
  w.kblocks = per_block == 0 ? 1 : (seg_ptr_len - 1) / per_block;
  const auto* segments = ptr<const int32_t>(seg_ptr);
  if (segments[0] != 0 || segments[seg_ptr_len - 1] != columns_len)
    fail("seg_ptr must start at 0 and end at the number of columns");
  w.seg_ptr = segments;
  w.columns = ptr<const int32_t>(columns);
  w.values = ptr<const float>(values);
  const int64_t units = w.kblocks * w.group_count();
  std::vector<int64_t> derived_offsets;  // (without the caller's: derived here, once, for the kernel too)
  if (value_offsets != 0) {
    // Derived from seg_ptr by the caller with the arrays it validated (the contents are trusted,
    // as a row pointer's are: an O(segments) pass per call cost 16 us at 3072 x 768 in K-blocks
    // of 384, 108 us at 4096 x 4096); the ends are checked.
    const auto* offsets = ptr<const int64_t>(value_offsets);
    if (value_offsets_len != units + 1 || offsets[0] != 0 || offsets[units] != values_len)
      fail("value_offsets must hold kblocks * ceil(rows / 4) + 1 entries from 0 to the number of values");
    w.value_offsets = offsets;
  } else {
    for (int64_t s = 0; s + 1 < seg_ptr_len; ++s)
      if (segments[s + 1] < segments[s]) fail("seg_ptr must be non-decreasing");
    sparsert::rowgroup_value_offsets(w, derived_offsets);
    if (derived_offsets.back() != values_len)
      fail("values must hold " + std::to_string(derived_offsets.back()) + " entries, got " +
           std::to_string(values_len));
    w.value_offsets = derived_offsets.data();
  }
  if (tokens > 0 && (x_row_stride < cols || y_row_stride < rows)) fail("bad row strides");
  const sparsert::SpmmArgs a =
      sparsert_bindings::spmm_args(x, tokens, x_row_stride, y, y_row_stride, bias, epilogue, num_threads);
  const sparsert::RowGroupKernelInfo* k =
      kernel.empty() ? sparsert::select_rowgroup_kernel(tokens, sparsert::best_isa())
                     : &sparsert_bindings::forced_kernel(sparsert::rowgroup_kernel_registry(), kernel,
                                                         "row-group kernel");
  if (tokens > 0 && rows > 0) {
    py::gil_scoped_release release;
    k->fn(w, a);
  }
  return k->name;
}

}  // namespace

void bind_spmm_rowgroup(py::module_& m) {
  m.def("rowgroup_kernels", [] { return sparsert_bindings::describe_registry(sparsert::rowgroup_kernel_registry()); },
        "Every row-group kernel in this build: name, isa, kind, group, and whether this CPU runs it.");
  m.def("select_rowgroup_kernel", [](int64_t tokens, const std::string& isa) {
    const auto* k = sparsert::select_rowgroup_kernel(tokens, isa.empty() ? sparsert::best_isa() : isa);
    return k ? k->name : std::string();
  }, py::arg("tokens"), py::arg("isa") = "");
  m.def("spmm_rowgroup", &spmm_rowgroup, py::arg("rows"), py::arg("cols"), py::arg("seg_ptr"),
        py::arg("seg_ptr_len"), py::arg("columns"), py::arg("columns_len"), py::arg("values"),
        py::arg("values_len"), py::arg("value_offsets"), py::arg("value_offsets_len"), py::arg("x"), py::arg("tokens"), py::arg("x_row_stride"), py::arg("y"),
        py::arg("y_row_stride"), py::arg("bias"), py::arg("activation"), py::arg("num_threads"),
        py::arg("kernel") = "",
        "y = act(x @ W^T + bias) for a row-group W given as raw addresses (value_offsets: 0, or the\n"
        "values before each unit, kblocks * groups + 1 int64, derived from the validated seg_ptr);\n"
        "returns the kernel used.");
}
