// The CPU correlation kernel behind conv1d's forward and grad_input (see conv1d.h):
//   out[n, o, l] = bias[o] + sum_{c, k} w[o, c, k] * in[n, g*Cg + c, l*stride + k*dilation + offset].
// Work items are (batch, group, chunk of positions), run in parallel. Along the length, the interior positions
// (every tap inside the input) go through a register-blocked micro-kernel: OB output channels x NV vectors of
// positions accumulate in registers over input channels and taps, each input vector loaded once and used OB
// times. The few edge positions, stride > 1 and the tails go through a bounds-checked loop over the row.
// One mechanism serves dense (OB = 4), depthwise and single-channel layers (OB = 1: a row of taps per vector).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "common/cpu_vec.h"
#include "ops/conv1d/conv1d.h"
#include "ops/conv1d/conv1d_cpu_util.h"

namespace pyops {
namespace {

template <typename T>
struct Rows {      // output channels [o0, o0 + count) of one batch element
  const T* in;     // in[n, g*Cg, 0]
  const T* w;      // their filters, laid out [c][k][count] (a packed block of 4, or one row of w)
  const T* bias;   // bias + o0, or nullptr
  T* out;          // out[n, o0, 0]
};

// Positions [la, lb) of OB rows, any stride, each tap clipped to the positions where it reads inside the input.
template <typename T, int OB>
void correlate_range(const Rows<T>& r, const CorrelationShape& s, int64_t la, int64_t lb) {
  if (la >= lb) return;
  const int64_t cg = s.in_channels / s.groups, K = s.kernel_size;
  for (int j = 0; j < OB; ++j) {
    T* y = r.out + j * s.out_length;
    const T b = r.bias ? r.bias[j] : T(0);
    for (int64_t l = la; l < lb; ++l) y[l] = b;
    for (int64_t c = 0; c < cg; ++c) {
      const T* x = r.in + c * s.in_length;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t shift = k * s.dilation + s.offset;
        const TapRange t = tap_range(shift, s.stride, s.in_length, la, lb);
        const T wk = r.w[(c * K + k) * OB + j];
        for (int64_t l = t.lo; l < t.hi; ++l) y[l] += wk * x[l * s.stride + shift];
      }
    }
  }
}

// OB rows x NV vectors of positions starting at l0 (stride 1, every tap inside the input), accumulated in registers:
// per (input channel, tap) NV vector loads of the input and OB broadcasts of consecutive weights feed OB*NV FMAs.
template <typename T, int OB, int NV>
inline void correlate_tile(const Rows<T>& r, const CorrelationShape& s, int64_t l0) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t cg = s.in_channels / s.groups, K = s.kernel_size;
  Vec acc[OB][NV];
  for (int j = 0; j < OB; ++j) {
    const Vec b(r.bias ? r.bias[j] : T(0));
    for (int v = 0; v < NV; ++v) acc[j][v] = b;
  }
  const T* x0 = r.in + l0 + s.offset;
  const T* wp = r.w;
  for (int64_t c = 0; c < cg; ++c) {
    const T* xc = x0 + c * s.in_length;
    for (int64_t k = 0; k < K; ++k, wp += OB) {
      const T* xk = xc + k * s.dilation;
      Vec xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = Vec::loadu(xk + v * V);
      for (int j = 0; j < OB; ++j) {
        const Vec wv(wp[j]);
        for (int v = 0; v < NV; ++v) acc[j][v] = at::vec::fmadd(xv[v], wv, acc[j][v]);
      }
    }
  }
  for (int j = 0; j < OB; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v].store(r.out + j * s.out_length + l0 + v * V);
}

// Positions [la, lb) of OB rows: register tiles over the interior, the bounds-checked loop elsewhere.
template <typename T, int OB, int NV>
void correlate_rows(const Rows<T>& r, const CorrelationShape& s, const Interior& in, int64_t la, int64_t lb) {
  constexpr int64_t V = Vectorized<T>::size();
  if (s.stride != 1) {
    correlate_range<T, OB>(r, s, la, lb);
    return;
  }
  const int64_t lo = std::clamp(in.lo, la, lb), hi = std::clamp(in.hi, lo, lb);
  correlate_range<T, OB>(r, s, la, lo);
  int64_t l = lo;
  for (; l + NV * V <= hi; l += NV * V) correlate_tile<T, OB, NV>(r, s, l);
  for (; l + V <= hi; l += V) correlate_tile<T, OB, 1>(r, s, l);
  correlate_range<T, OB>(r, s, l, lb);
}

