// The CPU grad_weight kernel of conv1d (see conv1d.h): the correlation of grad_output with the input,
//   grad_weight[o, c, k] = sum_{n, j} gy[n, o, j] * x[n, g*Cg + c, j*stride + k*dilation + offset].
// At a stride above 1 the input is read as its phase slabs (PhaseSlabs, split in one pass first): tap k reads the
// consecutive elements j + q of phase p, where k*dilation + offset = q*stride + p, so every tap is a stride-1
// correlation and all of them run in one pass over grad_output.
// Columns (c, k) are flattened, so one register-blocked micro-kernel fits any kernel size: OB output channels x JB
// columns of vector partial sums, each loaded gy vector used JB times and each x vector OB times.
// grad_bias[o] = sum_{n, j} gy[n, o, j], where asked for, comes from the same reads of grad_output (the first
// block of columns of each output channel sums its gy vectors too): a separate sum was a second pass over it.
// Deterministic whatever the thread count: the batch is split into a number of blocks that depends only on the
// shape, each block's sums are formed in a fixed order, then the blocks are added in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "ops/conv1d/conv1d.h"
#include "ops/conv1d/conv1d_cpu_util.h"

namespace pyops {
namespace PYOPS_CPU_ISA {  // (common/cpu_isa.h: built once per instruction set)
namespace {

// Column (c, k) of a group: tap k of its input channel c reads element j + shift of the row of c's phase p (in the
// phase slabs: x + slab + (n*C + g*Cg + c) * length for batch element n, group g), length its phase's length.
struct WeightColumn {
  int64_t slab, channel, length, shift;
};

// (the columns carry where each tap reads: the input's length, stride, dilation and offset are theirs)
struct WeightShape {
  int64_t batch, in_channels, out_channels, kernel_size, gy_length, groups;
  const WeightColumn* column;  // [columns()], computed once per call (weight_kernel): no divisions per block
  int64_t cg() const { return in_channels / groups; }
  int64_t og() const { return out_channels / groups; }
  int64_t columns() const { return cg() * kernel_size; }
};

// Sums for output channels [o0, o0+OB) x columns [col0, col0+JB) of group g over batch [n0, n1), into res
// (row stride res_row); Bias: also those channels' sums of gy, into bias_res[0, OB).
template <typename T, int OB, int JB, bool Bias = false>
void weight_block(const T* gy, const T* x, const WeightShape& s, int64_t n0, int64_t n1, int64_t g, int64_t o0,
                  int64_t col0, T* res, int64_t res_row, T* bias_res = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  // column jb reads x + xbase[jb] + n*xstep[jb] (its phase's row of batch element n, phase_length[jb] long) at
  // j + shift[jb]; lo..hi: where every column's reads are inside
  int64_t xbase[JB], xstep[JB], shift[JB], phase_length[JB];
  int64_t lo = 0, hi = s.gy_length;
  for (int jb = 0; jb < JB; ++jb) {
    const WeightColumn& c = s.column[col0 + jb];
    phase_length[jb] = c.length;
    xbase[jb] = c.slab + (g * s.cg() + c.channel) * c.length;
    xstep[jb] = s.in_channels * c.length;
    shift[jb] = c.shift;
    lo = std::max(lo, -c.shift);
    hi = std::min(hi, c.length - c.shift);
  }
  lo = std::min(lo, s.gy_length);
  hi = std::max(hi, lo);
  // vectors over [lo, end); the rest, [0, lo) and [end, gy_length), each column clipped to where it reads inside
  // its phase, by scalar loops (the same ranges for every batch element: computed once)
  const int64_t end = lo + (hi - lo) / V * V;
  TapRange edges[JB][2];
  for (int jb = 0; jb < JB; ++jb) {
    edges[jb][0] = tap_range(shift[jb], 1, phase_length[jb], 0, lo);
    edges[jb][1] = tap_range(shift[jb], 1, phase_length[jb], end, s.gy_length);
  }
  Vec acc[OB][JB], bacc[OB];
  T sacc[OB][JB], sbias[OB];
  for (int ob = 0; ob < OB; ++ob) {
    for (int jb = 0; jb < JB; ++jb) acc[ob][jb] = Vec(T(0)), sacc[ob][jb] = T(0);
    bacc[ob] = Vec(T(0)), sbias[ob] = T(0);
  }
  for (int64_t n = n0; n < n1; ++n) {
    const T* gyr[OB];
    const T* xr[JB];
    for (int ob = 0; ob < OB; ++ob) gyr[ob] = gy + (n * s.out_channels + o0 + ob) * s.gy_length;
    for (int jb = 0; jb < JB; ++jb) xr[jb] = x + xbase[jb] + n * xstep[jb];
    for (int64_t l = lo; l < end; l += V) {
      Vec gv[OB];
      for (int ob = 0; ob < OB; ++ob) gv[ob] = Vec::loadu(gyr[ob] + l);
      if constexpr (Bias)
        for (int ob = 0; ob < OB; ++ob) bacc[ob] = bacc[ob] + gv[ob];
      for (int jb = 0; jb < JB; ++jb) {
        const Vec xv = Vec::loadu(xr[jb] + l + shift[jb]);
        for (int ob = 0; ob < OB; ++ob) acc[ob][jb] = at::vec::fmadd(gv[ob], xv, acc[ob][jb]);
      }
    }
    for (int jb = 0; jb < JB; ++jb) {
      for (const TapRange& part : edges[jb]) {
        for (int ob = 0; ob < OB; ++ob) {
          T sum = 0;
          for (int64_t p = part.lo; p < part.hi; ++p) sum += gyr[ob][p] * xr[jb][p + shift[jb]];
          sacc[ob][jb] += sum;
        }
      }
    }
    if constexpr (Bias) {  // (the positions the vectors left: [0, lo) and [end, gy_length))
      for (int ob = 0; ob < OB; ++ob) {
        for (int64_t p = 0; p < lo; ++p) sbias[ob] += gyr[ob][p];
        for (int64_t p = end; p < s.gy_length; ++p) sbias[ob] += gyr[ob][p];
      }
    }
  }
  for (int ob = 0; ob < OB; ++ob)
    for (int jb = 0; jb < JB; ++jb) res[ob * res_row + col0 + jb] = hsum(acc[ob][jb]) + sacc[ob][jb];
  if constexpr (Bias)
    for (int ob = 0; ob < OB; ++ob) bias_res[ob] = hsum(bacc[ob]) + sbias[ob];
}

// The first block of columns of a row block, with its sums of gy where bias_res is given.
template <typename T, int OB, int JB>
void first_weight_block(const T* gy, const T* x, const WeightShape& s, int64_t n0, int64_t n1, int64_t g, int64_t o0,
                        T* res, int64_t res_row, T* bias_res) {
  if (bias_res) weight_block<T, OB, JB, true>(gy, x, s, n0, n1, g, o0, 0, res, res_row, bias_res);
  else weight_block<T, OB, JB>(gy, x, s, n0, n1, g, o0, 0, res, res_row);
}

// Columns [col, col + width) of one output channel (width <= JB) in one pass over its rows.
template <typename T, int JB>
void weight_columns(const T* gy, const T* x, const WeightShape& s, int64_t n0, int64_t n1, int64_t g, int64_t o,
                    int64_t col, int64_t width, T* res, T* bias_res) {
  if constexpr (JB > 1) {
    if (width < JB) return weight_columns<T, JB - 1>(gy, x, s, n0, n1, g, o, col, width, res, bias_res);
  }
  if (bias_res) weight_block<T, 1, JB, true>(gy, x, s, n0, n1, g, o, col, res, s.columns(), bias_res);
  else weight_block<T, 1, JB>(gy, x, s, n0, n1, g, o, col, res, s.columns());
}

// All columns of `count` output channels from o0 (res points at their first row), and their sums of gy into
// bias_res where given. Blocks of 4 channels take 3 columns a pass (12 sums); a single channel up to 12 columns a
// pass (12 sums and two vectors fill AVX2's 16 registers), its columns split evenly among the fewest passes: each
// pass reads grad_output and the input again (a 9-tap filter had taken 8 columns and then 1, a 5-tap 4 and 1).
template <typename T>
void weight_rows(const T* gy, const T* x, const WeightShape& s, int64_t n0, int64_t n1, int64_t g, int64_t o0,
                 int64_t count, T* res, T* bias_res) {
  const int64_t cols = s.columns();
  if (count == 4) {
    int64_t col = cols >= 3 ? 3 : 1;
    if (cols >= 3) first_weight_block<T, 4, 3>(gy, x, s, n0, n1, g, o0, res, cols, bias_res);
    else first_weight_block<T, 4, 1>(gy, x, s, n0, n1, g, o0, res, cols, bias_res);
    for (; col + 3 <= cols; col += 3) weight_block<T, 4, 3>(gy, x, s, n0, n1, g, o0, col, res, cols);
    for (; col < cols; ++col) weight_block<T, 4, 1>(gy, x, s, n0, n1, g, o0, col, res, cols);
    return;
  }
  constexpr int64_t kWidest = 12;
  const int64_t passes = (cols + kWidest - 1) / kWidest;
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t p = 0, col = 0; p < passes; ++p) {
      const int64_t width = (cols - col) / (passes - p);  // (the later passes take the remainder's extra columns)
      weight_columns<T, kWidest>(gy, x, s, n0, n1, g, o0 + j, col, width, res + j * cols,
                                 bias_res && p == 0 ? bias_res + j : nullptr);
      col += width;
    }
  }
}

template <typename T>
void weight_typed(const T* gy, const T* x, T* grad_weight, T* grad_bias, const WeightShape& s) {
  constexpr int64_t OB = 4;
  const int64_t og = s.og(), blocks = (og + OB - 1) / OB, cols = s.columns();
  // Enough independent items for the threads: few output channels (single-channel layers) split the batch.
  const int64_t batch_blocks = std::min(s.batch, std::max<int64_t>(1, (64 + s.groups * blocks - 1) / (s.groups * blocks)));
  const int64_t per_block = (s.batch + batch_blocks - 1) / batch_blocks;
  // (per batch block: its grad_weight sums, then its grad_bias sums where asked for)
  const int64_t total = s.out_channels * cols, per_partial = total + (grad_bias ? s.out_channels : 0);
  std::vector<T> partial(batch_blocks > 1 ? batch_blocks * per_partial : 0);
  at::parallel_for(0, batch_blocks * s.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bb = it / (s.groups * blocks), g = (it / blocks) % s.groups, b = it % blocks;
      const int64_t o0 = g * og + b * OB, n0 = std::min(s.batch, bb * per_block);
      T* w_dst = batch_blocks > 1 ? partial.data() + bb * per_partial : grad_weight;
      T* b_dst = !grad_bias ? nullptr : batch_blocks > 1 ? partial.data() + bb * per_partial + total : grad_bias;
      weight_rows(gy, x, s, n0, std::min(s.batch, n0 + per_block), g, o0, std::min(OB, og - b * OB),
                  w_dst + o0 * cols, b_dst ? b_dst + o0 : nullptr);
    }
  });
  if (batch_blocks == 1) return;
  at::parallel_for(0, per_partial, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T sum = 0;
      for (int64_t bb = 0; bb < batch_blocks; ++bb) sum += partial[bb * per_partial + i];
      (i < total ? grad_weight[i] : grad_bias[i - total]) = sum;
    }
  });
}

