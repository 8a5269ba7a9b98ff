// Per-thread scratch memory for the kernels: 64-byte aligned, only grows.
// Kernels keep one as `static thread_local Scratch name;` per use. Compiled
// for the baseline ISA (included before a kernel's target region).
#pragma once

#include <cstddef>
#include <cstdlib>

namespace sparsert {

struct Scratch {
  float* data = nullptr;
  size_t capacity = 0;
  float* get(size_t floats) {
    if (floats > capacity) {
      std::free(data);
      const size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      capacity = bytes / sizeof(float);
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};

}  // namespace sparsert
