// Torch-free randomized test of every bitmask kernel this CPU runs against
// the reference kernel, over odd shapes, empty rows, all-zero and dense
// matrices, 1 token and many, bias and relu, 1 and 2 threads. Exit status 0
// when all agree. Built by CMake as `spmm_bitmask_test` (not installed);
// tests/test_bitmask.py runs it when the build folder has it.
//   spmm_bitmask_test            run the test
//   spmm_bitmask_test bench KERNEL ROWS COLS DENSITY TOKENS [REPEATS]   time one kernel (for perf)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <time.h>

#include "spmm/spmm.h"
#include "spmm/spmm_bitmask.h"

namespace {

struct Packed {
  std::vector<uint16_t> masks;
  std::vector<int64_t> offsets;
  std::vector<float> values;
  sparsert::BitmaskMatrix view(int64_t rows, int64_t cols) const {
    sparsert::BitmaskMatrix w;
    w.rows = rows;
    w.cols = cols;
    w.masks = masks.data();
    w.row_offsets = offsets.data();
    w.values = values.data();
    return w;
  }
};

Packed random_matrix(int64_t rows, int64_t cols, double density, std::mt19937& rng) {
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  const int64_t groups = (cols + 15) / 16;
  Packed p;
  p.masks.assign(rows * groups, 0);
  p.offsets.push_back(0);
  for (int64_t n = 0; n < rows; ++n) {
    const bool empty_row = rows > 3 && (n == rows / 2 || n == rows - 1);
    for (int64_t k = 0; k < cols; ++k) {
      if (empty_row || uni(rng) >= density) continue;
      p.masks[n * groups + k / 16] |= static_cast<uint16_t>(1u << (k % 16));
      p.values.push_back(uni(rng) * 2.f - 1.f);
    }
    p.offsets.push_back(static_cast<int64_t>(p.values.size()));
  }
  p.values.resize(p.values.size() + sparsert::kBitmaskValuePadding, 0.f);
  return p;
}

int run_tests() {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  const struct { int64_t rows, cols; double density; int64_t tokens; } cases[] = {
      {1, 1, 1.0, 1}, {5, 16, 0.5, 1}, {7, 17, 0.5, 3}, {33, 65, 0.5, 2}, {64, 64, 0.7, 16},
      {19, 130, 0.5, 17}, {40, 200, 0.4, 70}, {70, 129, 0.5, 130}, {37, 300, 1.0, 5},
      {37, 300, 0.0, 5}, {6, 1000, 0.05, 33}, {100, 700, 0.3, 64}};
  const sparsert::BitmaskKernelInfo* reference = nullptr;
  for (const auto& k : sparsert::bitmask_kernel_registry())
    if (k.kind == "reference") reference = &k;
  if (!reference) { std::printf("no reference kernel\n"); return 1; }
  int failures = 0, checked = 0;
  for (const auto& c : cases) {
    const Packed p = random_matrix(c.rows, c.cols, c.density, rng);
    const auto w = p.view(c.rows, c.cols);
    std::vector<float> x(c.tokens * c.cols), bias(c.rows), want(c.tokens * c.rows), got(c.tokens * c.rows);
    for (auto& v : x) v = uni(rng);
    for (auto& v : bias) v = uni(rng);
    for (int variant = 0; variant < 4; ++variant) {
      sparsert::SpmmArgs a;
      a.x = x.data();
      a.tokens = c.tokens;
      a.x_row_stride = c.cols;
      a.y_row_stride = c.rows;
      a.bias = variant & 1 ? bias.data() : nullptr;
      a.epilogue = variant & 2 ? sparsert::Epilogue::kRelu : sparsert::Epilogue::kNone;
      a.y = want.data();
      reference->fn(w, a);
      for (const auto& k : sparsert::bitmask_kernel_registry()) {
        if (&k == reference || !sparsert::isa_supported(k.isa)) continue;
        for (int threads : {1, 2}) {
          std::fill(got.begin(), got.end(), NAN);
          a.y = got.data();
          a.num_threads = threads;
          k.fn(w, a);
          ++checked;
          for (size_t i = 0; i < got.size(); ++i) {
            if (!(std::fabs(got[i] - want[i]) <= 1e-4f * (1.f + std::fabs(want[i])))) {
              std::printf("FAIL %s %lldx%lld density %.2f tokens %lld variant %d threads %d: y[%zu] = %g, want %g\n",
                          k.name.c_str(), (long long)c.rows, (long long)c.cols, c.density, (long long)c.tokens,
                          variant, threads, i, got[i], want[i]);
              ++failures;
              break;
            }
          }
        }
      }
    }
  }
  std::printf("%d kernel runs checked, %d failed\n", checked, failures);
  return failures ? 1 : 0;
}

int run_bench(int argc, char** argv) {
  if (argc < 7) { std::fprintf(stderr, "usage: %s bench KERNEL ROWS COLS DENSITY TOKENS [REPEATS]\n", argv[0]); return 2; }
  const std::string name = argv[2];
  const int64_t rows = std::atoll(argv[3]), cols = std::atoll(argv[4]), tokens = std::atoll(argv[6]);
  const double density = std::atof(argv[5]);
  const int repeats = argc > 7 ? std::atoi(argv[7]) : 50;
  const sparsert::BitmaskKernelInfo* kernel = nullptr;
  for (const auto& k : sparsert::bitmask_kernel_registry())
    if (k.name == name) kernel = &k;
  if (!kernel) { std::fprintf(stderr, "unknown kernel %s\n", name.c_str()); return 2; }
  std::mt19937 rng(0);
  const Packed p = random_matrix(rows, cols, density, rng);
  std::vector<float> x(tokens * cols, 0.5f), y(tokens * rows);
  sparsert::SpmmArgs a;
  a.x = x.data(); a.tokens = tokens; a.x_row_stride = cols; a.y = y.data(); a.y_row_stride = rows;
  const auto w = p.view(rows, cols);
  // CPU time of this thread (one thread: a.num_threads = 1): robust when
  // other jobs share the cores. Median of the repeats.
  auto now = [] {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  };
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    const double t0 = now();
    kernel->fn(w, a);
    times.push_back(now() - t0);
  }
  std::sort(times.begin(), times.end());
  std::printf("%s %lldx%lld density %.2f tokens %lld: %.1f us (thread CPU time, median of %d)\n", name.c_str(),
              (long long)rows, (long long)cols, density, (long long)tokens, times[times.size() / 2] * 1e6, repeats);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "bench") return run_bench(argc, argv);
  return run_tests();
}
