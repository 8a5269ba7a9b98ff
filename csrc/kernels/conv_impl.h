// Sparse convolution kernels, written once over SIMD vectors and compiled per
// ISA by conv_scalar.cc / conv_avx2.cc / conv_avx512.cc, which include
// spmm_impl.h first (for spmm_tile, the register-tile micro-kernel shared with
// the Linear kernels) and then this file.
//
// Layout (XNNPACK's NCHW sparse inference design): an output tile is P = NV *
// VW consecutive output pixels of one channel row of W, so the sparse weight
// row is the outer loop and each nonzero multiplies NV contiguous vectors of
// pixels. No transpose and no im2col buffer:
//
//   pointwise  (1x1, stride 1, no padding)  Y_n (Cout x HW) = W (Cout x Cin) X_n (Cin x HW),
//              read in place: x row k is channel k of the image (x_stride = H*W).
//              The last tile (HW not a multiple of P) reads a zero-padded
//              copy of its few pixels, so nothing past the image is read.
//   conv       (any KxK, stride, padding, dilation, groups): the image is
//              copied once per call into a zero-padded input split into
//              stride phases, xq[phase (py,px)][c][Hq][Wq] with
//              xq[.][c][i][j] = xpad[c][i*sh+py][j*sw+px]. Then every tap
//              (ci, ky, kx) of output pixel q = oy*Wq + ox reads
//              xq + off(ci,ky,kx) + q: a stride-1 1x1 convolution over the flat
//              index q, whose per-nonzero offsets are computed once per call
//              (implicit im2col). Columns ox in [OW, Wq) are computed and
//              dropped (Wq - OW is at most about pad/stride + 1 per row).
//
// R x C blocks with C > 1 are expanded once per call to C blocks of R x 1
// (same FMAs, same register reuse of the pixel vectors).
// Threads split (group, pixel tile, block-row range) work items evenly; the
// block-row ranges are cut at equal nonzero counts when there are few tiles.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparsert/conv.h"

// spmm_impl.h switched its target off at its end; switch it on again.
#include "isa_target_begin.inc"

