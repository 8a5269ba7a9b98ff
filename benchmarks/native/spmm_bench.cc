// Times one registry kernel on a random matrix, torch-free, reporting the
// minimum over repeats (robust on a shared machine). For kernel tuning:
//   build/spmm_bench KERNEL ROWS COLS DENSITY TOKENS [R C THREADS REPEATS]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "spmm/spmm.h"

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s KERNEL ROWS COLS DENSITY TOKENS [R C THREADS REPEATS]\n", argv[0]);
    return 2;
  }
  const std::string name = argv[1];
  const int64_t rows = std::atoll(argv[2]), cols = std::atoll(argv[3]);
  const double density = std::atof(argv[4]);
  const int64_t tokens = std::atoll(argv[5]);
  const int R = argc > 6 ? std::atoi(argv[6]) : 1, C = argc > 7 ? std::atoi(argv[7]) : 1;
  const int threads = argc > 8 ? std::atoi(argv[8]) : 1;
  const int repeats = argc > 9 ? std::atoi(argv[9]) : 50;

  const sparsert::KernelInfo* kernel = nullptr;
  for (const auto& k : sparsert::kernel_registry())
    if (k.name == name) kernel = &k;
  if (!kernel) { std::fprintf(stderr, "unknown kernel %s\n", name.c_str()); return 2; }

  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  const int64_t nbr = (rows + R - 1) / R, nbc = (cols + C - 1) / C;
  std::vector<int32_t> row_ptr(nbr + 1, 0);
  std::vector<uint16_t> col;
  std::vector<float> values;
  for (int64_t br = 0; br < nbr; ++br) {
    for (int64_t bc = 0; bc < nbc; ++bc) {
      if (uni(rng) < density) {
        col.push_back(static_cast<uint16_t>(bc));
        for (int i = 0; i < R * C; ++i) values.push_back(uni(rng) - 0.5f);
      }
    }
    row_ptr[br + 1] = static_cast<int32_t>(col.size());
  }
  std::vector<float> x(tokens * cols), y(tokens * rows);
  for (auto& v : x) v = uni(rng);
  sparsert::BlockSparseMatrix w;
  w.rows = rows; w.cols = cols; w.block_rows = R; w.block_cols = C;
  w.row_ptr = row_ptr.data(); w.col_idx = col.data(); w.index_bits = 16; w.values = values.data();
  sparsert::SpmmArgs a;
  a.x = x.data(); a.tokens = tokens; a.x_row_stride = cols; a.y = y.data(); a.y_row_stride = rows;
  a.num_threads = threads;
  double best = 1e30;
  for (int i = 0; i < repeats + 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    kernel->fn(w, a);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i >= 3) best = std::min(best, s);
  }
  const double flops = 2.0 * values.size() * tokens;
  std::printf("%s %lldx%lld d=%.3f T=%lld: %.1f us, %.1f GFLOP/s (stored nnz %zu)\n", name.c_str(),
              (long long)rows, (long long)cols, density, (long long)tokens, best * 1e6, flops / best * 1e-9,
              values.size());
  return 0;
}
