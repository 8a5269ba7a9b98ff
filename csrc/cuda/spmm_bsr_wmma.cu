// BSR SpMM on tensor cores: fp16 / bf16 inputs, fp32 accumulation, square
// R x C blocks with R = C in {16, 32, 64}, wmma m16n16k16.
//
// One thread block owns one block row of W (R output rows) and a tile of TM
// tokens; it walks the block row's nonzero blocks. Per nonzero block b with
// block column cb it multiplies the x tile (TM tokens x C inputs starting at
// cb * C) by block b transposed (C x R) into TM x R float accumulators.
// Both operands go through shared memory with cp.async (16-byte chunks,
// zero-filled past the last token and the last column), double buffered so
// the next block's loads overlap this block's MMAs.
//
// Warps: WM along tokens (32 tokens each) x WK along the nonzero blocks.
//   TM = 128 (WM = 4, WK = 1): prefill / large batches.
//   TM = 32  (WM = 1, WK = 4): decode; four warps take every fourth block
//            and their partial sums are added in the epilogue.
// The epilogue goes through shared memory (reusing the pipeline buffers) so
// bias, relu and the dtype conversion are fused and stores are coalesced
// along the output rows.
#include <mma.h>

#include "common.cuh"
#include "spmm_internal.cuh"

namespace sparsert {
namespace cuda {
namespace {

using namespace nvcuda;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T, int R, int C, int WM, int WK>
struct BsrConfig {
  static_assert(R % 16 == 0 && C % 16 == 0, "wmma tiles are 16x16x16");
  static_assert(sizeof(T) == 2, "fp16 / bf16 only");
  static constexpr int kWarps = WM * WK;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTM = 32 * WM;          // tokens per thread block
  static constexpr int kG = WK;                // nonzero blocks per pipeline stage
  static constexpr int kLd = C + 8;            // padded smem row (elements): fewer bank conflicts
  static constexpr int kChunks = C / 8;        // 16-byte chunks per block row
  static constexpr int kWElems = kG * R * kLd;
  static constexpr int kXElems = kG * kTM * kLd;
  static constexpr int kStageElems = kWElems + kXElems;
  static constexpr int kPipeBytes = 2 * kStageElems * static_cast<int>(sizeof(T));
  static constexpr int kEpiBytes = WK * kTM * R * static_cast<int>(sizeof(float));
  static constexpr int kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  // wmma pointers must be 32-byte aligned: rows used are multiples of 16,
  // 16 * kLd * 2 bytes is a multiple of 32, stage sizes are too.
  static_assert((kWElems * sizeof(T)) % 32 == 0 && (kStageElems * sizeof(T)) % 32 == 0, "alignment");
};

template <typename T, int R, int C, int WM, int WK>
__global__ void __launch_bounds__(32 * WM * WK) spmm_bsr_wmma_kernel(SpmmProblem p) {
  using Cfg = BsrConfig<T, R, C, WM, WK>;
  constexpr int TM = Cfg::kTM, G = Cfg::kG, LD = Cfg::kLd, CH = Cfg::kChunks;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  float* epi = reinterpret_cast<float*>(smem_raw);  // [WK][TM][R], after the main loop

  const T* __restrict__ values = static_cast<const T*>(p.values);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp % WM, wk = warp / WM;
  const int64_t block_row = blockIdx.x;
  const int begin = p.row_ptr[block_row];
  const int end = p.row_ptr[block_row + 1];
  const int stages = (end - begin + G - 1) / G;
  const int64_t tiles = (p.tokens + TM - 1) / TM;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t t0 = tile * TM;
    __syncthreads();  // the previous tile's epilogue is done with shared memory

    auto load_stage = [&](int s, int buf) {
      T* sw = smem + buf * Cfg::kStageElems;
      T* sx = sw + Cfg::kWElems;
      for (int i = tid; i < G * R * CH; i += Cfg::kThreads) {
        const int g = i / (R * CH);
        const int rem = i - g * (R * CH);
        const int r = rem / CH, ch = rem - (rem / CH) * CH;
        const int q = begin + s * G + g;
        if (q < end)
          cp_async16(sw + (g * R + r) * LD + ch * 8, values + (static_cast<int64_t>(q) * R + r) * C + ch * 8, 16);
      }
      for (int i = tid; i < G * TM * CH; i += Cfg::kThreads) {
        const int g = i / (TM * CH);
        const int rem = i - g * (TM * CH);
        const int tok = rem / CH, ch = rem - (rem / CH) * CH;
        const int q = begin + s * G + g;
        if (q < end) {
          const int64_t col0 = load_index(p.col_idx, p.index_bits, q) * C + ch * 8;
          const int64_t t = t0 + tok;
          int64_t valid = t < p.tokens ? p.cols - col0 : 0;
          valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
          const T* src = valid > 0 ? x + t * p.x_row_stride + col0 : x;
          cp_async16(sx + (g * TM + tok) * LD + ch * 8, src, static_cast<int>(valid * sizeof(T)));
        }
      }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][R / 16];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < R / 16; ++n) wmma::fill_fragment(acc[m][n], 0.0f);