namespace sparsert {
namespace SPARSERT_ISA {

// spmm_tile over only `nv` (<= NV) vectors of pixels, for the last tile.
template <int R, int RT, int NV, int S, typename Idx>
static inline void conv_tile_nv(int nv, const int32_t* row_ptr, const Idx* idx, const float* values,
                                const float* x, int64_t x_stride, int64_t br, int r0,
                                const float* bias_rows, bool relu_out, float* out,
                                int64_t out_stride) {
  if constexpr (NV > 1) {
    if (nv < NV) {
      conv_tile_nv<R, RT, NV - 1, S, Idx>(nv, row_ptr, idx, values, x, x_stride, br, r0, bias_rows,
                                          relu_out, out, out_stride);
      return;
    }
  }
  (void)nv;
  spmm_tile<R, 1, RT, NV, S, Idx>(row_ptr, idx, values, x, x_stride, br, r0, bias_rows, relu_out,
                                  out, out_stride);
}

// The weight as R x 1 blocks (C == 1: the caller's arrays; else expanded).
template <typename Idx>
struct RowBlocks {
  const int32_t* row_ptr;
  const Idx* idx;        // k (pointwise) or xq offset of k (conv), per block
  const float* values;   // R floats per block
};

// Expands R x C blocks into R x 1 blocks, dropping columns past `cols`.
// Writes k (the flattened weight column) for each new block.
template <int R, int C, typename Idx>
static void expand_blocks(const BlockSparseMatrix& w, std::vector<int32_t>& row_ptr,
                          std::vector<int32_t>& ks, std::vector<float>& values) {
  const int64_t nbr = w.block_row_count();
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);
  const int64_t nblocks = w.row_ptr[nbr];
  row_ptr.resize(nbr + 1);
  ks.resize(nblocks * C);
  values.resize(nblocks * C * R);
  int64_t e = 0;
  row_ptr[0] = 0;
  for (int64_t br = 0; br < nbr; ++br) {
    for (int32_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
      const float* blk = w.values + static_cast<int64_t>(b) * R * C;
      for (int c = 0; c < C; ++c) {
        const int64_t k = static_cast<int64_t>(col_idx[b]) * C + c;
        if (k >= w.cols) break;
        ks[e] = static_cast<int32_t>(k);
        for (int r = 0; r < R; ++r) values[e * R + r] = blk[r * C + c];
        ++e;
      }
    }
    row_ptr[br + 1] = static_cast<int32_t>(e);
  }
}

// The work of one call, on R x 1 blocks whose idx are input-row selectors:
// x row of block b, for group g and tile q0, is xg + idx[b] * x_stride + q0.
// image(n, threads) returns image n's dense operand (the image itself, or a
// copy it builds with `threads` threads into thread_local storage).
// When the threads split block rows (few pixel tiles), every thread reads
// every channel: a shared copy would send the half another core wrote
// across the caches on every call, which costs more than building a private
// copy in each thread (7x7 pointwise: 2 threads were slower than 1). So each
// thread then calls image(n, 1) itself.
template <int R, int RT, int NV, int S, typename Idx, typename Image>
static void conv_compute(const RowBlocks<Idx>& w, const ConvShape& sh, const ConvArgs& a,
                         const Image& image, int64_t x_group_stride, int64_t x_stride,
                         int64_t flat, int64_t wq, bool pointwise,
                         const int32_t* slab_offsets = nullptr) {
  constexpr int P = NV * VW;
  const int64_t G = sh.groups, cout_g = sh.out_channels_per_group();
  const int64_t cin_g = sh.in_channels_per_group();
  const int64_t oh = sh.out_h(), ow = sh.out_w(), ohw = oh * ow;
  // Block rows per group (groups > 1 needs cout_g % R == 0; groups == 1 may
  // have a last block row sticking out of the matrix).
  const int64_t nbr_g = (cout_g + R - 1) / R;
  const int64_t ntiles = (flat + P - 1) / P;
  const int threads = std::max(1, a.num_threads);
  const bool relu_out = a.activation == Activation::kRelu;
  const bool out_in_place = wq == ow;  // no dropped columns: tiles map to y directly

  // Row parts per (group, tile): enough items to keep every thread busy.
  const int64_t base_items = G * ntiles;
  int rparts = 1;
  if (base_items < 8 * threads)
    rparts = static_cast<int>(std::min<int64_t>(nbr_g, (8 * threads + base_items - 1) / base_items));
  rparts = std::max(rparts, 1);
  std::vector<std::vector<int64_t>> bounds(G);
  for (int64_t g = 0; g < G; ++g) balanced_ranges(w.row_ptr + g * nbr_g, nbr_g, rparts, bounds[g]);
  const int64_t items = base_items * rparts;

  const bool private_images = rparts > 1 && threads > 1;
  for (int64_t n = 0; n < sh.batch; ++n) {
    const float* shared_image = private_images ? nullptr : image(n, threads);
    float* yimg = a.y + n * sh.out_channels * ohw;
    // Many pixel tiles: each thread takes a contiguous run of them, so
    // neighbouring tiles (which share input rows and output cache lines)
    // stay on one core; dynamic claiming interleaved them and cost up to
    // 1.8x at 112x112. Few tiles split into row parts: items are claimed
    // dynamically, since a short last tile made a static split uneven.
    std::atomic<int64_t> next_item{0};
    parallel_run(threads, [&](int tid, int nt) {
      const float* ximg = private_images ? image(n, 1) : shared_image;
      static thread_local Scratch out_scratch, panel_scratch, slab_scratch;
      float* tile_out = out_scratch.get(static_cast<size_t>(R) * P);
      const int64_t patch = sh.patch();
      float* slab = slab_offsets ? slab_scratch.get(static_cast<size_t>(patch) * P) : nullptr;
      int64_t slab_key = -1;  // (group, tile) the slab holds
      const auto run_item = [&](int64_t it) {
        const int64_t rp = it % rparts;
        const int64_t tile = (it / rparts) % ntiles;
        const int64_t g = it / (rparts * ntiles);
        const int64_t q0 = tile * P;
        const int64_t valid = std::min<int64_t>(P, flat - q0);
        const int nv = static_cast<int>((valid + VW - 1) / VW);
        const float* xg = ximg + g * x_group_stride;
        const float* x = xg + q0;
        int64_t xs = x_stride;
        if (slab_offsets) {
          // The tile's im2col slab: row k holds the P pixels tap k reads,
          // copied once per tile so that every nonzero then loads aligned,
          // contiguous vectors (in place, tap offsets split cache lines).
          const int64_t key = g * ntiles + tile;
          if (key != slab_key) {
            for (int64_t k = 0; k < patch; ++k)
              for (int v = 0; v < nv; ++v)
                store(slab + k * P + v * VW, load(x + slab_offsets[k] + v * VW));
            slab_key = key;
          }
          x = slab;
          xs = P;
        } else if (pointwise && valid < P) {
          // Last tile of an in-place image: copy its pixels, zero padded.
          const int64_t width = static_cast<int64_t>(nv) * VW;
          float* panel = panel_scratch.get(static_cast<size_t>(cin_g) * width);
          for (int64_t k = 0; k < cin_g; ++k) {
            std::memcpy(panel + k * width, xg + k * x_stride + q0, sizeof(float) * valid);
            std::memset(panel + k * width + valid, 0, sizeof(float) * (width - valid));
          }
          x = panel;
          xs = width;
        }
        float* yg = yimg + g * cout_g * ohw;
        const float* bias_g = a.bias ? a.bias + g * cout_g : nullptr;
        const int32_t* row_ptr = w.row_ptr + g * nbr_g;
        const int64_t br_begin = bounds[g][rp], br_end = bounds[g][rp + 1];
        for (int64_t br = br_begin; br < br_end; ++br) {
          const int64_t row0 = br * R;
          const int rows_here = static_cast<int>(std::min<int64_t>(R, cout_g - row0));
          const bool direct = out_in_place && valid == P && rows_here == R;
          float* out = direct ? yg + row0 * ohw + q0 : tile_out;
          const int64_t out_stride = direct ? ohw : P;
          for (int r0 = 0; r0 < R; r0 += RT) {
            float bias_tile[RT];
            const float* bias_rows = nullptr;
            if (bias_g) {
              for (int r = 0; r < RT; ++r)
                bias_tile[r] = row0 + r0 + r < cout_g ? bias_g[row0 + r0 + r] : 0.0f;
              bias_rows = bias_tile;
            }
            float* o = out + r0 * out_stride;
            if (valid == P)
              spmm_tile<R, 1, RT, NV, S, Idx>(row_ptr, w.idx, w.values, x, xs, br, r0, bias_rows,
                                              relu_out, o, out_stride);
            else
              conv_tile_nv<R, RT, NV, S, Idx>(nv, row_ptr, w.idx, w.values, x, xs, br, r0,
                                              bias_rows, relu_out, o, out_stride);
          }
          if (direct) continue;
          // Copy the tile's valid pixels and rows into y.
          for (int r = 0; r < rows_here; ++r) {
            const float* src = tile_out + r * P;
            float* dst = yg + (row0 + r) * ohw;
            if (out_in_place) {
              std::memcpy(dst + q0, src, sizeof(float) * valid);
              continue;
            }
            int64_t q = q0;
            while (q < q0 + valid) {
              const int64_t oy = q / wq, ox = q % wq;
              const int64_t run = std::min<int64_t>(wq - ox, q0 + valid - q);
              if (ox < ow && oy < oh)
                std::memcpy(dst + oy * ow + ox, src + (q - q0),
                            sizeof(float) * std::min<int64_t>(run, ow - ox));
              q += run;
            }
          }
        }
      };
      if (private_images) {
        for (int64_t it = next_item.fetch_add(1, std::memory_order_relaxed); it < items;
             it = next_item.fetch_add(1, std::memory_order_relaxed))
          run_item(it);
      } else {
        for (int64_t it = items * tid / nt; it < items * (tid + 1) / nt; ++it) run_item(it);
      }
    });
  }
}

// Pointwise: the image is the dense operand. When H*W is not a multiple of the
// vector width, channel rows start misaligned and most loads split cache
// lines: then each image is first copied with its rows padded to whole
// vectors (zeros), which also makes the last tile read inside the buffer.
template <int R, int RT, int NV, int S, typename Idx>
static void pointwise_blocks(const RowBlocks<Idx>& rb, const ConvShape& sh, const ConvArgs& a) {
  const int64_t hw = sh.height * sh.width;
  const int64_t cin_g = sh.in_channels_per_group();
  if (hw % VW == 0) {
    const auto image = [&](int64_t n, int) { return a.x + n * sh.in_channels * hw; };
    conv_compute<R, RT, NV, S, Idx>(rb, sh, a, image, cin_g * hw, hw, hw, sh.width, true);
    return;
  }
  const int64_t stride = (hw + VW - 1) / VW * VW;
  const auto image = [&](int64_t n, int threads) -> const float* {
    static thread_local Scratch padded;
    float* xp = padded.get(static_cast<size_t>(sh.in_channels) * stride);
    const float* x = a.x + n * sh.in_channels * hw;
    parallel_run(threads, [&](int tid, int nt) {
      for (int64_t c = sh.in_channels * tid / nt; c < sh.in_channels * (tid + 1) / nt; ++c) {
        std::memcpy(xp + c * stride, x + c * hw, sizeof(float) * hw);
        std::memset(xp + c * stride + hw, 0, sizeof(float) * (stride - hw));
      }
    });
    return xp;
  };
  conv_compute<R, RT, NV, S, Idx>(rb, sh, a, image, cin_g * stride, stride, hw, sh.width, false);
}

template <int R, int C, int RT, int NV, int S, typename Idx>
static void pointwise_run(const BlockSparseMatrix& w, const ConvShape& sh, const ConvArgs& a) {
  if constexpr (C == 1) {
    RowBlocks<Idx> rb{w.row_ptr, static_cast<const Idx*>(w.col_idx), w.values};
    pointwise_blocks<R, RT, NV, S, Idx>(rb, sh, a);
  } else {
    static thread_local std::vector<int32_t> row_ptr, ks;
    static thread_local std::vector<float> values;
    expand_blocks<R, C, Idx>(w, row_ptr, ks, values);
    RowBlocks<int32_t> rb{row_ptr.data(), ks.data(), values.data()};
    pointwise_blocks<R, RT, NV, S, int32_t>(rb, sh, a);
  }
}

// Geometry of the zero-padded, phase-split input copy. Only the stride
// phases some tap reads are stored (a 1x1 stride-2 convolution keeps one
// quarter of the input), in slots [0, slots).
struct PhaseLayout {
  int64_t hq, wq, plane;  // rows, columns, floats of one channel of one phase
  int64_t slots;          // stored phases
  std::vector<int> slot;  // phase (py * stride_w + px) -> slot, or -1
  // xq offset of flattened weight column k, for a group's first channel.
  int64_t offset(const ConvShape& sh, int64_t cin, int64_t k) const {
    const int64_t taps = static_cast<int64_t>(sh.kernel_h) * sh.kernel_w;
    const int64_t ci = k / taps, t = k % taps;
    const int64_t ry = (t / sh.kernel_w) * sh.dilation_h, rx = (t % sh.kernel_w) * sh.dilation_w;
    const int64_t phase = (ry % sh.stride_h) * sh.stride_w + rx % sh.stride_w;
    return (slot[phase] * cin + ci) * plane + (ry / sh.stride_h) * wq + rx / sh.stride_w;
  }
};

inline PhaseLayout phase_layout(const ConvShape& sh) {
  PhaseLayout l;
  const int64_t hp = sh.height + 2 * sh.pad_h, wp = sh.width + 2 * sh.pad_w;
  l.hq = (hp + sh.stride_h - 1) / sh.stride_h;
  l.wq = (wp + sh.stride_w - 1) / sh.stride_w;
  l.plane = l.hq * l.wq;
  l.slot.assign(static_cast<size_t>(sh.stride_h) * sh.stride_w, -1);
  for (int ky = 0; ky < sh.kernel_h; ++ky)
    for (int kx = 0; kx < sh.kernel_w; ++kx)
      l.slot[((ky * sh.dilation_h) % sh.stride_h) * sh.stride_w + (kx * sh.dilation_w) % sh.stride_w] = 0;
  l.slots = 0;
  for (int& sl : l.slot)
    if (sl == 0) sl = static_cast<int>(l.slots++);
  return l;
}

// Fills xq (one image) from x, in parallel over (phase, channel).
inline void build_phases(const ConvShape& sh, const PhaseLayout& l, const float* x, float* xq,
                         int threads) {
  const int64_t C = sh.in_channels, H = sh.height, W = sh.width;
  std::vector<int64_t> phase_of(l.slots);
  for (size_t ph = 0; ph < l.slot.size(); ++ph)
    if (l.slot[ph] >= 0) phase_of[l.slot[ph]] = static_cast<int64_t>(ph);
  const int64_t jobs = l.slots * C;
  parallel_run(threads, [&](int tid, int nt) {
    for (int64_t job = jobs * tid / nt; job < jobs * (tid + 1) / nt; ++job) {
      const int64_t phase = phase_of[job / C], c = job % C;
      const int64_t py = phase / sh.stride_w, px = phase % sh.stride_w;
      const float* src = x + c * H * W;
      float* dst = xq + job * l.plane;
      // Columns j with a source pixel: j*sw + px - pad_w in [0, W).
      int64_t j0 = 0;
      while (j0 < l.wq && j0 * sh.stride_w + px - sh.pad_w < 0) ++j0;
      int64_t j1 = j0;
      while (j1 < l.wq && j1 * sh.stride_w + px - sh.pad_w < W) ++j1;
      for (int64_t i = 0; i < l.hq; ++i) {
        float* row = dst + i * l.wq;
        const int64_t y = i * sh.stride_h + py - sh.pad_h;
        if (y < 0 || y >= H || j0 >= j1) {
          std::memset(row, 0, sizeof(float) * l.wq);
          continue;
        }
        std::memset(row, 0, sizeof(float) * j0);
        const float* s = src + y * W + (j0 * sh.stride_w + px - sh.pad_w);
        if (sh.stride_w == 1) {
          std::memcpy(row + j0, s, sizeof(float) * (j1 - j0));
        } else {
          for (int64_t j = j0; j < j1; ++j) row[j] = s[(j - j0) * sh.stride_w];
        }
        std::memset(row + j1, 0, sizeof(float) * (l.wq - j1));
      }
    }
  });
}

// Slab uses per element (nonzero R x 1 blocks per group and patch column)
// from which a CSR tile copies its im2col slab instead of reading in place.
constexpr int64_t kSlabMinUses = 10;

// Any convolution: phase-split padded copy, read in place at per-nonzero
// offsets or through a per-tile im2col slab.
template <int R, int C, int RT, int NV, int S, typename Idx>
static void conv_run(const BlockSparseMatrix& w, const ConvShape& sh, const ConvArgs& a) {
  constexpr int P = NV * VW;
  const PhaseLayout l = phase_layout(sh);
  const int64_t cin_g = sh.in_channels_per_group();

  static thread_local std::vector<int32_t> table;  // column k -> xq offset
  table.resize(sh.patch());
  for (int64_t k = 0; k < sh.patch(); ++k) table[k] = static_cast<int32_t>(l.offset(sh, sh.in_channels, k));

  // xq for one image, with slack so the last tile of the last group reads
  // inside the buffer (those lanes land in dropped columns).
  const int64_t flat = sh.out_h() * l.wq;
  const int64_t ntiles = (flat + P - 1) / P;
  const int64_t planes = l.slots * sh.in_channels * l.plane;
  // An upper bound of every tap offset: last slot, last channel, last tap row/column.
  const int64_t max_off = (l.slots - 1) * sh.in_channels * l.plane + (cin_g - 1) * l.plane +
                                 ((sh.kernel_h - 1) * sh.dilation_h / sh.stride_h) * l.wq +
                                 (sh.kernel_w - 1) * sh.dilation_w / sh.stride_w;
  const int64_t reach = (sh.groups - 1) * cin_g * l.plane + max_off + ntiles * P;
  const int64_t size = std::max(planes, reach);
  const auto image = [&](int64_t n, int threads) -> const float* {  // one image at a time
    static thread_local Scratch xq_scratch;
    float* xq = xq_scratch.get(static_cast<size_t>(size));
    std::memset(xq + planes, 0, sizeof(float) * (size - planes));
    build_phases(sh, l, a.x + n * sh.in_channels * sh.height * sh.width, xq, threads);
    return xq;
  };
  const auto in_place = [&](const auto& rb) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(rb.idx)>>;
    conv_compute<R, RT, NV, S, I>(rb, sh, a, image, cin_g * l.plane, 1, flat, l.wq, false);
  };
  // Slab tiles are at most 32 pixels wide, with the accumulator sets that
  // keep as many FMA chains: a 64-pixel slab of 512 input channels (1.2 MB)
  // overflows L2, and at 32 pixels ResNet-50 / VGG-16 3x3 csr layers ran up
  // to 15% faster (none slower by more than the noise).
  constexpr int kSlabNV = std::min(NV, std::max(1, 32 / VW));
  constexpr int kSlabS = std::min(4, S * NV / kSlabNV);
  const auto through_slab = [&](const auto& rb) {
    using I = std::remove_cv_t<std::remove_pointer_t<decltype(rb.idx)>>;
    conv_compute<R, RT, kSlabNV, kSlabS, I>(rb, sh, a, image, cin_g * l.plane, 1, flat, l.wq, false,
                                            table.data());
  };
  // The weight as R x 1 blocks: the caller's arrays (C == 1) or expanded.
  static thread_local std::vector<int32_t> row_ptr_x, ks, offs;
  static thread_local std::vector<float> values_x;
  if constexpr (C > 1) expand_blocks<R, C, Idx>(w, row_ptr_x, ks, values_x);
  const int32_t* row_ptr = C == 1 ? w.row_ptr : row_ptr_x.data();
  const float* values = C == 1 ? w.values : values_x.data();
  const auto* col_idx = static_cast<const Idx*>(w.col_idx);
  const int64_t nblocks = C == 1 ? w.row_ptr[w.block_row_count()] : static_cast<int64_t>(ks.size());

