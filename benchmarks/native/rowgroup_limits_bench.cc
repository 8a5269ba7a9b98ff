// What bounds the row-group kernels on this CPU: the L1 load bandwidth against the FMA rate.
// Torch-free, AVX-512 only (prints a line and exits elsewhere):
//   cmake --build build --target rowgroup_limits_bench && build/rowgroup_limits_bench
//
// A row-group segment loop (spmm_rowgroup_impl.h) loads, per column, NV 16-token vectors
// of x (gathered by the column index) and feeds each to the NR rows of its pattern:
// NR x NV FMAs per NV vector loads. Where the core loads fewer than one 64-byte vector per
// FMA cycle, the 1-row columns are load-bound whatever the code does around them. This
// times (1) zmm loads alone, (2) FMAs with a broadcast operand (the FMA rate), (3) the
// segment loop itself for NR = 1..4 rows, NV = 1, 2 (x from an L1/L2-sized panel, sorted
// random columns, values and indices from L1), and (4) from (3) the best rate a uniform
// unstructured matrix could reach at 50% and 70% (each pattern's share of the nonzeros
// at its measured rate), to compare with what the kernel measures (bench_rowgroup.py);
// and (5) the 1-row loop on a panel off 64-byte alignment: every x vector then spans two
// cache lines (the kernels' panels are 64-byte aligned; keep them so).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ROWGROUP_LIMITS_X86 1
#endif

