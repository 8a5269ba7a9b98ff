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

// The int8 1x4 matrix of the raw arrays (validated by the Python side; O(1) facts here).
sparsert::Int8BlockMatrix block_matrix(int64_t rows, int64_t cols, uintptr_t row_ptr, int64_t row_ptr_len,
                                       uintptr_t col_idx, int64_t col_len, int64_t index_bits, uintptr_t values,
                                       int64_t values_len) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  sparsert::size_in_range("rows", rows, 0, INT32_MAX);
  sparsert::size_in_range("cols", cols, 0, sparsert::kInt8MaxCols);
  if (index_bits != 16 && index_bits != 32) fail("index_bits must be 16 or 32; got " + std::to_string(index_bits));
  if (row_ptr_len != rows + 1) fail("row_ptr must have rows + 1 entries");
  if (rows > 0) {
    sparsert::require_address("row_ptr", row_ptr);
    const auto* rp = ptr<const int32_t>(row_ptr);
    if (rp[0] != 0 || rp[rows] < 0 || rp[rows] != col_len) fail("row_ptr must run from 0 to the number of blocks");
    if (values_len != 4 * static_cast<int64_t>(col_len)) fail("values must hold 4 weights per block");
  }
  sparsert::Int8BlockMatrix w;
  w.rows = rows;
  w.cols = cols;
  w.row_ptr = ptr<const int32_t>(row_ptr);
  w.col_idx = reinterpret_cast<const void*>(col_idx);
  w.index_bits = static_cast<int>(index_bits);
  w.values = ptr<const int8_t>(values);
  return w;
}

// The output side of one call, every kernel alike: x and y addresses and strides, bias, epilogue, threads.
sparsert::Int8Output token_rows_output(int64_t rows, int64_t cols, uintptr_t x, int64_t tokens, int64_t x_row_stride,
                                       uintptr_t y, int64_t y_row_stride, uintptr_t bias, int64_t activation,
                                       int64_t num_threads) {
  sparsert::size_in_range("tokens", tokens, 0, INT64_MAX / 2);
  const sparsert::Epilogue epilogue = sparsert::epilogue_from_code(activation, "activation");
  if (tokens > 0 && rows > 0) {
    sparsert::require_address("x", x);
    sparsert::require_address("y", y);
    if (x_row_stride < cols || y_row_stride < rows) throw std::invalid_argument("bad row strides");
  }
  sparsert::Int8Output o;
  o.y = ptr<float>(y);
  o.y_row_stride = y_row_stride;
  o.bias = bias ? ptr<const float>(bias) : nullptr;
  o.epilogue = epilogue;
  o.num_threads = sparsert::clamp_threads(num_threads);
  return o;
}

// y = act(dequant(quant(x) @ Wq^T) + bias) for int8 1x4 blocks; returns the kernel used.
std::string spmm_int8(int64_t rows, int64_t cols, uintptr_t row_ptr, int64_t row_ptr_len, uintptr_t col_idx,
                      int64_t col_len, int64_t index_bits, uintptr_t values, int64_t values_len, uintptr_t scales,
                      uintptr_t x, int64_t tokens, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride,
                      uintptr_t bias, int64_t activation, int64_t num_threads, const std::string& kernel) {
  sparsert::Int8BlockMatrix w =
      block_matrix(rows, cols, row_ptr, row_ptr_len, col_idx, col_len, index_bits, values, values_len);
  if (rows > 0) sparsert::require_address("scales", scales);
  w.scales = ptr<const float>(scales);
  const sparsert::Int8Output o =
      token_rows_output(rows, cols, x, tokens, x_row_stride, y, y_row_stride, bias, activation, num_threads);
  const sparsert::Int8KernelInfo* k =
      kernel.empty() ? sparsert::select_int8_kernel(tokens, sparsert::best_isa())
                     : &sparsert_bindings::forced_kernel(sparsert::int8_kernel_registry(), kernel, "int8 kernel");
  {
    py::gil_scoped_release release;
    sparsert::int8_linear(w, ptr<const float>(x), tokens, x_row_stride, o, k);
  }
  return k->name;
}

// The lanes layout's shape; step_ptr (at `step_ptr`, `step_ptr_len` entries) must fit it.
sparsert::Int8LaneMatrix lane_shape(int64_t rows, int64_t cols, uintptr_t step_ptr, int64_t step_ptr_len) {
  sparsert::Int8LaneMatrix w;
  w.rows = rows;
  w.cols = cols;
  if (step_ptr_len != w.groups() * w.chunks() + 1)
    throw std::invalid_argument("step_ptr must have groups * chunks + 1 entries");
  sparsert::require_address("step_ptr", step_ptr);
  w.step_ptr = ptr<const int32_t>(step_ptr);
  return w;
}