// x (N, C, L) contiguous: read in place at stride 1, as its phase slabs above (the same layout at stride 1).
void weight_kernel(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight, at::Tensor& grad_bias,
                   int64_t stride, int64_t dilation, int64_t offset, int64_t groups) {
  const int64_t kernel_size = grad_weight.size(2);
  const PhaseSlabs ph{x.size(0), x.size(1), x.size(2), stride};
  std::vector<WeightColumn> columns(grad_weight.size(1) * kernel_size);
  for (int64_t col = 0; col < static_cast<int64_t>(columns.size()); ++col) {
    const int64_t e = (col % kernel_size) * dilation + offset, q = floor_div(e, stride), p = e - q * stride;
    columns[col] = {ph.slab_offset(p), col / kernel_size, ph.phase_length(p), q};
  }
  const WeightShape s{x.size(0), x.size(1), gy.size(1), kernel_size, gy.size(2), groups, columns.data()};
  const at::Tensor slabs = stride == 1 ? x : split_phases(x, stride);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyops_conv1d_weight_cpu", [&] {
    weight_typed<scalar_t>(gy.const_data_ptr<scalar_t>(), slabs.const_data_ptr<scalar_t>(),
                           grad_weight.mutable_data_ptr<scalar_t>(),
                           grad_bias.defined() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr, s);
  });
}

}  // namespace

