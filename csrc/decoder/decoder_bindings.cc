// The thin binding of the decoder ops (decoder/decoder.h): sparsert._C.rms_norm, swiglu,
// cached_attention, decoder_kernels and select_decoder_kernel. Tensors arrive as raw addresses
// with their strides; the Python side (sparsert/ops/decoder.py) checks that they hold what the
// strides say. Here: sizes are non-negative and consistent with the strides.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/arg_checks.h"
#include "common/isa.h"
#include "common/registry_bindings.h"
#include "decoder/decoder.h"

namespace py = pybind11;

namespace {

void fail(const std::string& what) { throw std::invalid_argument(what); }

const sparsert::DecoderKernelInfo& kernel_for(const std::string& kernel) {
  if (kernel.empty()) return *sparsert::select_decoder_kernel(sparsert::best_isa());
  return sparsert_bindings::forced_kernel(sparsert::decoder_kernel_registry(), kernel, "decoder kernel");
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

std::string rms_norm(uintptr_t x, int64_t x_stride, uintptr_t add, int64_t add_stride, uintptr_t weight, double eps,
                     uintptr_t out, int64_t out_stride, int64_t rows, int64_t width, int64_t num_threads,
                     const std::string& kernel) {
  if (rows < 0 || width < 0) fail("sizes must be non-negative");
  if (rows > 1 && (x_stride < width || out_stride < width || (add != 0 && add_stride < width)))
    fail("row strides must cover the width");
  if (rows * width > 0 && (x == 0 || weight == 0 || out == 0)) fail("null tensor address");
  sparsert::RmsNormArgs a;
  a.x = ptr<float>(x);
  a.x_stride = x_stride;
  a.add = ptr<const float>(add);
  a.add_stride = add_stride;
  a.weight = ptr<const float>(weight);
  a.eps = static_cast<float>(eps);
  a.out = ptr<float>(out);
  a.out_stride = out_stride;
  a.rows = rows;
  a.width = width;
  a.num_threads = sparsert::clamp_threads(num_threads);
  const auto& k = kernel_for(kernel);
  if (rows * width > 0) {
    py::gil_scoped_release release;
    k.rms_norm(a);
  }
  return k.name;
}

std::string swiglu(uintptr_t gate_up, int64_t in_stride, uintptr_t out, int64_t out_stride, int64_t rows, int64_t width,
                   int64_t num_threads, const std::string& kernel) {
  if (rows < 0 || width < 0) fail("sizes must be non-negative");
  if (rows > 1 && (in_stride < 2 * width || out_stride < width)) fail("row strides must cover the width");
  if (rows * width > 0 && (gate_up == 0 || out == 0)) fail("null tensor address");
  sparsert::SwigluArgs a;
  a.gate_up = ptr<const float>(gate_up);
  a.in_stride = in_stride;
  a.out = ptr<float>(out);
  a.out_stride = out_stride;
  a.rows = rows;
  a.width = width;
  a.num_threads = sparsert::clamp_threads(num_threads);
  const auto& k = kernel_for(kernel);
  if (rows * width > 0) {
    py::gil_scoped_release release;
    k.swiglu(a);
  }
  return k.name;
}

std::string cached_attention(uintptr_t qkv, int64_t qkv_stride, uintptr_t cos, uintptr_t sin, uintptr_t k_cache,
                             uintptr_t v_cache, int64_t cache_batch_stride, int64_t cache_head_stride,
                             int64_t capacity, int64_t position, uintptr_t out, int64_t out_stride, int64_t batch,
                             int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, int64_t num_threads,
                             const std::string& kernel) {
  if (batch < 0 || heads < 0 || kv_heads < 0 || head_dim < 0 || position < 0) fail("sizes must be non-negative");
  if (kv_heads == 0 ? heads != 0 : heads % kv_heads != 0) fail("heads must be a multiple of kv_heads");
  if (head_dim % 2 != 0 || head_dim > sparsert::kMaxDecoderHeadDim)
    fail("head_dim must be even and at most " + std::to_string(sparsert::kMaxDecoderHeadDim));
  if (position >= capacity) fail("position must be below the cache's capacity");
  if (cache_head_stride < capacity * head_dim || (batch > 1 && cache_batch_stride < kv_heads * cache_head_stride))
    fail("cache strides must cover capacity x head_dim per head and kv_heads heads per sequence");
  if (batch > 1 && (qkv_stride < (heads + 2 * kv_heads) * head_dim || out_stride < heads * head_dim))
    fail("row strides must cover the row");
  const bool any = batch * heads * head_dim > 0;
  if (any && (qkv == 0 || cos == 0 || sin == 0 || k_cache == 0 || v_cache == 0 || out == 0))
    fail("null tensor address");
  sparsert::CachedAttentionArgs a;
  a.qkv = ptr<const float>(qkv);
  a.qkv_stride = qkv_stride;
  a.cos = ptr<const float>(cos);
  a.sin = ptr<const float>(sin);
  a.k_cache = ptr<float>(k_cache);
  a.v_cache = ptr<float>(v_cache);
  a.cache_batch_stride = cache_batch_stride;
  a.cache_head_stride = cache_head_stride;
  a.position = position;
  a.out = ptr<float>(out);
  a.out_stride = out_stride;
  a.batch = batch;
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.scale = static_cast<float>(scale);
  a.num_threads = sparsert::clamp_threads(num_threads);
  const auto& k = kernel_for(kernel);
  if (any) {
    py::gil_scoped_release release;
    k.cached_attention(a);
  }
  return k.name;
}

}  // namespace

void bind_decoder(py::module_& m) {
  m.def("decoder_kernels", [] { return sparsert_bindings::describe_registry(sparsert::decoder_kernel_registry()); },
        "Every decoder kernel set in this build: name, isa, kind, and whether this CPU runs it.");
  m.def("select_decoder_kernel", [](const std::string& isa) {
    const auto* k = sparsert::select_decoder_kernel(isa.empty() ? sparsert::best_isa() : isa);
    return k ? k->name : std::string();
  }, py::arg("isa") = "");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("x_stride"), py::arg("add"), py::arg("add_stride"),
        py::arg("weight"), py::arg("eps"), py::arg("out"), py::arg("out_stride"), py::arg("rows"), py::arg("width"),
        py::arg("num_threads"), py::arg("kernel") = "",
        "x += add (where add is not 0), then out = weight * x / sqrt(mean(x^2) + eps) per row; float32\n"
        "tensors as raw addresses with row strides (floats). Returns the kernel used.");
  m.def("swiglu", &swiglu, py::arg("gate_up"), py::arg("in_stride"), py::arg("out"), py::arg("out_stride"),
        py::arg("rows"), py::arg("width"), py::arg("num_threads"), py::arg("kernel") = "",
        "out = silu(gate) * up per row, gate_up's rows holding gate then up (width floats each).");
  m.def("cached_attention", &cached_attention, py::arg("qkv"), py::arg("qkv_stride"), py::arg("cos"), py::arg("sin"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_batch_stride"), py::arg("cache_head_stride"),
        py::arg("capacity"), py::arg("position"), py::arg("out"), py::arg("out_stride"), py::arg("batch"),
        py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("num_threads"),
        py::arg("kernel") = "",
        "One decode step's attention (decoder/decoder.h): rotates q and k, writes k and v at row\n"
        "`position` of the caches, attends rows 0..position. Returns the kernel used.");
}