// The checks every call of a layout kernel (lanes, groups) starts with: sizes, a forced
// kernel's name, the CPU.
void check_layout_call(const char* layout, const char* name, bool supported, int64_t rows, int64_t cols,
                       const std::string& kernel) {
  sparsert::size_in_range("rows", rows, 0, INT32_MAX);
  sparsert::size_in_range("cols", cols, 0, sparsert::kInt8MaxCols);
  if (!kernel.empty() && kernel != name)
    throw std::invalid_argument(std::string("unknown int8 ") + layout + " kernel '" + kernel + "'");
  if (!supported) throw std::invalid_argument(std::string("the int8 ") + layout + " kernel needs a CPU with AVX-512 VNNI");
}

// Runs a layout kernel's whole Linear without the GIL; returns the kernel's name.
template <typename Matrix>
std::string run_layout(void (*linear)(const Matrix&, const float*, int64_t, int64_t, const sparsert::Int8Output&),
                       const char* name, const Matrix& w, uintptr_t x, int64_t tokens, int64_t x_row_stride,
                       const sparsert::Int8Output& o) {
  {
    py::gil_scoped_release release;
    linear(w, ptr<const float>(x), tokens, x_row_stride, o);
  }
  return name;
}

// y = act(dequant(quant(x) @ Wq^T) + bias) from the lanes layout; returns the kernel's name.
std::string spmm_int8_lanes(int64_t rows, int64_t cols, uintptr_t step_ptr, int64_t step_ptr_len, uintptr_t lane_cols,
                            uintptr_t lane_w, int64_t steps, uintptr_t scales, uintptr_t x, int64_t tokens,
                            int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t bias,
                            int64_t activation, int64_t num_threads, const std::string& kernel) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  check_layout_call("lanes", "s8_lanes16_avx512vnni", sparsert::int8_lanes_supported(), rows, cols, kernel);
  sparsert::Int8LaneMatrix w = lane_shape(rows, cols, step_ptr, step_ptr_len);
  if (w.step_ptr[0] != 0 || w.step_ptr[step_ptr_len - 1] != steps)
    fail("step_ptr must run from 0 to the number of steps");
  if (rows > 0) sparsert::require_address("scales", scales);
  const sparsert::Int8Output o =
      token_rows_output(rows, cols, x, tokens, x_row_stride, y, y_row_stride, bias, activation, num_threads);
  w.lane_cols = ptr<const uint8_t>(lane_cols);
  w.lane_w = ptr<const int8_t>(lane_w);
  w.scales = ptr<const float>(scales);
  return run_layout(&sparsert::int8_lanes_linear, "s8_lanes16_avx512vnni", w, x, tokens, x_row_stride, o);
}

// y = act(dequant(quant(x) @ Wq^T) + bias) from the groups layout (built by sparsert/ops/quantized.py
// from validated 1x4 arrays; the O(1) facts are checked here); returns the kernel's name.
std::string spmm_int8_groups(int64_t rows, int64_t cols, uintptr_t seg_ptr, int64_t seg_ptr_len, uintptr_t columns,
                             int64_t columns_len, uintptr_t blocks, int64_t blocks_len, uintptr_t group_ptr,
                             int64_t group_ptr_len, uintptr_t row_offsets, uintptr_t scales, uintptr_t x,
                             int64_t tokens, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t bias,
                             int64_t activation, int64_t num_threads, const std::string& kernel) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  check_layout_call("groups", "s8_groups4_avx512vnni", sparsert::int8_groups_supported(), rows, cols, kernel);
  sparsert::Int8GroupMatrix w;
  w.rows = rows;
  w.cols = cols;
  if (seg_ptr_len != w.groups() * sparsert::kRowGroupPatterns + 1) fail("seg_ptr must have groups * 15 + 1 entries");
  if (group_ptr_len != w.groups() + 1) fail("group_ptr must have groups + 1 entries");
  sparsert::require_address("seg_ptr", seg_ptr);
  sparsert::require_address("group_ptr", group_ptr);
  w.seg_ptr = ptr<const int32_t>(seg_ptr);
  w.group_ptr = ptr<const int32_t>(group_ptr);
  if (w.seg_ptr[0] != 0 || w.seg_ptr[seg_ptr_len - 1] != columns_len) fail("seg_ptr must run from 0 to the columns");
  if (w.group_ptr[0] != 0 || w.group_ptr[group_ptr_len - 1] != blocks_len) fail("group_ptr must run from 0 to the blocks");
  if (rows > 0) {
    sparsert::require_address("row_offsets", row_offsets);
    sparsert::require_address("scales", scales);
  }
  const sparsert::Int8Output o =
      token_rows_output(rows, cols, x, tokens, x_row_stride, y, y_row_stride, bias, activation, num_threads);
  w.columns = ptr<const int32_t>(columns);
  w.blocks = ptr<const int32_t>(blocks);
  w.row_offsets = ptr<const int32_t>(row_offsets);
  w.scales = ptr<const float>(scales);
  return run_layout(&sparsert::int8_groups_linear, "s8_groups4_avx512vnni", w, x, tokens, x_row_stride, o);
}

}  // namespace

