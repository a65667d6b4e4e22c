// The CPU grad_weight kernel of conv1d for layers with many channels a group (see conv1d.h):
//   grad_weight[o, c, k] = sum_{n, j} gy[n, o, j] * x[n, g*Cg + c, j*stride + k*dilation - padding].
// For each tap k this is a product of grad_output (C_out/groups, N*L_out) by the input positions the tap reads,
// transposed (N*L_out, C_in/groups). The input is transposed once (a batch chunk at a time) into xt (n, position,
// channel): zero rows where a tap reads padding, each group's channels padded with zeros to whole vectors, so that
// tap k's row for output j is xt[n, j*stride + k*dilation] at any stride, dilation or padding. Each tap is then a
// register-tiled outer product: MR output channels x NV vectors of input channels, per position MR broadcasts of
// grad_output and NV aligned loads of xt for MR*NV fused multiply-adds, with no horizontal sums and no edges
// (correlate_weight_cpu's dot products along positions end every sum with one and clip every tap at the edges:
// 2.3 ms on the dense TCN's 128->128 k3 on 4 x 1024, where this runs 0.92 and oneDNN 1.05, bench/NOTES-conv1d.md).
// The transposed input costs a pass over the input per call: worth it from ~12 outputs x taps
// (cpu_weight_gradient_path).
// Deterministic at any thread count: each weight's sum runs over (n, j) in order, within one thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "ops/conv1d/conv1d.h"