    if (stages > 0) load_stage(0, 0);
    cp_async_commit();
    for (int s = 0; s < stages; ++s) {
      if (s + 1 < stages) load_stage(s + 1, (s + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();  // stage s has landed (only stage s + 1 may be in flight)
      __syncthreads();
      if (begin + s * G + wk < end) {
        const T* sw = smem + (s & 1) * Cfg::kStageElems + wk * R * LD;
        const T* sx = smem + (s & 1) * Cfg::kStageElems + Cfg::kWElems + (wk * TM + wm * 32) * LD;
#pragma unroll
        for (int kk = 0; kk < C / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
          wmma::load_matrix_sync(a[0], sx + kk * 16, LD);
          wmma::load_matrix_sync(a[1], sx + 16 * LD + kk * 16, LD);
#pragma unroll
          for (int n = 0; n < R / 16; ++n) {
            // B (k, n) = W[n][k]: the block's rows, read column-major.
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
            wmma::load_matrix_sync(b, sw + n * 16 * LD + kk * 16, LD);
            wmma::mma_sync(acc[0][n], a[0], b, acc[0][n]);
            wmma::mma_sync(acc[1][n], a[1], b, acc[1][n]);
          }
        }
      }
      __syncthreads();  // buffer (s & 1) is reloaded at iteration s + 1
    }
    cp_async_wait<0>();
    __syncthreads();

#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < R / 16; ++n)
        wmma::store_matrix_sync(epi + (static_cast<int64_t>(wk) * TM + wm * 32 + m * 16) * R + n * 16, acc[m][n], R,
                                wmma::mem_row_major);
    __syncthreads();
    for (int i = tid; i < TM * R; i += Cfg::kThreads) {
      const int tok = i / R, rr = i - (i / R) * R;
      float v = 0.0f;
#pragma unroll
      for (int g = 0; g < WK; ++g) v += epi[(g * TM + tok) * R + rr];
      const int64_t t = t0 + tok;
      const int64_t row = block_row * R + rr;
      if (t < p.tokens && row < p.rows) y[t * p.y_row_stride + row] = from_f32<T>(epilogue(v, p.bias, row, p.epilogue));
    }
  }
}

template <typename T, int R, int C, int WM, int WK>
cudaError_t launch_t(const SpmmProblem& p, cudaStream_t stream) {
  using Cfg = BsrConfig<T, R, C, WM, WK>;
  const auto kernel = spmm_bsr_wmma_kernel<T, R, C, WM, WK>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t block_rows = ceil_div(p.rows, R);
  const int64_t tiles = ceil_div(p.tokens, Cfg::kTM);
  const dim3 grid(static_cast<unsigned>(block_rows), static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int B>
cudaError_t launch_tile(const SpmmProblem& p, int token_tile, cudaStream_t stream) {
  if (token_tile == 32) return launch_t<T, B, B, 1, 4>(p, stream);
  if (token_tile == 128) return launch_t<T, B, B, 4, 1>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_block(const SpmmProblem& p, int token_tile, cudaStream_t stream) {
  if (p.block_rows != p.block_cols) return cudaErrorInvalidValue;
  switch (p.block_rows) {
    case 16: return launch_tile<T, 16>(p, token_tile, stream);
    case 32: return launch_tile<T, 32>(p, token_tile, stream);
    case 64: return launch_tile<T, 64>(p, token_tile, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int B>
int64_t smem_for(int token_tile) {
  if (token_tile == 32) return BsrConfig<__half, B, B, 1, 4>::kSmemBytes;
  if (token_tile == 128) return BsrConfig<__half, B, B, 4, 1>::kSmemBytes;
  return -1;
}

}  // namespace

int64_t bsr_wmma_smem_bytes(int block_rows, int block_cols, int token_tile) {
  if (block_rows != block_cols) return -1;
  switch (block_rows) {
    case 16: return smem_for<16>(token_tile);
    case 32: return smem_for<32>(token_tile);
    case 64: return smem_for<64>(token_tile);
    default: return -1;
  }
}

cudaError_t launch_bsr_wmma(const SpmmProblem& p, int token_tile, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f16: return launch_block<__half>(p, token_tile, stream);
    case DType::bf16: return launch_block<__nv_bfloat16>(p, token_tile, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace sparsert
