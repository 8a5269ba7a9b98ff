// What the spmm and the conv bindings do alike with a kernel
// registry (a vector of KernelInfo or ConvKernelInfo: name, isa, kind,
// block_rows, block_cols): list it for Python, and look up a kernel a caller
// forces by name.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/isa.h"

namespace sparsert_bindings {

// name, isa, kind, block tile, and whether this CPU runs it, per kernel.
template <typename Info>
pybind11::list describe_registry(const std::vector<Info>& registry) {
  pybind11::list out;
  for (const auto& k : registry) {
    pybind11::dict d;
    d["name"] = k.name;
    d["isa"] = k.isa;
    d["kind"] = k.kind;
    d["block"] = pybind11::make_tuple(k.block_rows, k.block_cols);
    d["supported"] = sparsert::isa_supported(k.isa);
    out.append(d);
  }
  return out;
}

// The kernel named `name` (a ValueError names the problem: no such kernel in
// this build, or one this CPU cannot run). `what` names the registry.
template <typename Info>
const Info& forced_kernel(const std::vector<Info>& registry, const std::string& name, const char* what) {
  for (const auto& k : registry) {
    if (k.name != name) continue;
    if (!sparsert::isa_supported(k.isa))
      throw std::invalid_argument("kernel '" + name + "' needs " + k.isa + ", which this CPU lacks");
    return k;
  }
  throw std::invalid_argument(std::string("unknown sparsert ") + what + " '" + name + "'");
}

}  // namespace sparsert_bindings
