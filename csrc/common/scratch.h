// Per-thread scratch memory for the kernels: 64-byte aligned, only grows.
// Kernels keep one as `static thread_local Scratch name;` per use. Compiled
// for the baseline ISA (included before a kernel's target region).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace sparsert {

// A failed allocation throws std::bad_alloc (a MemoryError in Python:
// parallel_run carries it out of the worker threads) and leaves it empty.
struct Scratch {
  float* data = nullptr;
  size_t capacity = 0;
  float* get(size_t floats) {
    if (floats > capacity) {
      std::free(data);
      data = nullptr;
      capacity = 0;
      if (floats > (SIZE_MAX - 63) / sizeof(float)) throw std::bad_alloc();
      const size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (data == nullptr) throw std::bad_alloc();
      capacity = bytes / sizeof(float);
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};

}  // namespace sparsert
