// Python binding of the spmm kernels: sparsert._C.spmm, select_kernel and
// kernels (the module itself is declared in common/module.cc). The rules of
// every binding of _C: arrays arrive as raw addresses (tensor.data_ptr())
// that the Python ops layer has validated; no torch headers are involved, so
// the extension works with any torch; every bad scalar is a
// std::invalid_argument (a ValueError in Python).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <climits>
#include <stdexcept>
#include <string>

#include "common/arg_checks.h"
#include "common/registry_bindings.h"
#include "spmm/spmm.h"
#include "spmm/spmm_bindings.h"

namespace py = pybind11;

namespace {

using sparsert_bindings::ptr;

// y = act(x @ W^T + bias) for a block-sparse W. `kernel` names a registry
// entry, or is empty to let sparsert choose for this CPU and token count.
//
// The *_len arguments are the element counts of the buffers; they and the
// ends of the row pointer are checked here (O(1)). The contents of the row
// pointer and the column indices are trusted: the Python caller validates
// them in full once per tensor version (sparsert/ops/_checks.py), since an
// O(rows) or O(nnz) check per call would cost more than a small layer.
std::string spmm(int64_t rows, int64_t cols, int64_t block_rows_arg, int64_t block_cols_arg,
                 uintptr_t row_ptr, int64_t row_ptr_len, uintptr_t col_idx, int64_t col_len,
                 int64_t index_bits, uintptr_t values, int64_t values_len,
                 uintptr_t x, int64_t tokens, int64_t x_row_stride, uintptr_t y,
                 int64_t y_row_stride, uintptr_t bias, int64_t activation, int64_t num_threads,
                 const std::string& kernel) {
  using sparsert::size_in_range;
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (index_bits != 16 && index_bits != 32) fail("index_bits must be 16 or 32; got " + std::to_string(index_bits));
  const sparsert::Epilogue epilogue = sparsert::epilogue_from_code(activation, "activation");
  // Rows and columns are indexed by int32 row pointers and column indices.
  size_in_range("rows", rows, 0, INT32_MAX);
  size_in_range("cols", cols, 0, INT32_MAX);
  size_in_range("tokens", tokens, 0, int64_t{1} << 40);
  const int block_rows = sparsert::int_in_range("block_rows", block_rows_arg, 1);
  const int block_cols = sparsert::int_in_range("block_cols", block_cols_arg, 1);
  sparsert::require_address("row_ptr", row_ptr);
  const int64_t block_row_count = (rows + block_rows - 1) / block_rows;
  if (row_ptr_len != block_row_count + 1)
    fail("row_ptr has " + std::to_string(row_ptr_len) + " entries, expected " + std::to_string(block_row_count + 1));
  const auto* rp = ptr<const int32_t>(row_ptr);
  if (rp[0] != 0 || rp[block_row_count] != col_len) fail("row_ptr must start at 0 and end at the number of blocks");
  if (values_len != sparsert::checked_mul(col_len, int64_t{block_rows} * block_cols, "the values size"))
    fail("values size does not match the number of blocks");
  if (col_len > 0) {
    sparsert::require_address("col_idx", col_idx);
    sparsert::require_address("values", values);
  }
  if (tokens > 0 && rows > 0) {
    if (x_row_stride < 0) fail("x_row_stride must be >= 0; got " + std::to_string(x_row_stride));
    if (y_row_stride < rows) fail("y_row_stride must be >= rows; got " + std::to_string(y_row_stride));
    sparsert::require_address("x", x);
    sparsert::require_address("y", y);
  }
  sparsert::BlockSparseMatrix w;
  w.rows = rows;
  w.cols = cols;
  w.block_rows = block_rows;
  w.block_cols = block_cols;
  w.row_ptr = ptr<const int32_t>(row_ptr);
  w.col_idx = ptr<const void>(col_idx);
  w.index_bits = index_bits;
  w.values = ptr<const float>(values);
  const sparsert::SpmmArgs a =
      sparsert_bindings::spmm_args(x, tokens, x_row_stride, y, y_row_stride, bias, epilogue, num_threads);

  const sparsert::KernelInfo* k;
  if (kernel.empty()) {
    k = sparsert::select_kernel(block_rows, block_cols, tokens, sparsert::best_isa());
  } else {
    k = &sparsert_bindings::forced_kernel(sparsert::kernel_registry(), kernel, "kernel");
    if (k->block_rows != 0 && (k->block_rows != block_rows || k->block_cols != block_cols))
      throw std::invalid_argument("kernel '" + kernel + "' does not handle " +
                                  std::to_string(block_rows) + "x" + std::to_string(block_cols) + " blocks");
  }
  if (tokens > 0 && rows > 0) {
    py::gil_scoped_release release;
    k->fn(w, a);
  }
  return k->name;
}

}  // namespace

void bind_spmm(py::module_& m) {
  m.def("kernels", [] { return sparsert_bindings::describe_registry(sparsert::kernel_registry()); },
        "Every spmm kernel in this build: name, isa, kind, block tile, and whether this CPU runs it.");
  m.def("select_kernel", [](int64_t r, int64_t c, int64_t tokens, const std::string& isa) {
    const auto* k = sparsert::select_kernel(sparsert::int_in_range("block_rows", r, 1),
                                            sparsert::int_in_range("block_cols", c, 1), tokens,
                                            isa.empty() ? sparsert::best_isa() : isa);
    return k ? k->name : std::string();
  }, py::arg("block_rows"), py::arg("block_cols"), py::arg("tokens"), py::arg("isa") = "");
  m.def("spmm", &spmm, py::arg("rows"), py::arg("cols"), py::arg("block_rows"),
        py::arg("block_cols"), py::arg("row_ptr"), py::arg("row_ptr_len"), py::arg("col_idx"),
        py::arg("col_len"), py::arg("index_bits"), py::arg("values"), py::arg("values_len"), py::arg("x"), py::arg("tokens"), py::arg("x_row_stride"),
        py::arg("y"), py::arg("y_row_stride"), py::arg("bias"), py::arg("activation"),
        py::arg("num_threads"), py::arg("kernel") = "",
        "y = act(x @ W^T + bias) for block-sparse W given as raw addresses; returns the kernel used. "
        "num_threads is clamped to [1, 1024].");
}
