// CSR SpMM (1x1 blocks), fp32 / fp16 / bf16 with fp32 accumulation.
//
// The techniques of Sputnik (Gale et al., SC'20), adapted to y = x W^T with
// few tokens (the decode case this kernel is for):
//  - x is staged transposed in shared memory, TT tokens per stage, so the
//    TT values one nonzero multiplies are contiguous: one vector load
//    (LDS.32/64/128) per nonzero instead of TT scattered gathers; the stage
//    is read with 16-byte loads (x rows 16-byte aligned);
//  - index pre-scaling: a column index is multiplied by TT once, as it is
//    loaded, into the shared-memory offset the inner loop uses directly;
//  - row swizzle load balancing: warps visit rows in the order `row_order`
//    (longest first, computed once per weight by the caller), so the rows a
//    block's warps run concurrently have similar lengths and the grid-stride
//    loop hands out the long rows first;
//  - vector loads: one warp per row, each lane loads 4 consecutive values
//    and 4 indices at a time (8-16 byte loads; 256+ bytes per warp load),
//    with a scalar head and tail for rows that do not start or end on a
//    multiple of 4; then a butterfly reduction per token.
// The grid is (token stages) x (row groups); blocks loop over both, so any
// token count works. Shared memory holds cols * TT elements.
#include "common.cuh"
#include "spmm_internal.cuh"

#include <algorithm>

