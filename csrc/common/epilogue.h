// The fused epilogues: what a kernel applies to each output after the sparse
// product and the bias, and the integer code the Python side passes for it.
// The one C++ definition: the CPU spmm and conv kernels, the CUDA kernels and
// every binding use this enum; Python reads the table through
// sparsert._C.kernel_epilogues() and checks its own epilogue table against it.
// Anything else (relu6, gelu, ...) runs after the kernel, in torch.
//
// Plain C++17 with no CUDA or pybind11 dependency: nvcc compiles it too.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace sparsert {

enum class Epilogue : int {
  kNone = 0,  // y = acc + bias
  kRelu = 1,  // y = max(acc + bias, 0)
};

struct EpilogueInfo {
  const char* name;  // the name Python uses
  Epilogue code;
};

// Every epilogue the kernels implement, in code order.
inline constexpr EpilogueInfo kEpilogues[] = {
    {"none", Epilogue::kNone},
    {"relu", Epilogue::kRelu},
};
inline constexpr std::size_t kEpilogueCount = sizeof(kEpilogues) / sizeof(kEpilogues[0]);

constexpr bool is_epilogue_code(long long code) {
  for (const auto& e : kEpilogues)
    if (static_cast<int>(e.code) == code) return true;
  return false;
}

// The epilogue for `code`, or std::invalid_argument naming `argument` and the
// valid codes (a one-line ValueError in Python).
inline Epilogue epilogue_from_code(long long code, const char* argument = "activation") {
  if (is_epilogue_code(code)) return static_cast<Epilogue>(static_cast<int>(code));
  std::string valid;
  for (const auto& e : kEpilogues)
    valid += (valid.empty() ? "" : ", ") + std::to_string(static_cast<int>(e.code)) + " (" + e.name + ")";
  throw std::invalid_argument(std::string(argument) + " must be a kernel epilogue code: " + valid +
                              "; got " + std::to_string(code));
}

}  // namespace sparsert
