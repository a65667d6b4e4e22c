// The CPU correlation kernel behind conv1d's forward and grad_input (see conv1d.h):
//   out[n, o, l] = act(bias[o] + sum_{c, k} w[o, c, k] * in[n, g*Cg + c, l*stride + k*dilation + offset]
//                      + residual[n, o, l])
// (act and residual: conv1d_bias_act's, applied as a sum is stored; neither for conv1d and the input gradient).
// Work items are (batch, group, chunk of positions), run in parallel. Positions go through a register-blocked
// micro-kernel: OB output channels x NV vectors of positions accumulate in registers over input channels and taps,
// each input vector loaded once and used OB times. It reads either a staged copy of the chunk's input window, split
// into the stride's phases so that every tap reads consecutive elements (strided, many-channel and short layers), or
// the input itself at stride 1, where the few edge positions and the tails take a bounds-checked loop.
// One mechanism serves dense (OB = 4), depthwise and single-channel layers (OB = 1: a row of taps per vector).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common/activation_cpu.h"
#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "ops/conv1d/conv1d.h"
#include "ops/conv1d/conv1d_cpu_phase_rows.h"
#include "ops/conv1d/conv1d_cpu_util.h"

namespace pyops {
namespace PYOPS_CPU_ISA {  // (common/cpu_isa.h: built once per instruction set)
namespace {

template <typename T>
struct Rows {      // output channels [o0, o0 + count) of one batch element
  const T* in;     // in[n, g*Cg, 0], or the staged window of the chunk
  const T* w;      // their filters, laid out [c][k][count] (a packed block of 4, or one row of w)
  const T* bias;   // bias + o0, or nullptr
  const T* res;    // residual[n, o0, 0], or nullptr
  T* out;          // out[n, o0, 0]
};

// Where the register tiles read: tap k of input channel c for output position l is in[c * pitch + tap[k] + l]
// (relative to Rows::in). Straight from the input at stride 1: pitch = L_in, tap[k] = k*dilation + offset; from a
// staged window, the positions of its phase rows (correlate_typed).
struct TileReads {
  int64_t pitch;
  const int64_t* tap;
};

// Positions [la, lb) of OB rows, any stride, each tap clipped to the positions where it reads inside the input.
// A few positions (a padded row's edge) sum each position's taps in registers; more go tap by tap along the row.
// (Tap by tap, each of a few positions is a chain of loads and stores of the same output, one per tap: the edges of
// a depthwise k5 'same' row of 100 positions cost it 50 % over the same outputs unpadded; summed per position 20 %.)
template <typename T, int OB>
void correlate_range(const Rows<T>& r, const CorrelationShape& s, int64_t la, int64_t lb) {
  if (la >= lb) return;
  const int64_t cg = s.in_channels / s.groups, K = s.kernel_size;
  if (lb - la < 8) {
    for (int64_t l = la; l < lb; ++l) {
      const int64_t base = l * s.stride + s.offset;  // (the input position tap 0 reads; tap k base + k*dilation)
      T acc[OB];
      for (int j = 0; j < OB; ++j) acc[j] = r.bias ? r.bias[j] : T(0);
      for (int64_t c = 0; c < cg; ++c) {
        const T* x = r.in + c * s.in_length;
        const T* wc = r.w + c * K * OB;
        for (int64_t k = 0, at = base; k < K; ++k, at += s.dilation) {
          if (at < 0 || at >= s.in_length) continue;  // (a test per tap: the bounds by division cost more)
          for (int j = 0; j < OB; ++j) acc[j] += wc[k * OB + j] * x[at];
        }
      }
      for (int j = 0; j < OB; ++j) {
        const T* res = r.res ? r.res + j * s.out_length : nullptr;
        r.out[j * s.out_length + l] =
            res || s.act != Activation::kNone ? activate(res ? acc[j] + res[l] : acc[j], s.act) : acc[j];
      }
    }
    return;
  }
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
    const T* res = r.res ? r.res + j * s.out_length : nullptr;
    if (res || s.act != Activation::kNone)
      for (int64_t l = la; l < lb; ++l) y[l] = activate(res ? y[l] + res[l] : y[l], s.act);
  }
}

// OB rows x NV vectors of positions starting at l0, every read inside the input, accumulated in registers: per
// (input channel, tap) NV vector loads of the input and OB broadcasts of consecutive weights feed OB*NV FMAs. Only
// the first `count` positions are stored: a last, partial tile reads past them inside a staged window (whose rows
// are padded for it), or reads only them (masked loads, Masked) from the input itself.
// Res, Act: whether the stores add a residual, and the activation they apply (conv1d_bias_act's forward). Template
// arguments, so each combination compiles to its own tiles: a runtime test per stored vector made the short-row and
// single-channel layers 10-25 % slower, and a runtime activation cost a depthwise k4 layer 25 % (its tile loop then
// spills a register), where the compiled-in ReLU costs 0-10 %.
template <typename T, int OB, int NV, bool Masked = false, bool Res = false, Activation Act = Activation::kNone>
inline void correlate_tile(const Rows<T>& r, const CorrelationShape& s, const TileReads& reads, int64_t l0,
                           int64_t count = NV * Vectorized<T>::size()) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t cg = s.in_channels / s.groups, K = s.kernel_size;
  Vec acc[OB][NV];
  for (int j = 0; j < OB; ++j) {
    const Vec b(r.bias ? r.bias[j] : T(0));
    for (int v = 0; v < NV; ++v) acc[j][v] = b;
  }
  const T* wp = r.w;
  for (int64_t c = 0; c < cg; ++c) {
    const int64_t xc = c * reads.pitch + l0;  // (an offset: a staged window's taps are relative to its start)
    for (int64_t k = 0; k < K; ++k, wp += OB) {
      const T* xk = r.in + (xc + reads.tap[k]);
      Vec xv[NV];
      for (int v = 0; v < NV; ++v) {
        xv[v] = !Masked || count >= (v + 1) * V ? Vec::loadu(xk + v * V)
                                                : Vec::loadu(xk + v * V, std::max<int64_t>(0, count - v * V));
      }
      for (int j = 0; j < OB; ++j) {
        const Vec wv(wp[j]);
        for (int v = 0; v < NV; ++v) acc[j][v] = at::vec::fmadd(xv[v], wv, acc[j][v]);
      }
    }
  }
  // (unrolled fully by the pragmas, so that acc stays in registers: GCC does not unroll these loops fully by itself
  // once an epilogue's code is in them, and then keeps acc in memory for the whole tile: conv1d_bias_act with a
  // ReLU ran 1.2-1.8x slower than without one on dense, strided and single-channel layers)
#pragma GCC unroll 16
  for (int j = 0; j < OB; ++j)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const int64_t at = j * s.out_length + l0 + v * V;
      Vec result = acc[j][v];
      if constexpr (Res) {
        const int64_t n = count - v * V;  // (positions of this vector to store)
        if (n > 0) result = result + (n >= V ? Vec::loadu(r.res + at) : Vec::loadu(r.res + at, n));
      }
      result = activate<Act>(result);
      if (count >= (v + 1) * V) result.store(r.out + at);
      else if (count > v * V) result.store(r.out + at, count - v * V);
    }
}

