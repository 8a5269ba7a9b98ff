// The plain CUDA reference: one thread per output element, any block shape,
// any dtype, float32 accumulation in the stored order. Slow and obviously
// correct; the fast kernels are tested against it (and it is the fallback
// for problems no fast kernel handles, e.g. 4x1 blocks or fp32 BSR).
#include "common.cuh"
#include "spmm_internal.cuh"

namespace sparsert {
namespace cuda {
namespace {

template <typename T>
__global__ void spmm_reference_kernel(SpmmProblem p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  const int R = p.block_rows, C = p.block_cols;
  const int64_t block_row = row / R;
  const int i = static_cast<int>(row % R);
  const T* values = static_cast<const T*>(p.values);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t begin = p.row_ptr[block_row], end = p.row_ptr[block_row + 1];
  for (int64_t t = blockIdx.y; t < p.tokens; t += gridDim.y) {
    const T* xt = x + t * p.x_row_stride;
    float acc = 0.0f;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t col0 = load_index(p.col_idx, p.index_bits, b) * C;
      const T* w = values + (b * R + i) * C;
      for (int c = 0; c < C; ++c) {
        if (col0 + c < p.cols) acc += to_f32(w[c]) * to_f32(xt[col0 + c]);
      }
    }
    y[t * p.y_row_stride + row] = from_f32<T>(epilogue(acc, p.bias, row, p.epilogue));
  }
}

template <typename T>
cudaError_t launch_reference_t(const SpmmProblem& p, cudaStream_t stream) {
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kThreads)),
                  static_cast<unsigned>(p.tokens < 65535 ? p.tokens : 65535));
  spmm_reference_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_reference(const SpmmProblem& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f32: return launch_reference_t<float>(p, stream);
    case DType::f16: return launch_reference_t<__half>(p, stream);
    case DType::bf16: return launch_reference_t<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsert
