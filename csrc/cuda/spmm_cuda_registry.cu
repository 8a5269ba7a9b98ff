// The one list of CUDA kernels, their preconditions, and the selection rule.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "spmm_internal.cuh"

namespace sparsert {
namespace cuda {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
  }
  return "?";
}

int dtype_size(DType d) { return d == DType::f32 ? 4 : 2; }

namespace {

constexpr int kCsrTiles[] = {1, 2, 4, 8};
constexpr int kWmmaBlocks[] = {16, 32, 64};
constexpr int kWmmaTiles[] = {32, 128};
// The CSR kernel prefers a stage that leaves room for two blocks per SM.
constexpr int64_t kCsrSmemBudget = 100 * 1024;

std::vector<CudaKernelInfo> build_registry() {
  std::vector<CudaKernelInfo> out;
  for (DType d : {DType::f32, DType::f16, DType::bf16}) {
    out.push_back({std::string(dtype_name(d)) + "_spmm_ref_cuda", "reference", d, 0, 0, 1});
    for (int tt : kCsrTiles)
      out.push_back({std::string(dtype_name(d)) + "_spmm_csr_t" + std::to_string(tt) + "_cuda", "csr", d, 1, 1, tt});
  }
  for (DType d : {DType::f16, DType::bf16})
    for (int b : kWmmaBlocks)
      for (int tm : kWmmaTiles)
        out.push_back({std::string(dtype_name(d)) + "_spmm_bsr" + std::to_string(b) + "x" + std::to_string(b) + "_m" +
                           std::to_string(tm) + "_wmma",
                       "bsr_wmma", d, b, b, tm});
  return out;
}

int smem_optin(int device) {
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 48 * 1024;
  return value;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

const std::vector<CudaKernelInfo>& kernel_registry() {
  static const std::vector<CudaKernelInfo> registry = build_registry();
  return registry;
}

std::string check_kernel(const CudaKernelInfo& k, const SpmmProblem& p, int device) {
  if (k.dtype != p.dtype) return std::string("kernel computes in ") + dtype_name(k.dtype) + ", problem is " + dtype_name(p.dtype);
  if (p.block_rows < 1 || p.block_cols < 1) return "block dimensions must be positive";
  if (p.index_bits != 16 && p.index_bits != 32) return "index_bits must be 16 or 32";
  if (k.block_rows != 0 && (k.block_rows != p.block_rows || k.block_cols != p.block_cols))
    return "kernel handles " + std::to_string(k.block_rows) + "x" + std::to_string(k.block_cols) + " blocks, not " +
           std::to_string(p.block_rows) + "x" + std::to_string(p.block_cols);
  if (k.kind == "reference") return "";
  if (p.rows > INT32_MAX || p.cols > INT32_MAX) return "rows and cols must fit in int32";
  if (k.kind == "csr") {
    if (!aligned16(p.values) || !aligned16(p.col_idx) || !aligned16(p.x))
      return "values, col_idx and x must be 16-byte aligned";
    if (p.tokens > 1 && (p.x_row_stride * dtype_size(p.dtype)) % 16 != 0)
      return "x rows must start 16-byte aligned (row stride a multiple of 16 bytes)";
    const int64_t smem = csr_smem_bytes(p, k.token_tile);
    if (smem > smem_optin(device))
      return "x stage needs " + std::to_string(smem) + " bytes of shared memory, the device has " +
             std::to_string(smem_optin(device));
    return "";
  }
  if (k.kind == "bsr_wmma") {
    if (!aligned16(p.values) || !aligned16(p.x)) return "values and x must be 16-byte aligned";
    if (p.x_row_stride % 8 != 0) return "x row stride must be a multiple of 8 elements";
    if (bsr_wmma_smem_bytes(p.block_rows, p.block_cols, k.token_tile) > smem_optin(device))
      return "not enough shared memory on this device";
    return "";
  }
  return "unknown kernel kind " + k.kind;
}

const CudaKernelInfo* select_kernel(const SpmmProblem& p, int device) {
  const auto& reg = kernel_registry();
  auto find = [&](const std::string& kind, int r, int c, int tile) -> const CudaKernelInfo* {
    for (const auto& k : reg)
      if (k.kind == kind && k.dtype == p.dtype && k.block_rows == r && k.block_cols == c && k.token_tile == tile &&
          check_kernel(k, p, device).empty())
        return &k;
    return nullptr;
  };
  if (p.block_rows == 1 && p.block_cols == 1) {
    // The widest token stage that the token count fills and that fits the
    // budget; a narrower one if the row of x is long; the device maximum last.
    for (int tt : {8, 4, 2, 1}) {
      if (tt > 1 && tt / 2 >= p.tokens) continue;
      if (csr_smem_bytes(p, tt) > kCsrSmemBudget && tt > 1) continue;
      if (const auto* k = find("csr", 1, 1, tt)) return k;
    }
  }
  if (p.block_rows == p.block_cols) {
    if (const auto* k = find("bsr_wmma", p.block_rows, p.block_cols, p.tokens <= 32 ? 32 : 128)) return k;
  }
  for (const auto& k : reg)
    if (k.kind == "reference" && k.dtype == p.dtype) return &k;
  return nullptr;
}

cudaError_t launch(const CudaKernelInfo& k, const SpmmProblem& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.tokens <= 0) return cudaSuccess;
  if (k.kind == "reference") return launch_reference(p, stream);
  if (k.kind == "csr") return launch_csr(p, k.token_tile, stream);
  if (k.kind == "bsr_wmma") return launch_bsr_wmma(p, k.token_tile, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsert
