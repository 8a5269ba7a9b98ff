// pybind11 bindings of the CUDA kernels: the separate module sparsert._C_cuda,
// so the CPU module (and CPU-only users) never load the CUDA runtime. Arrays
// arrive as raw device addresses (tensor.data_ptr()) validated by the Python
// ops layer; the stream is torch's current stream as an integer handle. No
// torch headers are involved. The CUDA runtime is linked statically, so
// importing this module works on a machine without a GPU or driver (calls
// then raise RuntimeError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/arg_checks.h"
#include "cuda/spmm_cuda.h"

namespace py = pybind11;
namespace sc = sparsert::cuda;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

sc::DType to_dtype(int64_t code) {
  if (code < 0 || code > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  return static_cast<sc::DType>(code);
}

const sc::CudaKernelInfo& find_kernel(const std::string& name) {
  for (const auto& k : sc::kernel_registry())
    if (k.name == name) return k;
  throw std::invalid_argument("unknown sparsert CUDA kernel '" + name + "'");
}

// Every integer arrives as int64 and is range-checked here, so a bad one is
// a one-line ValueError naming it (see common/arg_checks.h).
sc::SpmmProblem problem(int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols, uintptr_t row_ptr,
                        uintptr_t col_idx, int64_t index_bits, uintptr_t values, uintptr_t row_order, uintptr_t x,
                        int64_t tokens, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t bias,
                        int64_t activation, int64_t dtype) {
  if (index_bits != 16 && index_bits != 32)
    throw std::invalid_argument("index_bits must be 16 or 32; got " + std::to_string(index_bits));
  sc::SpmmProblem p;
  p.rows = sparsert::size_in_range("rows", rows, 0, INT32_MAX);
  p.cols = sparsert::size_in_range("cols", cols, 0, INT32_MAX);
  sparsert::size_in_range("tokens", tokens, 0, int64_t{1} << 40);
  p.block_rows = sparsert::int_in_range("block_rows", block_rows, 1);
  p.block_cols = sparsert::int_in_range("block_cols", block_cols, 1);
  p.row_ptr = reinterpret_cast<const int32_t*>(row_ptr);
  p.col_idx = reinterpret_cast<const void*>(col_idx);
  p.index_bits = static_cast<int>(index_bits);
  p.values = reinterpret_cast<const void*>(values);
  p.row_order = row_order ? reinterpret_cast<const int32_t*>(row_order) : nullptr;
  p.x = reinterpret_cast<const void*>(x);
  p.tokens = tokens;
  p.x_row_stride = x_row_stride;
  p.y = reinterpret_cast<void*>(y);
  p.y_row_stride = y_row_stride;
  p.bias = bias ? reinterpret_cast<const float*>(bias) : nullptr;
  p.epilogue = sparsert::epilogue_from_code(activation, "activation");
  p.dtype = to_dtype(dtype);
  return p;
}

// y = act(x @ W^T + bias) on `stream` of `device`; `kernel` names a registry
// entry or is empty to let sparsert choose. Returns the kernel's name.
std::string spmm(int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols, uintptr_t row_ptr,
                 uintptr_t col_idx, int64_t index_bits, uintptr_t values, uintptr_t row_order, uintptr_t x,
                 int64_t tokens, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t bias,
                 int64_t activation, int64_t dtype, int64_t device_arg, uintptr_t stream, const std::string& kernel) {
  const int device = sparsert::int_in_range("device", device_arg, 0);
  if (rows > 0 && tokens > 0) {
    // A null device address would fault the kernel and poison the CUDA context.
    sparsert::require_address("row_ptr", row_ptr);
    sparsert::require_address("x", x);
    sparsert::require_address("y", y);
  }
  const sc::SpmmProblem p = problem(rows, cols, block_rows, block_cols, row_ptr, col_idx, index_bits, values,
                                    row_order, x, tokens, x_row_stride, y, y_row_stride, bias, activation, dtype);
  const sc::CudaKernelInfo* k = kernel.empty() ? nullptr : &find_kernel(kernel);
  check(cudaSetDevice(device), "cudaSetDevice");
  if (k == nullptr) {
    k = sc::select_kernel(p, device);
  } else {
    const std::string why = sc::check_kernel(*k, p, device);
    if (!why.empty()) throw std::invalid_argument("kernel '" + kernel + "' cannot run this problem: " + why);
  }
  if (k == nullptr) throw std::invalid_argument("no CUDA kernel for this problem");
  {
    py::gil_scoped_release release;
    check(sc::launch(*k, p, reinterpret_cast<cudaStream_t>(stream)), k->name.c_str());
  }
  return k->name;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "sparsert CUDA kernels (torch-free)";
  m.def("kernels", [] {
    py::list out;
    for (const auto& k : sc::kernel_registry()) {
      py::dict d;
      d["name"] = k.name;
      d["kind"] = k.kind;
      d["dtype"] = sc::dtype_name(k.dtype);
      d["block"] = py::make_tuple(k.block_rows, k.block_cols);
      d["token_tile"] = k.token_tile;
      out.append(d);
    }
    return out;
  }, "Every CUDA kernel in this build: name, kind, dtype, block (0, 0 = any) and token tile.");
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  }, "CUDA devices this module's runtime sees (0 without a GPU or driver).");
  m.def("select_kernel", [](int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols, int64_t index_bits,
                            int64_t tokens, int64_t dtype, uintptr_t values, uintptr_t x, int64_t x_row_stride,
                            int64_t device) {
    sc::SpmmProblem p = problem(rows, cols, block_rows, block_cols, 0, 0, index_bits, values, 0, x, tokens,
                                x_row_stride, 0, 0, 0, 0, dtype);
    const auto* k = sc::select_kernel(p, sparsert::int_in_range("device", device, 0));
    return k ? k->name : std::string();
  }, py::arg("rows"), py::arg("cols"), py::arg("block_rows"), py::arg("block_cols"), py::arg("index_bits"),
     py::arg("tokens"), py::arg("dtype"), py::arg("values") = 0, py::arg("x") = 0, py::arg("x_row_stride") = 0,
     py::arg("device") = 0, "The kernel spmm() would pick for this problem.");
  m.def("spmm", &spmm, py::arg("rows"), py::arg("cols"), py::arg("block_rows"), py::arg("block_cols"),
        py::arg("row_ptr"), py::arg("col_idx"), py::arg("index_bits"), py::arg("values"), py::arg("row_order"),
        py::arg("x"), py::arg("tokens"), py::arg("x_row_stride"), py::arg("y"), py::arg("y_row_stride"),
        py::arg("bias"), py::arg("activation"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        py::arg("kernel") = "",
        "y = act(x @ W^T + bias) for block-sparse W given as raw device addresses, launched on `stream`; "
        "returns the kernel used.");
}