// Filters of full blocks of 4 output channels repacked [block][c][k][4], so a tile's 4 broadcasts per
// (channel, tap) read one cache line in order.
template <typename T>
std::vector<T> pack_blocks_of_4(const T* w, const CorrelationShape& s) {
  const int64_t og = s.out_channels / s.groups, cg = s.in_channels / s.groups, row = cg * s.kernel_size;
  const int64_t full = og / 4;
  std::vector<T> packed(s.groups * full * row * 4);
  for (int64_t g = 0; g < s.groups; ++g)
    for (int64_t b = 0; b < full; ++b)
      for (int64_t i = 0; i < row; ++i)
        for (int64_t j = 0; j < 4; ++j)
          packed[((g * full + b) * row + i) * 4 + j] = w[(g * og + b * 4 + j) * row + i];
  return packed;
}

// Work items: (batch, group, chunk of positions). A chunk is sized so its input window (all the group's input
// channels) stays in L1 while every output channel of the group is computed from it.
template <typename T>
void correlate_typed(const T* in, const T* w, const T* bias, T* out, const CorrelationShape& s) {
  constexpr int OB = 4, NV = 3;
  constexpr int64_t tile = NV * Vectorized<T>::size();
  const int64_t og = s.out_channels / s.groups, cg = s.in_channels / s.groups, full = og / OB;
  const int64_t row = cg * s.kernel_size;
  const std::vector<T> packed = pack_blocks_of_4(w, s);
  const Interior inner = interior(s.offset, s.dilation * (s.kernel_size - 1), s.in_length, s.out_length);
  const int64_t span = s.dilation * (s.kernel_size - 1) * (s.stride == 1 ? 1 : 0);
  const int64_t fit = (24 * 1024 / static_cast<int64_t>(sizeof(T))) / std::max<int64_t>(cg, 1) - span;
  const int64_t chunk = std::max<int64_t>(tile, fit / tile * tile);
  // chunk boundaries start at the interior's first position, so every chunk but the ends is whole tiles
  const int64_t start = s.stride == 1 ? inner.lo : 0;
  const int64_t chunks = std::max<int64_t>(1, (s.out_length - start + chunk - 1) / chunk);
  const int64_t items = s.batch * s.groups * chunks;
  const int64_t work = std::max<int64_t>(1, og * std::min(chunk, s.out_length) * std::max<int64_t>(row, 1));
  // Many input channels at stride 1: each chunk's input window is first copied to a compact, zero-filled buffer
  // (rows as long as the window, not 4 KiB apart as the input's rows of 1024 floats are, which map to the same L1
  // sets; and no bounds to check): then every position of the chunk is a register tile.
  const bool stage = s.stride == 1 && cg >= 4;
  at::parallel_for(0, items, std::max<int64_t>(1, 32768 / work), [&](int64_t begin, int64_t end) {
    std::vector<T> staged;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / (s.groups * chunks), g = (it / chunks) % s.groups, ch = it % chunks;
      const int64_t la = ch == 0 ? 0 : start + ch * chunk;
      const int64_t lb = ch == chunks - 1 ? s.out_length : start + (ch + 1) * chunk;
      const T* x = in + (n * s.in_channels + g * cg) * s.in_length;
      CorrelationShape local = s;
      Interior local_inner = inner;
      if (stage) {
        const int64_t width = lb - la + span;  // input positions la + offset .. lb - 1 + offset + span
        if (static_cast<int64_t>(staged.size()) < cg * width) staged.resize(cg * width);
        for (int64_t c = 0; c < cg; ++c) {
          const T* src = x + c * s.in_length;
          T* dst = staged.data() + c * width;
          for (int64_t q = 0; q < width; ++q) {
            const int64_t i = la + s.offset + q;
            dst[q] = i >= 0 && i < s.in_length ? src[i] : T(0);
          }
        }
        x = staged.data();
        local.in_length = width;
        local.offset = -la;
        local_inner = {la, lb};
      }
      T* y = out + (n * s.out_channels + g * og) * s.out_length;
      const T* b = bias ? bias + g * og : nullptr;
      for (int64_t blk = 0; blk < full; ++blk) {
        const Rows<T> r{x, packed.data() + (g * full + blk) * row * OB, b ? b + blk * OB : nullptr,
                        y + blk * OB * s.out_length};
        correlate_rows<T, OB, NV>(r, local, local_inner, la, lb);
      }
      for (int64_t o = full * OB; o < og; ++o) {
        const Rows<T> r{x, w + (g * og + o) * row, b ? b + o : nullptr, y + o * s.out_length};
        correlate_rows<T, 1, 4>(r, local, local_inner, la, lb);
      }
    }
  });
}

}  // namespace

void correlate_cpu(const at::Tensor& in, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out,
                   const CorrelationShape& s) {
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "pyops_conv1d_correlate_cpu", [&] {
    correlate_typed<scalar_t>(in.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                              out.mutable_data_ptr<scalar_t>(), s);
  });
}

}  // namespace pyops