  // Single-row blocks load one vector per FMA, and in place most of those
  // loads split cache lines. When each slab element then feeds enough FMAs,
  // a per-tile im2col slab (aligned rows, selected by weight column) pays
  // for its copy: ResNet-50 / VGG-16 3x3 csr at 80-90%, 1 thread, 5-17%
  // faster; at 64 output channels and 90% (6 uses) up to 13% slower, and
  // 4x1 blocks (one load per 4 FMAs) 5-30% slower, so they stay in place.
  if constexpr (R == 1) {
    if (nblocks >= kSlabMinUses * sh.groups * sh.patch()) {
      if constexpr (C == 1) through_slab(RowBlocks<Idx>{row_ptr, col_idx, values});
      else through_slab(RowBlocks<int32_t>{row_ptr, ks.data(), values});
      return;
    }
  }
  // In place: each block reads xq at its column's offset.
  offs.resize(nblocks);
  for (int64_t b = 0; b < nblocks; ++b) offs[b] = table[C == 1 ? static_cast<int64_t>(col_idx[b]) : ks[b]];
  in_place(RowBlocks<int32_t>{row_ptr, offs.data(), values});
}

// With at least as many images as threads, each thread convolves whole
// images on its own: one fork-join per call instead of one or two per image
// (which dominate for small images, e.g. a batch of 8x8 digits). Otherwise
// the threads share each image.
template <void (*Run)(const BlockSparseMatrix&, const ConvShape&, const ConvArgs&)>
static void by_image(const BlockSparseMatrix& w, const ConvShape& sh, const ConvArgs& a) {
  const int threads = std::max(1, a.num_threads);
  if (threads == 1 || sh.batch < threads) return Run(w, sh, a);
  const int64_t x_image = sh.in_channels * sh.height * sh.width;
  const int64_t y_image = sh.out_channels * sh.out_h() * sh.out_w();
  parallel_run(threads, [&](int tid, int nt) {
    const int64_t begin = sh.batch * tid / nt, end = sh.batch * (tid + 1) / nt;
    if (begin == end) return;
    ConvShape part = sh;
    part.batch = end - begin;
    ConvArgs one = a;
    one.x = a.x + begin * x_image;
    one.y = a.y + begin * y_image;
    one.num_threads = 1;
    Run(w, part, one);
  });
}