namespace sparsert {
namespace cuda {
namespace {

constexpr int kCsrThreads = 256;
constexpr int kV = 4;  // entries per vector load of values and indices (needs 16-byte aligned arrays)

template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int TT, typename Idx>
__global__ void __launch_bounds__(kCsrThreads) spmm_csr_kernel(SpmmProblem p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [cols][TT]
  const int cols = static_cast<int>(p.cols);
  const int rows = static_cast<int>(p.rows);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ values = static_cast<const T*>(p.values);
  const Idx* __restrict__ col_idx = static_cast<const Idx*>(p.col_idx);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int64_t stages = (p.tokens + TT - 1) / TT;
  constexpr int kE = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector of x

  for (int64_t stage = blockIdx.x; stage < stages; stage += gridDim.x) {
    const int64_t t0 = stage * TT;
    const int nt = static_cast<int>(p.tokens - t0 < TT ? p.tokens - t0 : TT);
    __syncthreads();  // every warp is done reading the previous stage
    // Stage xs[k * TT + j] = x[t0 + j, k]. Thread i takes token j = i % TT
    // and the 16-byte vector kv = i / TT of that token's row (kE columns), so
    // a warp reads whole sectors of TT rows; the writes transpose it. The
    // last cols % kE columns go one element per thread.
    const int vectors = cols / kE;
#pragma unroll 4
    for (int i = threadIdx.x; i < vectors * TT; i += blockDim.x) {
      const int j = i % TT, kv = i / TT;
      Vec<T, kE> v;
      if (j < nt) {
        v = *reinterpret_cast<const Vec<T, kE>*>(x + (t0 + j) * p.x_row_stride + kv * kE);
      } else {
#pragma unroll
        for (int u = 0; u < kE; ++u) v.v[u] = from_f32<T>(0.0f);
      }
#pragma unroll
      for (int u = 0; u < kE; ++u) xs[(kv * kE + u) * TT + j] = v.v[u];
    }
    for (int i = threadIdx.x; i < (cols - vectors * kE) * TT; i += blockDim.x) {
      const int j = i % TT, k = vectors * kE + i / TT;
      xs[k * TT + j] = j < nt ? x[(t0 + j) * p.x_row_stride + k] : from_f32<T>(0.0f);
    }
    __syncthreads();

    const int first = static_cast<int>(blockIdx.y) * warps + warp;
    const int step = static_cast<int>(gridDim.y) * warps;
    for (int w = first; w < rows; w += step) {  // warp-uniform
      const int r = p.row_order != nullptr ? p.row_order[w] : w;
      const int begin = p.row_ptr[r], end = p.row_ptr[r + 1];
      float acc[TT];
#pragma unroll
      for (int j = 0; j < TT; ++j) acc[j] = 0.0f;
      auto accumulate = [&](int column, float v) {
        const int offset = column * TT;  // index pre-scaling: the stage offset of column
        const Vec<T, TT> xv = *reinterpret_cast<const Vec<T, TT>*>(xs + offset);
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[j] = fmaf(v, to_f32(xv.v[j]), acc[j]);
      };
      // Vector loads: the row splits into a head (< kV entries up to a
      // multiple of kV), aligned kV-wide vectors of values and indices (one
      // per lane per step), and a tail (< kV entries). Head and tail take
      // one entry per lane, on lanes [0, kV) and [kV, 2 kV).
      const int aligned = min(end, (begin + kV - 1) & ~(kV - 1));
      const int vectors = (end - aligned) / kV;
      const int body_end = aligned + vectors * kV;
      if (lane < aligned - begin) {
        accumulate(IndexLoad<Idx>::load(col_idx + begin + lane), to_f32(values[begin + lane]));
      } else if (lane >= kV && lane - kV < end - body_end) {
        accumulate(IndexLoad<Idx>::load(col_idx + body_end + lane - kV), to_f32(values[body_end + lane - kV]));
      }
      for (int v = lane; v < vectors; v += 32) {
        const int q = aligned + v * kV;
        const Vec<T, kV> vals = *reinterpret_cast<const Vec<T, kV>*>(values + q);
        const Vec<Idx, kV> cols_q = *reinterpret_cast<const Vec<Idx, kV>*>(col_idx + q);
#pragma unroll
        for (int u = 0; u < kV; ++u) accumulate(static_cast<int>(cols_q.v[u]), to_f32(vals.v[u]));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int j = 0; j < TT; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
      }
      float out = acc[0];
#pragma unroll
      for (int j = 1; j < TT; ++j) out = lane == j ? acc[j] : out;
      if (lane < nt) y[(t0 + lane) * p.y_row_stride + r] = from_f32<T>(epilogue(out, p.bias, r, p.epilogue));
    }
  }
}

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) return 0;
  return value;
}

template <typename T, int TT, typename Idx>
cudaError_t launch_t(const SpmmProblem& p, cudaStream_t stream) {
  const auto kernel = spmm_csr_kernel<T, TT, Idx>;
  const int64_t smem = csr_smem_bytes(p, TT);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kCsrThreads, static_cast<size_t>(smem));
  if (err != cudaSuccess) return err;
  const int sms = std::max(1, device_attribute(cudaDevAttrMultiProcessorCount));
  // Every block stages its own copy of x: more blocks per SM (more loads in
  // flight) only where the stage is small.
  const int64_t target = static_cast<int64_t>(sms) * std::max(1, std::min(per_sm, TT <= 2 ? 4 : 2));
  const int64_t stages = ceil_div(p.tokens, TT);
  const int64_t row_groups = ceil_div(p.rows, kCsrThreads / 32);
  const int64_t gx = std::min<int64_t>(stages, target);
  const int64_t gy = std::min<int64_t>({row_groups, std::max<int64_t>(1, target / gx), 65535});
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kCsrThreads, static_cast<size_t>(smem),
           stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename Idx>
cudaError_t launch_tile(const SpmmProblem& p, int token_tile, cudaStream_t stream) {
  switch (token_tile) {
    case 1: return launch_t<T, 1, Idx>(p, stream);
    case 2: return launch_t<T, 2, Idx>(p, stream);
    case 4: return launch_t<T, 4, Idx>(p, stream);
    case 8: return launch_t<T, 8, Idx>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_index(const SpmmProblem& p, int token_tile, cudaStream_t stream) {
  return p.index_bits == 16 ? launch_tile<T, uint16_t>(p, token_tile, stream)
                            : launch_tile<T, int32_t>(p, token_tile, stream);
}

}  // namespace

int64_t csr_smem_bytes(const SpmmProblem& p, int token_tile) {
  return p.cols * token_tile * dtype_size(p.dtype);
}

cudaError_t launch_csr(const SpmmProblem& p, int token_tile, cudaStream_t stream) {
  if (p.block_rows != 1 || p.block_cols != 1 || p.rows > 0x7fffffff || p.cols > 0x7fffffff)
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::f32: return launch_index<float>(p, token_tile, stream);
    case DType::f16: return launch_index<__half>(p, token_tile, stream);
    case DType::bf16: return launch_index<__nv_bfloat16>(p, token_tile, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsert
