// Times one conv registry kernel on a random sparse weight and image,
// torch-free, reporting the minimum over repeats (robust on a shared
// machine). For kernel tuning:
//   build/conv_bench KERNEL CIN H W COUT K DENSITY [STRIDE PAD R C BATCH THREADS REPEATS]
// e.g. build/conv_bench f32_conv_csr_avx2 64 56 56 64 3 0.1 1 1
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "conv/conv.h"

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr,
                 "usage: %s KERNEL CIN H W COUT K DENSITY [STRIDE PAD R C BATCH THREADS REPEATS]\n",
                 argv[0]);
    return 2;
  }
  const std::string name = argv[1];
  auto arg = [&](int i, long long fallback) { return argc > i ? std::atoll(argv[i]) : fallback; };
  sparsert::ConvShape sh;
  sh.in_channels = arg(2, 0);
  sh.height = arg(3, 0);
  sh.width = arg(4, 0);
  sh.out_channels = arg(5, 0);
  sh.kernel_h = sh.kernel_w = static_cast<int>(arg(6, 1));
  const double density = std::atof(argv[7]);
  sh.stride_h = sh.stride_w = static_cast<int>(arg(8, 1));
  sh.pad_h = sh.pad_w = static_cast<int>(arg(9, 0));
  const int R = static_cast<int>(arg(10, 1)), C = static_cast<int>(arg(11, 1));
  sh.batch = arg(12, 1);
  const int threads = static_cast<int>(arg(13, 1));
  const int repeats = static_cast<int>(arg(14, 20));

  const sparsert::ConvKernelInfo* kernel = nullptr;
  for (const auto& k : sparsert::conv_kernel_registry())
    if (k.name == name) kernel = &k;
  if (!kernel) { std::fprintf(stderr, "unknown conv kernel %s\n", name.c_str()); return 2; }

  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  sparsert::BlockSparseMatrix w;
  w.rows = sh.out_channels;
  w.cols = sh.patch();
  w.block_rows = R;
  w.block_cols = C;
  const int64_t nbr = w.block_row_count(), nbc = w.block_col_count();
  std::vector<int32_t> row_ptr(nbr + 1, 0);
  std::vector<int32_t> col;
  std::vector<float> values;
  for (int64_t br = 0; br < nbr; ++br) {
    for (int64_t bc = 0; bc < nbc; ++bc) {
      if (uni(rng) < density) {
        col.push_back(static_cast<int32_t>(bc));
        for (int i = 0; i < R * C; ++i) values.push_back(uni(rng) - 0.5f);
      }
    }
    row_ptr[br + 1] = static_cast<int32_t>(col.size());
  }
  w.row_ptr = row_ptr.data();
  w.col_idx = col.data();
  w.index_bits = 32;
  w.values = values.data();
  const std::string problem = sparsert::conv_check(*kernel, w, sh);
  if (!problem.empty()) { std::fprintf(stderr, "%s\n", problem.c_str()); return 2; }

  std::vector<float> x(sh.batch * sh.in_channels * sh.height * sh.width);
  std::vector<float> y(sh.batch * sh.out_channels * sh.out_h() * sh.out_w());
  for (auto& v : x) v = uni(rng);
  sparsert::ConvArgs a;
  a.x = x.data();
  a.y = y.data();
  a.num_threads = threads;
  double best = 1e30;
  for (int i = 0; i < repeats + 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    kernel->fn(w, sh, a);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i >= 3) best = std::min(best, s);
  }
  // FLOPs of the stored weight over every output pixel.
  const double flops = 2.0 * values.size() * sh.batch * sh.out_h() * sh.out_w();
  std::printf("%s %lldx%lldx%lld -> %lld k%d s%d d=%.3f N=%lld: %.1f us, %.1f GFLOP/s (stored nnz %zu)\n",
              name.c_str(), (long long)sh.in_channels, (long long)sh.height, (long long)sh.width,
              (long long)sh.out_channels, sh.kernel_h, sh.stride_h, density, (long long)sh.batch, best * 1e6,
              flops / best * 1e-9, values.size());
  return 0;
}
