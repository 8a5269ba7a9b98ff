// The sparsert._C extension module: what every op shares (ISA detection, the
// threading backend, the fused epilogues), then each op's thin binding file
// (spmm/spmm_bindings.cc, spmm/spmm_bitmask_bindings.cc, conv/conv_bindings.cc) adds its functions. The CUDA
// kernels are the separate module sparsert._C_cuda (cuda/cuda_bindings.cc).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/epilogue.h"
#include "common/isa.h"
#include "common/thread_pool.h"

namespace py = pybind11;

void bind_spmm(py::module_& m);  // spmm/spmm_bindings.cc
void bind_conv(py::module_& m);  // conv/conv_bindings.cc
void bind_spmm_bitmask(py::module_& m);  // spmm/spmm_bitmask_bindings.cc
void bind_spmm_int8(py::module_& m);  // spmm_int8/spmm_int8_bindings.cc
void bind_spmm_rowgroup(py::module_& m);  // spmm_rowgroup/spmm_rowgroup_bindings.cc
void bind_attention(py::module_& m);  // attention/attention_bindings.cc
void bind_decoder(py::module_& m);  // decoder/decoder_bindings.cc
void bind_gemv(py::module_& m);  // gemv/gemv_bindings.cc

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsert native kernels (torch-free)";
  m.def("best_isa", &sparsert::best_isa, "The ISA sparsert uses on this CPU (SPARSERT_ISA overrides).");
  m.def("isa_supported", &sparsert::isa_supported, py::arg("isa"));
  m.def("threading_backend", &sparsert::threading_backend,
        "'openmp' (torch's OpenMP threads) or 'pool' (sparsert's own threads).");
  m.def("set_threading_backend", [](const std::string& name) { sparsert::set_threading_backend(name.c_str()); },
        py::arg("name"));
  m.def("openmp_available", &sparsert::openmp_available);
  m.def("openmp_library", &sparsert::openmp_library,
        "Path of the OpenMP runtime the kernels run on ('' without OpenMP).");
  m.def("kernel_epilogues", [] {
    py::dict out;
    for (const auto& e : sparsert::kEpilogues) out[py::str(e.name)] = static_cast<int>(e.code);
    return out;
  }, "The fused epilogues the kernels implement: name -> the code passed as `activation`.");
  bind_spmm(m);
  bind_conv(m);
  bind_spmm_bitmask(m);
  bind_spmm_int8(m);
  bind_spmm_rowgroup(m);
  bind_attention(m);
  bind_decoder(m);
  bind_gemv(m);
}
