// The thin binding of the attention kernels (attention/attention.h): sparsert._C.attention,
// attention_kernels and select_attention_kernel. Tensors arrive as raw addresses with their
// strides; the Python side (sparsert/ops/attention.py) checks that they hold what the strides
// say. Here: sizes and strides are consistent (rows do not overlap).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/attention.h"
#include "common/arg_checks.h"
#include "common/isa.h"
#include "common/registry_bindings.h"

namespace py = pybind11;

namespace {

std::string attention(uintptr_t q, uintptr_t k, uintptr_t v, int64_t batch_stride, int64_t row_stride, uintptr_t out,
                      int64_t out_batch_stride, int64_t out_row_stride, uintptr_t key_bias, int64_t batch,
                      int64_t tokens, int64_t heads, int64_t head_dim, double scale, int64_t num_threads,
                      const std::string& kernel) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (batch < 0 || tokens < 0 || heads < 0 || head_dim < 0) fail("sizes must be non-negative");
  const int64_t width = heads * head_dim;
  if (tokens > 1 && (row_stride < width || out_row_stride < width)) fail("row strides must cover heads * head_dim");
  if (batch > 1 && (batch_stride < tokens * row_stride || out_batch_stride < tokens * out_row_stride))
    fail("batch strides must cover tokens rows");
  if (batch * tokens * width > 0 && (q == 0 || k == 0 || v == 0 || out == 0)) fail("null tensor address");
  sparsert::AttentionArgs a;
  a.q = reinterpret_cast<const float*>(q);
  a.k = reinterpret_cast<const float*>(k);
  a.v = reinterpret_cast<const float*>(v);
  a.batch_stride = batch_stride;
  a.row_stride = row_stride;
  a.out = reinterpret_cast<float*>(out);
  a.out_batch_stride = out_batch_stride;
  a.out_row_stride = out_row_stride;
  a.key_bias = reinterpret_cast<const float*>(key_bias);
  a.batch = batch;
  a.tokens = tokens;
  a.heads = heads;
  a.head_dim = head_dim;
  a.scale = static_cast<float>(scale);
  a.num_threads = sparsert::clamp_threads(num_threads);
  const sparsert::AttentionKernelInfo* kern =
      kernel.empty() ? sparsert::select_attention_kernel(sparsert::best_isa())
                     : &sparsert_bindings::forced_kernel(sparsert::attention_kernel_registry(), kernel,
                                                         "attention kernel");
  if (batch * tokens * width > 0) {
    py::gil_scoped_release release;
    kern->fn(a);
  }
  return kern->name;
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention_kernels", [] { return sparsert_bindings::describe_registry(sparsert::attention_kernel_registry()); },
        "Every attention kernel in this build: name, isa, kind, and whether this CPU runs it.");
  m.def("select_attention_kernel", [](const std::string& isa) {
    const auto* k = sparsert::select_attention_kernel(isa.empty() ? sparsert::best_isa() : isa);
    return k ? k->name : std::string();
  }, py::arg("isa") = "");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("batch_stride"),
        py::arg("row_stride"), py::arg("out"), py::arg("out_batch_stride"), py::arg("out_row_stride"),
        py::arg("key_bias"), py::arg("batch"), py::arg("tokens"), py::arg("heads"), py::arg("head_dim"),
        py::arg("scale"), py::arg("num_threads"), py::arg("kernel") = "",
        "out = softmax(q k^T * scale + key_bias) v per (sentence, head), tensors as raw addresses in\n"
        "(batch, token, head, dim) layout with the given strides (floats); key_bias: 0 or batch x tokens\n"
        "floats. Returns the kernel used.");
}