// The last `count` (< NV*V) positions from l: one tile of as many vectors as they need, at least 2, the last one
// partial (a full-width tile cost a short output as much as NV*V positions; staged rows are padded for this).
template <typename T, int OB, int NV, bool Masked, bool Res, Activation Act>
void correlate_last(const Rows<T>& r, const CorrelationShape& s, const TileReads& reads, int64_t l, int64_t count) {
  constexpr int64_t V = Vectorized<T>::size();
  if constexpr (NV > 2) {  // (not below 2: GCC keeps a 4 x 1 tile's sums in memory, slower than a 4 x 3 one)
    if (count <= (NV - 1) * V) return correlate_last<T, OB, NV - 1, Masked, Res, Act>(r, s, reads, l, count);
  }
  correlate_tile<T, OB, NV, Masked, Res, Act>(r, s, reads, l, count);
}

// Positions [la, lb) of OB rows from a staged window: every position is a register tile, the last one partial.
template <typename T, int OB, int NV, bool Res, Activation Act>
void correlate_staged(const Rows<T>& r, const CorrelationShape& s, const TileReads& reads, int64_t la, int64_t lb) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t l = la;
  for (; l + NV * V <= lb; l += NV * V) correlate_tile<T, OB, NV, false, Res, Act>(r, s, reads, l);
  if (l < lb) correlate_last<T, OB, NV, false, Res, Act>(r, s, reads, l, lb - l);
}

