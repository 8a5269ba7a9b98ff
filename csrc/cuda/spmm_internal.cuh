// Launchers of each kernel family (defined in their .cu files, dispatched by
// registry.cu). Callers guarantee rows > 0 and tokens > 0.
#pragma once

#include "spmm_cuda.h"

namespace sparsert {
namespace cuda {

cudaError_t launch_reference(const SpmmProblem& p, cudaStream_t stream);

// CSR (1x1 blocks): x staged transposed in shared memory, `token_tile`
// tokens per stage (1, 2, 4 or 8); needs cols * token_tile * sizeof(T)
// bytes of dynamic shared memory (csr_smem_bytes).
cudaError_t launch_csr(const SpmmProblem& p, int token_tile, cudaStream_t stream);
int64_t csr_smem_bytes(const SpmmProblem& p, int token_tile);

// BSR with R x C in {16, 32, 64}^2 square blocks, fp16/bf16, tensor cores
// (wmma m16n16k16). `token_tile` is 32 (decode: 4 warps split the blocks of
// a row) or 128 (4 warps split the tokens).
cudaError_t launch_bsr_wmma(const SpmmProblem& p, int token_tile, cudaStream_t stream);
int64_t bsr_wmma_smem_bytes(int block_rows, int block_cols, int token_tile);

}  // namespace cuda
}  // namespace sparsert
