// What the two spmm bindings (spmm_bindings.cc, spmm_bitmask_bindings.cc)
// share: raw addresses to typed pointers and the dense operands of a call.
#pragma once

#include <cstdint>

#include "common/arg_checks.h"
#include "spmm/spmm.h"

namespace sparsert_bindings {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

// The dense operands of one spmm call, from the binding's raw arguments.
inline sparsert::SpmmArgs spmm_args(uintptr_t x, int64_t tokens, int64_t x_row_stride, uintptr_t y,
                                    int64_t y_row_stride, uintptr_t bias, sparsert::Epilogue epilogue,
                                    int64_t num_threads) {
  sparsert::SpmmArgs a;
  a.x = ptr<const float>(x);
  a.tokens = tokens;
  a.x_row_stride = x_row_stride;
  a.y = ptr<float>(y);
  a.y_row_stride = y_row_stride;
  a.bias = bias ? ptr<const float>(bias) : nullptr;
  a.epilogue = epilogue;
  a.num_threads = sparsert::clamp_threads(num_threads);
  return a;
}

}  // namespace sparsert_bindings
