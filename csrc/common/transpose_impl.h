// The token transposes of the fp32 kernels (x rows into token panels, tiles into y rows),
// one home for the CSR/BSR (spmm_impl.h) and row-group (spmm_rowgroup_impl.h) kernels.
// Included by those per-ISA headers inside their target region (isa_target_begin.inc), after
// they defined SPARSERT_ISA; SPARSERT_TRANSPOSE_AVX2 (set by the AVX2 and AVX-512 files, which
// include <immintrin.h> first) selects the 8 x 8 AVX2 shuffle transpose over the scalar one.
#pragma once

#include <cstdint>

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including common/transpose_impl.h"
#endif

#ifndef SPARSERT_PRIVATE_PACK_BYTES
#define SPARSERT_PRIVATE_PACK_BYTES (256 * 1024)
#endif

namespace sparsert {
namespace SPARSERT_ISA {

// Packed token panels up to this size: with several threads, each packs every panel for
// itself inside the one parallel region of the product, instead of the threads packing them
// together in a region of its own first. Packing twice costs less than a second fork-join and
// than reading the half of the panels the other core packed a moment before (row-group
// kernels, MiniLM shapes at 32 tokens, 2 threads, Zen 4: 1.04-1.09x).
constexpr int64_t kPrivatePackBytes = SPARSERT_PRIVATE_PACK_BYTES;

// Copies an 8 x 8 block: dst[j * dst_stride + i] = src[i * src_stride + j].
static inline void transpose8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
#if defined(SPARSERT_TRANSPOSE_AVX2)
  __m256 r0 = _mm256_loadu_ps(src + 0 * src_stride), r1 = _mm256_loadu_ps(src + 1 * src_stride);
  __m256 r2 = _mm256_loadu_ps(src + 2 * src_stride), r3 = _mm256_loadu_ps(src + 3 * src_stride);
  __m256 r4 = _mm256_loadu_ps(src + 4 * src_stride), r5 = _mm256_loadu_ps(src + 5 * src_stride);
  __m256 r6 = _mm256_loadu_ps(src + 6 * src_stride), r7 = _mm256_loadu_ps(src + 7 * src_stride);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * dst_stride, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * dst_stride, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * dst_stride, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * dst_stride, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x31));
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
#endif
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols,
// in 8 x 8 blocks with scalar edges.
static inline void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols,
                             float* dst, int64_t dst_stride) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t i = 0; i < rows8; i += 8) {
    for (int64_t j = 0; j < cols8; j += 8)
      transpose8x8(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride);
    for (int64_t j = cols8; j < cols; ++j)
      for (int64_t ii = i; ii < i + 8; ++ii) dst[j * dst_stride + ii] = src[ii * src_stride + j];
  }
  for (int64_t i = rows8; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