void bind_spmm_int8(py::module_& m) {
  m.def("int8_lanes_supported", &sparsert::int8_lanes_supported, "True when this CPU runs the int8 lanes kernel.");
  m.def("int8_lanes_max_tokens", &sparsert::int8_lanes_max_tokens,
        "Up to this many tokens the int8 op takes the lanes kernel (where supported).");
  m.def("int8_lanes_groups_chunks", [](int64_t rows, int64_t cols) {
    sparsert::size_in_range("rows", rows, 0, INT32_MAX);
    sparsert::size_in_range("cols", cols, 0, sparsert::kInt8MaxCols);
    sparsert::Int8LaneMatrix w;
    w.rows = rows;
    w.cols = cols;
    return py::make_tuple(w.groups(), w.chunks());
  }, py::arg("rows"), py::arg("cols"));
  m.def("int8_lanes_plan", [](int64_t rows, int64_t cols, uintptr_t row_ptr, int64_t row_ptr_len, uintptr_t col_idx,
                              int64_t col_len, int64_t index_bits, uintptr_t values, int64_t values_len,
                              uintptr_t step_ptr, int64_t step_ptr_len) {
    const auto w = block_matrix(rows, cols, row_ptr, row_ptr_len, col_idx, col_len, index_bits, values, values_len);
    lane_shape(rows, cols, step_ptr, step_ptr_len);
    py::gil_scoped_release release;
    return sparsert::int8_lanes_plan(w, ptr<int32_t>(step_ptr));
  }, "Fills the lanes layout's step_ptr from validated 1x4 arrays (raw addresses); returns the steps.");
  m.def("int8_lanes_fill", [](int64_t rows, int64_t cols, uintptr_t row_ptr, int64_t row_ptr_len, uintptr_t col_idx,
                              int64_t col_len, int64_t index_bits, uintptr_t values, int64_t values_len,
                              uintptr_t step_ptr, int64_t step_ptr_len, uintptr_t lane_cols, int64_t lane_cols_len,
                              uintptr_t lane_w, int64_t lane_w_len) {
    const auto w = block_matrix(rows, cols, row_ptr, row_ptr_len, col_idx, col_len, index_bits, values, values_len);
    const int64_t steps = lane_shape(rows, cols, step_ptr, step_ptr_len).step_ptr[step_ptr_len - 1];
    if (lane_cols_len != 16 * steps || lane_w_len != 64 * steps)
      throw std::invalid_argument("lane_cols and lane_w must hold 16 and 64 bytes per step");
    py::gil_scoped_release release;
    sparsert::int8_lanes_fill(w, ptr<const int32_t>(step_ptr), ptr<uint8_t>(lane_cols), ptr<int8_t>(lane_w));
  }, "Writes the lanes layout's zeroed lane_cols and lane_w (raw addresses).");
  m.def("int8_groups_supported", &sparsert::int8_groups_supported, "True when this CPU runs the int8 groups kernel.");
  m.def("spmm_int8_groups", &spmm_int8_groups, py::arg("rows"), py::arg("cols"), py::arg("seg_ptr"),
        py::arg("seg_ptr_len"), py::arg("columns"), py::arg("columns_len"), py::arg("blocks"), py::arg("blocks_len"),
        py::arg("group_ptr"), py::arg("group_ptr_len"), py::arg("row_offsets"), py::arg("scales"), py::arg("x"),
        py::arg("tokens"), py::arg("x_row_stride"), py::arg("y"), py::arg("y_row_stride"), py::arg("bias"),
        py::arg("activation"), py::arg("num_threads"), py::arg("kernel") = "",
        "y = act(w_scale * x_scale * (quant(x) @ Wq^T) + bias) from the int8 groups layout (raw addresses).");
  m.def("spmm_int8_lanes", &spmm_int8_lanes, py::arg("rows"), py::arg("cols"), py::arg("step_ptr"),
        py::arg("step_ptr_len"), py::arg("lane_cols"), py::arg("lane_w"), py::arg("steps"), py::arg("scales"),
        py::arg("x"), py::arg("tokens"), py::arg("x_row_stride"), py::arg("y"), py::arg("y_row_stride"),
        py::arg("bias"), py::arg("activation"), py::arg("num_threads"), py::arg("kernel") = "",
        "y = act(w_scale * x_scale * (quant(x) @ Wq^T) + bias) from the int8 lanes layout (raw addresses).");
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