// The edges of an item's positions at stride 1 (where taps reach past the input: a padded layer's first and last
// positions), each from a small staged window with zeros outside the input: in[i] and reads[i] for the left (i = 0)
// and right edge, [la, lo) and [hi, lb) with lo, hi the item's interior bounds as correlate_direct computes them;
// in[i] null where that edge is not staged.
template <typename T>
struct StagedEdges {
  const T* in[2];
  TileReads reads[2];
};

// Positions [la, lb) of OB rows read straight from the input: register tiles over the stride-1 interior; the edges
// from their staged windows where given, else, and everywhere at a stride above 1, by the bounds-checked loop.
template <typename T, int OB, int NV, bool Res, Activation Act>
void correlate_direct(const Rows<T>& r, const CorrelationShape& s, const TileReads& reads, const Interior& in,
                      int64_t la, int64_t lb, const StagedEdges<T>* edges) {
  constexpr int64_t V = Vectorized<T>::size();
  if (s.stride != 1) {
    correlate_range<T, OB>(r, s, la, lb);
    return;
  }
  const int64_t lo = std::clamp(in.lo, la, lb), hi = std::clamp(in.hi, lo, lb);
  const auto edge = [&](int i, int64_t a, int64_t b) {
    if (a >= b) return;
    if (edges && edges->in[i]) {
      const Rows<T> edge_rows{edges->in[i], r.w, r.bias, r.res, r.out};
      correlate_staged<T, OB, NV, Res, Act>(edge_rows, s, edges->reads[i], a, b);
    } else {
      correlate_range<T, OB>(r, s, a, b);
    }
  };
  edge(0, la, lo);
  int64_t l = lo;
  for (; l + NV * V <= hi; l += NV * V) correlate_tile<T, OB, NV, false, Res, Act>(r, s, reads, l);
  // the interior's last positions: one tile with masked loads (single vectors reload every weight per vector, and
  // the bounds-checked loop per position and tap ran 10-25x slower than F.conv1d on short outputs of wide filters)
  if (l < hi) correlate_last<T, OB, NV, true, Res, Act>(r, s, reads, l, hi - l);
  edge(1, hi, lb);
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

// The staged rows of one input channel's window: row p (p < stride, at dst + p*width) holds dst[p*width + q] =
// src[first + p + q*stride] for q in [0, width), zero where that is outside [0, length). rows: room for `stride`
// pointers.
template <typename T>
void stage_rows(const T* src, int64_t length, int64_t first, int64_t stride, T* dst, int64_t width, T** rows) {
  // [lo, hi): the q at which every row reads inside the input, split in one pass (move_phase_row); the window's
  // ends one value at a time
  const int64_t lo = std::clamp<int64_t>(ceil_div_signed(-first, stride), 0, width);
  const int64_t hi = std::clamp<int64_t>(floor_div(length - first, stride), lo, width);
  for (int64_t p = 0; p < stride; ++p) rows[p] = dst + p * width + lo;
  if (hi > lo) move_phase_row<T, true>(src + first + lo * stride, rows, (hi - lo) * stride, stride);
  for (int64_t p = 0; p < stride; ++p) {
    for (const auto [a, b] : {std::pair<int64_t, int64_t>{0, lo}, {hi, width}}) {
      for (int64_t q = a; q < b; ++q) {
        const int64_t at = first + p + q * stride;
        dst[p * width + q] = at >= 0 && at < length ? src[at] : T(0);
      }
    }
  }
}

// Work items: (batch, group, chunk of positions). A chunk is sized so its input window (all the group's input
// channels) stays in L1 while every output channel of the group is computed from it.
//
// Staging: the chunk's input window is first copied to a compact, zero-filled buffer, split into the stride's phases:
// row (c, p) holds input positions p, p + stride, ... of channel c from the window's start, so that each tap reads
// consecutive elements of one row for consecutive outputs, and every position of the chunk is a register tile (no
// bounds to check). This serves a stride above 1 (the input's positions a tap reads are `stride` apart), many input
// channels at stride 1 (the staged rows are as long as the window, not 4 KiB apart as input rows of 1024 floats
// are, which map to the same L1 sets) and rows shorter than a tile, where it pays (`pays` below). Other layers
// (depthwise and single-channel ones at stride 1, windows too wide for L1) read the input directly: at stride 1
// with tiles over the interior, above it through the bounds-checked loop.
// finite: whether every weight is finite (correlate_cpu checks it once for both of its paths).
template <typename T, bool Res, Activation Act>
void correlate_typed(const T* in, const T* w, const T* bias, const T* residual, T* out, const CorrelationShape& s,
                     bool finite) {
  constexpr int OB = 4, NV = 3;
  constexpr int64_t V = Vectorized<T>::size(), tile = NV * V;
  const int64_t og = s.out_channels / s.groups, cg = s.in_channels / s.groups, full = og / OB;
  const int64_t K = s.kernel_size, S = s.stride, row = cg * K;
  const std::vector<T> packed = pack_blocks_of_4(w, s);
  const int64_t span = s.dilation * (K - 1);  // input positions between a window's first and last tap
  const int64_t budget = (24 * 1024 / static_cast<int64_t>(sizeof(T))) / std::max<int64_t>(cg, 1);  // per channel
  // When staging pays: at stride 1, where a window of one vector of outputs fits half the budget (a large dilation
  // would copy more than it computes; the tiles then read the input in place, fast too) and the copy is shared by
  // enough work (og*K >= V rows of taps per input vector: 4->1 channels with K = 1 ran 4x slower staged); above it,
  // also wherever the copy (stride*tile + span per channel and tile) costs less than the vector tiles save over the
  // bounds-checked scalar loop (og*K*tile per channel and tile: 200 channels per group at stride 2 ran 18x slower).
  // (a stride or span past the budget never stages: tested first, so that no product below can overflow int64)
  const bool bounded = S <= budget && span <= budget;
  const bool fits = bounded && span + (S > 1 ? S * V : 0) <= budget / 2;
  const bool pays = bounded && (S > 1 ? fits || span + S * tile < og * K * tile : fits && (cg >= 4 && og * K >= V));
  // (a staged window's zeros are multiplied by the weights: not with a non-finite one, whose 0 * inf would be NaN)
  const bool stage = finite && (pays || (fits && s.out_length < tile));
  // positions per chunk: the staged window (chunk * stride + span) or the direct one (chunk + span at stride 1)
  const int64_t fit = stage ? (budget - span) / S : budget - (S == 1 ? span : 0);  // (below a tile: one tile)
  const int64_t chunk = std::max<int64_t>(tile, fit / tile * tile);
  // Direct reads at stride 1: chunks start at the interior's first position, so every chunk but the ends is tiles.
  const Interior inner = interior(s.offset, span, s.in_length, s.out_length);
  const int64_t start = !stage && S == 1 ? inner.lo : 0;
  std::vector<int64_t> direct_taps(K);
  for (int64_t k = 0; k < K; ++k) direct_taps[k] = k * s.dilation + s.offset;
  const int64_t chunks = std::max<int64_t>(1, (s.out_length - start + chunk - 1) / chunk);
  // A single image has few chunks (two for 8 input channels of 1024 positions: 768 + 256 positions), too few to
  // spread over several threads evenly: its output channels' blocks are then split among items too, each staging
  // its own window (stop 28, 1 image of 1024 positions, 2 threads, forward time over the library's: 8→256 k9 1.68 →
  // 1.49, 2→512 k9 2.29 → 1.05, 16→512 k3 1.77 → 1.48; bench/NOTES-conv1d.md).
  const int64_t threads = at::get_num_threads(), windows = s.batch * s.groups * chunks;
  const int64_t spread = threads > 1 ? 4 * threads : 1;
  const int64_t splits =
      windows >= spread ? 1 : std::clamp<int64_t>((spread + windows - 1) / windows, 1, std::max<int64_t>(full, 1));
  const int64_t items = windows * splits;
  const int64_t work =
      std::max<int64_t>(1, og / splits * std::min(chunk, s.out_length) * std::max<int64_t>(row, 1));
  // Direct reads at stride 1 stage their edges (StagedEdges), where the weights are finite as for any staging. The
  // bounds-checked loop per position and tap made padded layers with wide filters 1.3-3.6x slower than the same
  // outputs without padding (stop 32: depthwise k31 / k33 'same' on 400 positions 1.34x / 1.31x faster staged,
  // 3→64 k7 1.51x, 2→181 k33 on 148 positions 3.56x); on short edges of few rows and taps the copy costs more than
  // it saves (depthwise k3-k11: 0.89-1.04x). So an edge is staged where its scalar multiply-adds per input channel
  // (rows x taps x positions) reach 64, and only as short as a padding within the filter's span makes it (a padding
  // of millions of zeros would be written out: the bounds-checked loop skips what reads only padding).
  const bool stage_edges = !stage && S == 1 && finite && bounded;
  at::parallel_for(0, items, std::max<int64_t>(1, 32768 / work), [&](int64_t begin, int64_t end) {
    std::vector<T> staged, edge_rows;
    std::vector<T*> phase_rows(stage ? S : 1);  // (stage_rows' room; S <= budget where staged)
    std::vector<int64_t> staged_taps(K), edge_taps(2 * K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t it = item / splits, split = item % splits;
      const int64_t n = it / (s.groups * chunks), g = (it / chunks) % s.groups, ch = it % chunks;
      const int64_t la = ch == 0 ? 0 : start + ch * chunk;
      const int64_t lb = ch == chunks - 1 ? s.out_length : start + (ch + 1) * chunk;
      const T* x = in + (n * s.in_channels + g * cg) * s.in_length;
      TileReads reads{s.in_length, direct_taps.data()};
      if (stage) {
        // Output l (la <= l < lb), tap k reads input position la*S + offset + q*S + p with q = l - la + kd / S and
        // p = kd % S (kd = k * dilation): element q of phase row p. Rows are padded to whole vectors of outputs and
        // one more (a tile reads up to the vector holding its last position, a last tile at least 2 vectors).
        const int64_t width = (lb - la + V - 1) / V * V + V + span / S, first = la * S + s.offset;
        reads.pitch = S * width;
        if (static_cast<int64_t>(staged.size()) < cg * reads.pitch) staged.resize(cg * reads.pitch);
        for (int64_t c = 0; c < cg; ++c)
          stage_rows(x + c * s.in_length, s.in_length, first, S, staged.data() + c * reads.pitch, width,
                     phase_rows.data());
        for (int64_t k = 0; k < K; ++k) {
          const int64_t kd = k * s.dilation;
          staged_taps[k] = kd % S * width + kd / S - la;
        }
        x = staged.data();
        reads.tap = staged_taps.data();
      }
      StagedEdges<T> edges{};
      if (stage_edges) {
        // Edge [a, b): output l, tap k reads input position l + k*dilation + offset, element l - a + k*dilation of a
        // row staged from position a + offset (padded as a staged window is, above).
        const int64_t lo = std::clamp(inner.lo, la, lb), hi = std::clamp(inner.hi, lo, lb);
        const int64_t ranges[2][2] = {{la, lo}, {hi, lb}};
        int64_t width[2], total = 0;
        for (int i = 0; i < 2; ++i) {
          const int64_t count = ranges[i][1] - ranges[i][0];
          const bool worth = count > 0 && count <= span + tile && og * K * count >= 64;
          width[i] = worth ? (count + V - 1) / V * V + V + span : 0;
          total += cg * width[i];
        }
        if (static_cast<int64_t>(edge_rows.size()) < total) edge_rows.resize(total);
        T* base = edge_rows.data();
        for (int i = 0; i < 2; ++i) {
          const int64_t a = ranges[i][0];
          edges.in[i] = nullptr;
          if (width[i] == 0) continue;
          for (int64_t c = 0; c < cg; ++c)
            stage_rows(x + c * s.in_length, s.in_length, a + s.offset, 1, base + c * width[i], width[i],
                       phase_rows.data());
          for (int64_t k = 0; k < K; ++k) edge_taps[i * K + k] = k * s.dilation - a;
          edges.in[i] = base;
          edges.reads[i] = {width[i], edge_taps.data() + i * K};
          base += cg * width[i];
        }
      }
      const StagedEdges<T>* edges_given = stage_edges ? &edges : nullptr;
      const int64_t first_row = (n * s.out_channels + g * og) * s.out_length;
      T* y = out + first_row;
      const T* res = residual ? residual + first_row : nullptr;
      const T* b = bias ? bias + g * og : nullptr;
      for (int64_t blk = full * split / splits; blk < full * (split + 1) / splits; ++blk) {
        const Rows<T> r{x, packed.data() + (g * full + blk) * row * OB, b ? b + blk * OB : nullptr,
                        res ? res + blk * OB * s.out_length : nullptr, y + blk * OB * s.out_length};
        if (stage) correlate_staged<T, OB, NV, Res, Act>(r, s, reads, la, lb);
        else correlate_direct<T, OB, NV, Res, Act>(r, s, reads, inner, la, lb, edges_given);
      }
      for (int64_t o = full * OB; o < og && split == splits - 1; ++o) {
        const Rows<T> r{x, w + (g * og + o) * row, b ? b + o : nullptr, res ? res + o * s.out_length : nullptr,
                        y + o * s.out_length};
        if (stage) correlate_staged<T, 1, 4, Res, Act>(r, s, reads, la, lb);
        else correlate_direct<T, 1, 4, Res, Act>(r, s, reads, inner, la, lb, edges_given);
      }
    }
  });
}

// correlate_typed compiled for the activation act (ReLU, ReLU6 or none: conv1d_bias_act_cpu applies the others
// after the kernels).
template <typename T, bool Res>
auto correlate_with(Activation act) {
  TORCH_INTERNAL_ASSERT(act == Activation::kNone || act == Activation::kRelu || act == Activation::kRelu6,
                        "pyops: the conv1d kernels apply ReLU and ReLU6 only");
  return act == Activation::kRelu    ? correlate_typed<T, Res, Activation::kRelu>
         : act == Activation::kRelu6 ? correlate_typed<T, Res, Activation::kRelu6>
                                     : correlate_typed<T, Res, Activation::kNone>;
}

void correlate_kernel(const at::Tensor& in, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& residual,
                      at::Tensor& out, const CorrelationShape& s, bool finite) {
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "pyops_conv1d_correlate_cpu", [&] {
    const auto typed = residual.defined() ? correlate_with<scalar_t, true>(s.act)
                                          : correlate_with<scalar_t, false>(s.act);
    typed(in.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), s,
          finite);
  });
}

}  // namespace

