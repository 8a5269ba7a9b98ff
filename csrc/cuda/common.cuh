// Device helpers shared by the CUDA kernels: element conversions, index
// decoding, the fused epilogue, launch-size helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "spmm_cuda.h"

namespace sparsert {
namespace cuda {

template <typename T> struct Elem;
template <> struct Elem<float> {
  static constexpr DType dtype = DType::f32;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <> struct Elem<__half> {
  static constexpr DType dtype = DType::f16;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  static constexpr DType dtype = DType::bf16;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T> __device__ __forceinline__ float to_f32(T v) { return Elem<T>::to_float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v) { return Elem<T>::from_float(v); }

// Column (block-column) index p, widened: uint16 stored in int16 or int32.
__device__ __forceinline__ int64_t load_index(const void* col_idx, int index_bits, int64_t p) {
  if (index_bits == 16) return static_cast<int64_t>(static_cast<const uint16_t*>(col_idx)[p]);
  return static_cast<int64_t>(static_cast<const int32_t*>(col_idx)[p]);
}

template <typename Idx> struct IndexLoad;
template <> struct IndexLoad<uint16_t> {
  __device__ static int load(const uint16_t* p) { return static_cast<int>(__ldg(reinterpret_cast<const unsigned short*>(p))); }
};
template <> struct IndexLoad<int32_t> {
  __device__ static int load(const int32_t* p) { return __ldg(p); }
};

// bias, then the fused epilogue (common/epilogue.h) of every kernel.
__device__ __forceinline__ float epilogue(float acc, const float* bias, int64_t row, Epilogue e) {
  if (bias != nullptr) acc += bias[row];
  if (e == Epilogue::kRelu) acc = fmaxf(acc, 0.0f);
  return acc;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace sparsert
