// GCC/Clang vector helpers over SPARSERT_VEC_FLOATS floats, for the kernels written once and
// compiled per ISA (attention_impl.h, decoder_impl.h, gemv_impl.h, spmm_rowgroup_impl.h): the vector types, unaligned load/store,
// splat, max, a vector exp and horizontal reductions. Included by an *_impl.h after
// common/isa_target_begin.inc (so these inline functions get the file's ISA) and after
// <cstdint>, <cstring> and <algorithm>; it includes nothing itself (see isa_target_begin.inc:
// std headers must not be compiled under an ISA pragma).
#pragma once

#ifndef SPARSERT_ISA
#error "define SPARSERT_ISA before including vec_impl.h"
#endif

namespace sparsert {
namespace SPARSERT_ISA {
namespace vec {

constexpr int VW = SPARSERT_VEC_FLOATS;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_unaligned __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
// A broadcast (vf{} + s would cost an add: -0.0 + 0.0 is not -0.0).
static inline vf splat(float s) {
  const vf first = {s};
  return __builtin_shuffle(first, vi{});
}
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// e^x for x <= 0 (softmax's shifted scores), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a
// degree-6 polynomial for e^r, then 2^n through the exponent bits; within 2 ulp of std::exp.
// Below -87.3 the result is clamped to ~1e-38 (a masked score's weight: nothing beside 1).
static inline vf vexp(vf x) {
  x = vmax(x, splat(-87.3f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * (r * r) + r + splat(1.0f);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

static inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < VW; ++l) m = std::max(m, v[l]);
  return m;
}
static inline float hsum(vf v) {
  float s = 0;
  for (int l = 0; l < VW; ++l) s += v[l];
  return s;
}

}  // namespace vec
}  // namespace SPARSERT_ISA
}  // namespace sparsert