namespace {

template <class F>
double best_seconds(F f, int reps) {
  double best = 1e30;
  for (int r = 0; r < 9; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  return best;
}

#ifdef ROWGROUP_LIMITS_X86
#define AVX512 __attribute__((target("avx512f,avx2,fma"), noinline))

AVX512 void zmm_loads(int n, const float* x) {  // 8 loads per step from a 16 KB window
  for (int i = 0; i < n; ++i) {
    const float* p = x + (i & 31) * 128;
    for (int j = 0; j < 8; ++j) {
      const __m512 v = _mm512_loadu_ps(p + 16 * j);
      __asm__ volatile("" ::"v"(v));
    }
  }
}

AVX512 void fma_broadcast(int n, const float* w, float* out) {  // 8 chains, a broadcast value each
  __m512 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm512_set1_ps(static_cast<float>(j));
  const __m512 x = _mm512_set1_ps(0.999f);
  for (int i = 0; i < n; ++i) {
    const float* p = w + (i & 255) * 8;
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_fmadd_ps(x, _mm512_set1_ps(p[j]), acc[j]);
  }
  for (int j = 0; j < 8; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
}

// The segment loop of a pattern with NR rows over NV vectors of tokens, S accumulator sets.
template <int NR, int NV, int S>
AVX512 void segment(const int32_t* col, const float* v, int n, const float* xp, float* out) {
  __m512 acc[S][NR][NV];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < NV; ++u) acc[s][r][u] = _mm512_setzero_ps();
  for (int i = 0; i < n; i += S)
    for (int s = 0; s < S; ++s) {
      const float* xr = xp + static_cast<int64_t>(col[i + s]) * (NV * 16);
      const float* vv = v + static_cast<int64_t>(i + s) * NR;
      __m512 xv[NV];
      for (int u = 0; u < NV; ++u) xv[u] = _mm512_loadu_ps(xr + 16 * u);
      for (int r = 0; r < NR; ++r) {
        const __m512 wv = _mm512_set1_ps(vv[r]);
        for (int u = 0; u < NV; ++u) acc[s][r][u] = _mm512_fmadd_ps(wv, xv[u], acc[s][r][u]);
      }
    }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < NV; ++u) _mm512_storeu_ps(out + ((s * NR + r) * NV + u) * 16, acc[s][r][u]);
}

// ns per FMA of the segment loop: 4096 columns of a `cols`-column panel, sorted; the panel
// 64-byte aligned (as the kernels' scratch) or `misalign` floats past that.
template <int NR, int NV, int S>
double segment_ns_per_fma(int cols, int misalign = 0) {
  constexpr int n = 4096;
  std::vector<float> storage(static_cast<size_t>(cols) * NV * 16 + 64, 1.0f), v(n * NR, 0.5f), out(S * NR * NV * 16);
  float* xp = storage.data() + ((64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64) / sizeof(float) + misalign;
  std::vector<int32_t> col(n);
  std::mt19937 rng(1);
  for (auto& c : col) c = static_cast<int32_t>(rng() % cols);
  std::sort(col.begin(), col.end());
  const double s = best_seconds([&] { segment<NR, NV, S>(col.data(), v.data(), n, xp, out.data()); }, 500);
  return s / (static_cast<double>(n) * NR * NV) * 1e9;
}

// Share of a uniform matrix's nonzeros in columns of 1..4 rows of a 4-row group, density d.
double nonzero_share(int rows, double d) {
  const double choose[5] = {1, 4, 6, 4, 1};
  return choose[rows] * rows * std::pow(d, rows) * std::pow(1 - d, 4 - rows) / (4 * d);
}
#endif

}  // namespace

int main() {
#ifndef ROWGROUP_LIMITS_X86
  std::printf("rowgroup_limits_bench: x86-64 with AVX-512 only\n");
  return 0;
#else
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("rowgroup_limits_bench: this CPU has no AVX-512F\n");
    return 0;
  }
  std::vector<float> storage((1 << 16) + 16, 1.0f), out(256);
  const float* x = storage.data() + ((64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64) / sizeof(float);
  constexpr int n = 100000;
  const double load_ns = best_seconds([&] { zmm_loads(n, x); }, 10) / (8.0 * n) * 1e9;
  const double fma_ns = best_seconds([&] { fma_broadcast(n, x, out.data()); }, 10) / (8.0 * n) * 1e9;
  std::printf("aligned zmm load (64 B, L1): %.3f ns   zmm FMA with a broadcast operand: %.3f ns   loads per FMA time: %.2f\n",
              load_ns, fma_ns, fma_ns / load_ns);
  // NV = 1: 16 tokens, a 384-column x panel (24 KB); NV = 2: 32 tokens (48 KB). Sets as the kernel's.
  const double rate[2][5] = {
      {0, segment_ns_per_fma<1, 1, 4>(384), segment_ns_per_fma<2, 1, 4>(384), segment_ns_per_fma<3, 1, 2>(384),
       segment_ns_per_fma<4, 1, 2>(384)},
      {0, segment_ns_per_fma<1, 2, 4>(384), segment_ns_per_fma<2, 2, 2>(384), segment_ns_per_fma<3, 2, 2>(384),
       segment_ns_per_fma<4, 2, 1>(384)}};
  for (int nv = 1; nv <= 2; ++nv) {
    std::printf("NV=%d (%2d tokens): GF/s per pattern of", nv, 16 * nv);
    for (int r = 1; r <= 4; ++r) std::printf("  %d row(s) %.0f", r, 32.0 / rate[nv - 1][r]);
    for (double d : {0.5, 0.3}) {
      double ns = 0;  // per FMA of the whole matrix, each pattern at its own rate
      for (int r = 1; r <= 4; ++r) ns += nonzero_share(r, d) * rate[nv - 1][r];
      std::printf("  | uniform %.0f%%: %.0f GF/s", 100 * (1 - d), 32.0 / ns);
    }
    std::printf("\n");
  }
  std::printf("(GF/s of useful multiply-adds, 1 core; the peak is 32 / FMA ns = %.0f)\n", 32.0 / fma_ns);
  std::printf("x panel 4 bytes off 64-byte alignment (every vector across two lines), 1 row, NV=2: %.0f GF/s\n",
              32.0 / segment_ns_per_fma<1, 2, 4>(384, 1));
  return 0;
#endif
}