void correlate_weight_cpu(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight, at::Tensor& grad_bias,
                          int64_t stride, int64_t dilation, int64_t offset, int64_t groups) {
  const int64_t batch = x.size(0), in_length = x.size(2), gy_length = gy.size(2);
  if (batch == 0) {
    grad_weight.zero_();
    if (grad_bias.defined()) grad_bias.zero_();
    return;
  }
  // Short rows (conv1d.h, lay_end_to_end): samples end to end, each in a segment of Q input positions and Q / stride
  // outputs, padded with zeros so that no tap of one sample reaches another's values: a read left of a sample lands
  // in the previous one's zeros, and the last output's last tap (at most L + padding - 1) before the next sample, both
  // where Q >= L - offset (offset = -padding); Q / stride >= L_gy; Q a multiple of the stride, so that each sample's
  // phases line up with the row's. The same sums. Not with a non-finite value in either (a zero of the padding times
  // it would be NaN where the sum of the existing pairs is not). Layers of one row per group (depthwise,
  // single-channel) only below 8 outputs: from there their kernel runs as fast on the rows as they lie, and the two
  // copies cost more (stop 34: a depthwise 64-channel weight gradient on 64 x 40 positions 104 → 41-61 µs unlaid,
  // single channel on 4096 x 12 46 → 24; but 8 channels on 4096 x 4 130 either way, 4096 x 8 188 → 200).
  // (in 128 bits: dilations and paddings near 2^62 are valid arguments)
  const __int128 need = std::max<__int128>({in_length, static_cast<__int128>(gy_length) * stride,
                                            static_cast<__int128>(in_length) - offset});
  const __int128 wide = (need + stride - 1) / stride * stride;
  // (and only where a segment is at most about twice a sample's input and its outputs, as the forward's: a padding or
  // stride far past the input would be written out as zeros)
  const bool one_row_each = x.size(1) == groups && gy.size(1) == groups;
  if (batch > 1 && gy_length < (one_row_each ? 8 : kShortRow) && worth_laying_end_to_end(wide, in_length) &&
      worth_laying_end_to_end(wide / stride, gy_length) && all_finite(x) && all_finite(gy)) {
    const int64_t length = static_cast<int64_t>(wide);
    const int64_t blocks = end_to_end_blocks(batch);
    // (the zeros between samples add nothing to the sums of gy)
    weight_kernel(lay_end_to_end(gy, 0, length / stride, blocks), lay_end_to_end(x, 0, length, blocks), grad_weight,
                  grad_bias, stride, dilation, offset, groups);
    return;
  }
  weight_kernel(gy, x, grad_weight, grad_bias, stride, dilation, offset, groups);
}

}  // namespace PYOPS_CPU_ISA
}  // namespace pyops
