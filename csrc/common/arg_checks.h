// Checks of the scalar arguments the bindings receive from Python, and
// overflow-checked size arithmetic. A bad argument is a std::invalid_argument
// whose one-line message names it (pybind11 turns it into a ValueError); no
// size is computed in a type it can overflow. Plain C++ (no pybind11, no CUDA).
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace sparsert {

// At most this many threads run one kernel call; a larger num_threads is
// clamped (the result does not depend on it). 10**6 threads used to crash the
// OpenMP runtime.
constexpr int kMaxThreads = 1024;

// `value` as an int in [lo, hi], or std::invalid_argument naming `name`.
inline int int_in_range(const char* name, int64_t value, int64_t lo,
                        int64_t hi = std::numeric_limits<int32_t>::max()) {
  if (value < lo || value > hi)
    throw std::invalid_argument(std::string(name) + " must be in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "]; got " + std::to_string(value));
  return static_cast<int>(value);
}

// `value` in [lo, hi] (64-bit sizes), or std::invalid_argument naming `name`.
inline int64_t size_in_range(const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi)
    throw std::invalid_argument(std::string(name) + " must be in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "]; got " + std::to_string(value));
  return value;
}

// num_threads as the kernels take it: < 1 means 1, more than kMaxThreads is
// clamped to kMaxThreads.
inline int clamp_threads(int64_t num_threads) {
  return num_threads < 1 ? 1 : num_threads > kMaxThreads ? kMaxThreads : static_cast<int>(num_threads);
}

// a * b, or std::invalid_argument saying which size `what` overflows.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out;
  if (__builtin_mul_overflow(a, b, &out)) throw std::invalid_argument(std::string(what) + " overflows 64 bits");
  return out;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t out;
  if (__builtin_add_overflow(a, b, &out)) throw std::invalid_argument(std::string(what) + " overflows 64 bits");
  return out;
}

// A raw address the caller must not pass as 0 (a null pointer).
inline void require_address(const char* name, uintptr_t address) {
  if (address == 0) throw std::invalid_argument(std::string(name) + " is a null address");
}

}  // namespace sparsert