void correlate_cpu(const at::Tensor& in, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& residual,
                   at::Tensor& out, const CorrelationShape& s, bool end_to_end) {
  // Short rows (conv1d.h, lay_end_to_end): each sample's segment holds `lead` zeros, its values, and zeros up to a
  // length (a multiple of the stride) past every position its outputs read, so every read outside the sample is a
  // zero of its own segment; the outputs of each segment's first `out_length` positions are the sample's. Not with
  // a non-finite weight (a zero of the padding times it would be NaN).
  // Laid only where a segment is also at most about twice the sample (a padding far wider than the input would be
  // written out as zeros: +0.6 GB for padding 5e6). In 128 bits: strides and paddings near 2^62 are valid arguments.
  const int64_t lead = std::max<int64_t>(0, -s.offset), offset = s.offset + lead;  // (offset >= 0)
  const __int128 last_read = static_cast<__int128>(s.out_length - 1) * s.stride +
                             static_cast<__int128>(s.dilation) * (s.kernel_size - 1) + offset;
  const __int128 wide = (std::max<__int128>(lead + s.in_length, last_read + 1) + s.stride - 1) / s.stride * s.stride;
  const bool finite = all_finite(w);
  if (end_to_end && s.batch > 1 && s.out_length < kShortRow && worth_laying_end_to_end(wide, s.in_length) &&
      worth_laying_end_to_end(wide / s.stride, s.out_length) && finite) {
    const int64_t length = static_cast<int64_t>(wide);
    const int64_t blocks = end_to_end_blocks(s.batch), per_block = (s.batch + blocks - 1) / blocks;
    const at::Tensor rows = lay_end_to_end(in, lead, length, blocks);
    at::Tensor out_rows = at::empty({blocks, s.out_channels, per_block * length / s.stride}, out.options());
    // (a residual laid the same way as the outputs: sample m's at [m * length / stride, ...) of its block's rows)
    const at::Tensor residual_rows =
        residual.defined() ? lay_end_to_end(residual, 0, length / s.stride, blocks) : at::Tensor();
    correlate_kernel(rows, w, bias, residual_rows, out_rows,
                     {blocks, s.in_channels, per_block * length, s.out_channels, s.kernel_size,
                      per_block * length / s.stride, s.stride, s.dilation, offset, s.groups, s.act},
                     finite);
    take_end_to_end(out_rows, length / s.stride, out);
    return;
  }
  correlate_kernel(in, w, bias, residual, out, s, finite);
}

}  // namespace PYOPS_CPU_ISA
}  // namespace pyops
