// The product of a few rows with a large weight, y = x·Wᵀ (a Linear, or a 1×1 convolution on a 1×1 map, at a small
// batch): each weight row is read once, from memory, and meets every row of x while in registers. Such a product is
// bound by the weight's bytes; MKL's GEMM and GEMV read them at 17-30 GB/s on the Zen 5 VM (MKL runs AVX2 code
// there, common/onednn.h) and oneDNN's inner product pays a fixed cost on small ones, where this kernel streams at
// 50-90 GB/s (bench/NOTES-conv_bn_relu.md, stop 42: vgg's 25088→4096 at batch 1 9.5 vs 14.4 ms for F.linear,
// MobileNetV3's squeeze-excitation 960→240 7 vs 14 µs). Parallel over blocks of weight rows (output features): each
// thread streams its own part of W; one output is one dot product, summed in a fixed order (deterministic).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "ops/conv_bn_relu/linear.h"

namespace pyops {
namespace PYOPS_CPU_ISA {  // (common/cpu_isa.h: built once per instruction set)
namespace {

using Vec = Vectorized<float>;

// Weight rows per tile, and rows of x per tile: kRows·kBatch accumulators, kRows weight vectors and one x vector in
// registers (AVX-512's 32: 16 + 4 + 1; AVX2's 16: 8 + 4 + 1).
constexpr int kRows = 4;
constexpr int kBatch = Vec::size() >= 16 ? 4 : 2;

// acc[r][b] += w[r]·x[b] over one vector of a row (`count` values; a partial load zero-fills the rest).
template <int R, int B, bool Full>
inline void accumulate(Vec (&acc)[R][B], const float* x, int64_t ldx, const float* w, int64_t k, int64_t i,
                       int64_t count) {
  Vec wv[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) wv[r] = Full ? Vec::loadu(w + r * k + i) : Vec::loadu(w + r * k + i, count);
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) {
    const Vec xv = Full ? Vec::loadu(x + b * ldx + i) : Vec::loadu(x + b * ldx + i, count);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][b] = at::vec::fmadd(wv[r], xv, acc[r][b]);
  }
}

// y[b][r] = x[b]·w[r] for R weight rows and B rows of x (strides ldx, ldy), over the k values of a row. Every loop
// over the tile is unrolled: GCC keeps the accumulators in registers only then (a loop left rolled kept them in
// memory, 2.5x slower; conv1d_cpu_correlate.cpp met the same).
template <int R, int B>
void tile(const float* x, int64_t ldx, const float* w, int64_t k, float* y, int64_t ldy) {
  Vec acc[R][B];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) acc[r][b] = Vec(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= k; i += Vec::size()) accumulate<R, B, true>(acc, x, ldx, w, k, i, Vec::size());
  if (i < k) accumulate<R, B, false>(acc, x, ldx, w, k, i, k - i);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) y[b * ldy + r] = hsum(acc[r][b]);
}

// The tiles of weight rows [r, r + R) for every row of x, B at a time.
template <int R>
void row_block(const float* x, int64_t ldx, int64_t m, const float* w, int64_t k, float* y, int64_t ldy) {
  int64_t b = 0;
  for (; b + kBatch <= m; b += kBatch) tile<R, kBatch>(x + b * ldx, ldx, w, k, y + b * ldy, ldy);
  for (; b < m; ++b) tile<R, 1>(x + b * ldx, ldx, w, k, y + b * ldy, ldy);
}

}  // namespace

void small_batch_product_cpu(const float* x, int64_t ldx, int64_t m, const float* w, int64_t n, int64_t k, float* y) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  // ~64K multiply-adds a task: a small product runs on the calling thread (a wake-up costs more than it).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(kRows * k * m, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r = blk * kRows;
      if (r + kRows <= n) {
        row_block<kRows>(x, ldx, m, w + r * k, k, y + r, n);
      } else {
        for (int64_t t = r; t < n; ++t) row_block<1>(x, ldx, m, w + t * k, k, y + t, n);
      }
    }
  });
}

}  // namespace PYOPS_CPU_ISA
}  // namespace pyops