template <int R, int C, int RT, int NV, int S>
static void pointwise_kernel(const BlockSparseMatrix& w, const ConvShape& sh, const ConvArgs& a) {
  if (w.index_bits == 16) by_image<pointwise_run<R, C, RT, NV, S, uint16_t>>(w, sh, a);
  else by_image<pointwise_run<R, C, RT, NV, S, int32_t>>(w, sh, a);
}

template <int R, int C, int RT, int NV, int S>
static void conv_kernel(const BlockSparseMatrix& w, const ConvShape& sh, const ConvArgs& a) {
  if (w.index_bits == 16) by_image<conv_run<R, C, RT, NV, S, uint16_t>>(w, sh, a);
  else by_image<conv_run<R, C, RT, NV, S, int32_t>>(w, sh, a);
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert

// Registration runs on every CPU, so it is compiled for the baseline ISA: an
// AVX-512 string copy here crashed the registry on AVX2-only CPUs.
#include "isa_target_end.inc"

namespace sparsert {
namespace SPARSERT_ISA {

// Registers the pointwise and the general kernel for R x C blocks.
template <int R, int C, int RT, int NV, int S>
void add_conv_tile(std::vector<ConvKernelInfo>& out) {
  const std::string isa = SPARSERT_STR(SPARSERT_ISA);
  out.push_back({"f32_conv1x1_" + tile_name(R, C) + "_" + isa, isa, "pointwise", R, C,
                 &pointwise_kernel<R, C, RT, NV, S>});
  out.push_back({"f32_conv_" + tile_name(R, C) + "_" + isa, isa, "conv", R, C,
                 &conv_kernel<R, C, RT, NV, S>});
}

}  // namespace SPARSERT_ISA
}  // namespace sparsert