namespace pyops {
namespace PYOPS_CPU_ISA {  // (common/cpu_isa.h: built once per instruction set)
namespace {

// The tile: MR rows x NV vectors of accumulators, plus NV loads and one broadcast, within the register file
// (AVX-512's 32: 6 x 4 + 5; AVX2's 16: 6 x 2 + 3).
constexpr int kRows = 6;
constexpr int kVectors = sizeof(Vectorized<float>) == 64 ? 4 : 2;
// Outputs a pass over the tiles covers (at most kChunk): one tile's grad_output rows (kRows x 1 KB in float32) stay
// in L1 and the rows of xt the pass reads (chunk() x pitch values, <= kChunkBytes) in L2 while each thread runs
// through its tiles; a pass adds to the tiles' sums in memory.
constexpr int64_t kChunk = 256, kChunkBytes = 256 << 10;
// Bytes of xt packed at a time (a chunk of the batch; at least one sample): written to L2 and read from there.
constexpr int64_t kPackBytes = 1 << 20;

struct DenseWeightShape {
  int64_t out_channels, out_length, groups, out_per_group, kernel_size, stride, dilation;
  int64_t positions;  // xt's rows a sample: (L_out - 1) * stride + (K - 1) * dilation + 1
  int64_t padded;     // channels a group in xt, a whole number of vectors
  int64_t pitch;      // xt's row: groups * padded, plus a vector where that is a multiple of 1 KB (rows that far
                      // apart would share L1 sets: a tile reads the same columns of consecutive rows)
  int64_t chunk(int64_t element_size) const {
    return std::clamp<int64_t>(kChunkBytes / (pitch * stride * element_size), 16, kChunk);
  }
};

// sums (MR, NV vectors; row stride sum_row) += sum over j < count of gy[m * gy_row + j] * xt[j * xt_step + v*V ..],
// the chunk's sum formed in registers from zero, then added: each weight sums its chunks' sums (the error grows with
// their number and the chunk's length, not with N * L_out: on 4 x 1024 positions 3.8e-7 relative to the largest
// weight, 2.9e-6 accumulating in place)
template <typename T, int MR, int NV>
void tap_tile(const T* gy, int64_t gy_row, const T* xt, int64_t xt_step, int64_t count, T* sums, int64_t sum_row) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec(T(0));
  for (int64_t j = 0; j < count; ++j) {
    Vec xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = Vec::loadu(xt + j * xt_step + v * V);
    for (int m = 0; m < MR; ++m) {
      const Vec gv(gy[m * gy_row + j]);
      for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(gv, xv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) (Vec::loadu(sums + m * sum_row + v * V) + acc[m][v]).store(sums + m * sum_row + v * V);
}

// A tile of `rows` <= MR output channels and `vectors` <= NV vectors (the last tiles of a group).
template <typename T, int MR, int NV>
void tap_tile_upto(int rows, int vectors, const T* gy, int64_t gy_row, const T* xt, int64_t xt_step, int64_t count,
                   T* sums, int64_t sum_row) {
  if constexpr (MR > 1) {
    if (rows < MR) return tap_tile_upto<T, MR - 1, NV>(rows, vectors, gy, gy_row, xt, xt_step, count, sums, sum_row);
  }
  if constexpr (NV > 1) {
    if (vectors < NV) return tap_tile_upto<T, MR, NV - 1>(rows, vectors, gy, gy_row, xt, xt_step, count, sums, sum_row);
  }
  tap_tile<T, MR, NV>(gy, gy_row, xt, xt_step, count, sums, sum_row);
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols, in 16 x 16 blocks (ATen's in-register transpose
// for float32's whole blocks).
template <typename T>
void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  constexpr int64_t B = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += B) {
    for (int64_t j0 = 0; j0 < cols; j0 += B) {
      const int64_t i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      if constexpr (std::is_same_v<T, float>) {
        if (i1 - i0 == B && j1 - j0 == B) {
          at::vec::transpose_mxn<float, B, B>(src + i0 * ld_src + j0, ld_src, dst + j0 * ld_dst + i0, ld_dst);
          continue;
        }
      }
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

// xt (count, positions, pitch) from samples [n0, n0 + count) of x (N, C_in, L) contiguous: row p holds
// input position p - padding, zero outside the input and in each group's padding channels.
template <typename T>
void transpose_input(const T* x, int64_t n0, int64_t count, int64_t in_channels, int64_t length, int64_t padding,
                     const DenseWeightShape& s, T* xt) {
  constexpr int64_t kRowBlock = 64;
  const int64_t cg = in_channels / s.groups, blocks = (s.positions + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, count * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / blocks, p0 = it % blocks * kRowBlock, p1 = std::min(s.positions, p0 + kRowBlock);
      const int64_t v0 = std::clamp(padding, p0, p1), v1 = std::clamp(padding + length, v0, p1);  // rows read
      T* rows = xt + n * s.positions * s.pitch;
      std::fill(rows + p0 * s.pitch, rows + v0 * s.pitch, T(0));
      std::fill(rows + v1 * s.pitch, rows + p1 * s.pitch, T(0));
      for (int64_t g = 0; g < s.groups; ++g) {
        transpose(x + ((n0 + n) * in_channels + g * cg) * length + (v0 - padding), length,
                  rows + v0 * s.pitch + g * s.padded, s.pitch, cg, v1 - v0);
        if (s.padded == cg) continue;
        for (int64_t p = v0; p < v1; ++p) std::fill_n(rows + p * s.pitch + g * s.padded + cg, s.padded - cg, T(0));
      }
    }
  });
}

// sums (K, C_out, padded) += the products of samples [n0, n0 + count) (xt holding them), each thread over its range
// of tiles (group, row block, tap, column block), position chunk by position chunk.
template <typename T>
void add_products(const T* gy, const T* xt, int64_t n0, int64_t count, const DenseWeightShape& s, T* sums) {
  constexpr int64_t V = Vectorized<T>::size(), W = kVectors * V;
  const int64_t row_blocks = (s.out_per_group + kRows - 1) / kRows, column_blocks = (s.padded + W - 1) / W;
  const int64_t per_group = row_blocks * s.kernel_size * column_blocks;
  at::parallel_for(0, s.groups * per_group, 1, [&](int64_t begin, int64_t end) {
    const int64_t step = s.chunk(sizeof(T));
    for (int64_t n = 0; n < count; ++n) {
      for (int64_t j0 = 0; j0 < s.out_length; j0 += step) {
        const int64_t chunk = std::min(step, s.out_length - j0);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t g = t / per_group, rb = t % per_group / (s.kernel_size * column_blocks);
          const int64_t k = t % (s.kernel_size * column_blocks) / column_blocks, cb = t % column_blocks;
          const int64_t o0 = g * s.out_per_group + rb * kRows, c0 = g * s.padded + cb * W;
          const int rows = static_cast<int>(std::min<int64_t>(kRows, s.out_per_group - rb * kRows));
          const int vectors = static_cast<int>(std::min<int64_t>(kVectors, (s.padded - cb * W) / V));
          const T* xr = xt + (n * s.positions + j0 * s.stride + k * s.dilation) * s.pitch + c0;
          tap_tile_upto<T, kRows, kVectors>(rows, vectors, gy + ((n0 + n) * s.out_channels + o0) * s.out_length + j0,
                                            s.out_length, xr, s.stride * s.pitch, chunk,
                                            sums + (k * s.out_channels + o0) * s.padded + cb * W, s.padded);
        }
      }
    }
  });
}

}  // namespace

void dense_weight_cpu(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight, int64_t stride,
                      int64_t padding, int64_t dilation, int64_t groups) {
  const int64_t batch = x.size(0), in_channels = x.size(1), length = x.size(2);
  const int64_t out_channels = gy.size(1), out_length = gy.size(2), kernel_size = grad_weight.size(2);
  const int64_t cg = in_channels / groups;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyops_conv1d_dense_weight_cpu", [&] {
    constexpr int64_t lanes = Vectorized<scalar_t>::size();
    const int64_t padded = (cg + lanes - 1) / lanes * lanes, bytes = groups * padded * int64_t{sizeof(scalar_t)};
    const int64_t positions = (out_length - 1) * stride + (kernel_size - 1) * dilation + 1;
    const DenseWeightShape s{out_channels, out_length, groups, out_channels / groups, kernel_size, stride,
                             dilation, positions, padded, groups * padded + (bytes % 1024 == 0 ? lanes : 0)};
    const int64_t chunk =
        std::clamp<int64_t>(kPackBytes / (s.positions * s.pitch * int64_t{sizeof(scalar_t)}), 1, batch);
    const at::Tensor xt = at::empty({chunk * s.positions * s.pitch}, x.options());
    const at::Tensor sums = at::zeros({kernel_size * out_channels * s.padded}, x.options());
    for (int64_t n0 = 0; n0 < batch; n0 += chunk) {
      const int64_t count = std::min(chunk, batch - n0);
      transpose_input(x.const_data_ptr<scalar_t>(), n0, count, in_channels, length, padding, s,
                      xt.mutable_data_ptr<scalar_t>());
      add_products(gy.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(), n0, count, s,
                   sums.mutable_data_ptr<scalar_t>());
    }
    // (K, C_out, padded) -> (C_out, C_in / groups, K)
    grad_weight.copy_(sums.view({kernel_size, out_channels, s.padded}).narrow(2, 0, cg).permute({1, 2, 0}));
  });
}

}  // namespace PYOPS_CPU_ISA
}  // namespace pyops
