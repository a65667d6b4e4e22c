// Our direct convolution for the CPU, with the bias + residual + activation epilogue applied to the accumulators while
// they are still in registers: the output is written once, already final.
//
// One task per (image, group, output row, tile of output columns) computes out[oc][t] = Σ_k W[k][oc]·S[k][t], a small
// GEMM over the row-im2col strip S[k][t] of its outputs (k = (ic, kh, kw), t = output column, zero where the window is
// in the padding), whose micro-kernel keeps J output channels × TV vectors of columns in registers (each strip load
// feeds J FMAs, each weight broadcast TV FMAs). At column stride 1 each strip row is a slice of the input, so the call
// copies the input once into a zero-padded buffer (without padding, only the last image) and a task points into it
// (the per-task gather had cost more than the FMAs on small layers: 57 % of the kernel's time on the homework's 16→16
// 3×3 layer on 32×32 maps, stop 35); at other strides the task gathers its strip (at most kStripBytes, so it stays in
// L1/L2). At stride 1 in both dimensions the output rows of a tap are consecutive rows of the padded copy, so a task
// runs along the padded image as if it were one long row ("flat"): the micro-kernel's columns no longer end with
// each output row (a 14-column row had filled 14 of a 32-column AVX-512 tile), and a task's weights serve many rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/activation_cpu.h"
#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "ops/conv_bn_relu/conv_bn_relu.h"

namespace pyops {
namespace PYOPS_CPU_ISA {  // (common/cpu_isa.h: built once per instruction set)

namespace {

constexpr int64_t kStripBytes = 192 * 1024;

// Weights regrouped as [group][block of J output channels][k][J] (zeros past the group's channels), so that a
// micro-kernel reads its block's weights in order, J after J. (A layout [group][k][channels] put a block's
// consecutive k a row of all channels apart: 2 KB for 512 channels, which maps them to two of L1's 64 sets; 48→512
// 3×3 on 12×12 ran 4x slower than oneDNN, stop 36.)
template <typename scalar_t, typename acc, int J>
std::vector<acc> regroup_weights(const scalar_t* w, const ConvGeometry& g) {
  const int64_t cout_g = g.cout / g.groups, k_total = (g.cin / g.groups) * g.kh * g.kw, blocks = (cout_g + J - 1) / J;
  std::vector<acc> out(static_cast<size_t>(g.groups * blocks * k_total * J), acc(0));
  for (int64_t oc = 0; oc < g.cout; ++oc) {
    const int64_t grp = oc / cout_g, block = oc % cout_g / J, j = oc % cout_g % J;
    acc* dst = out.data() + ((grp * blocks + block) * k_total) * J + j;
    for (int64_t k = 0; k < k_total; ++k) dst[k * J] = static_cast<acc>(w[oc * k_total + k]);
  }
  return out;
}

// The task's outputs as positions f0 + t, t < tw, of its image's outputs laid out `pitch` columns a row: position f is
// row oh0 + f / pitch, column f % pitch, and is stored only if that column is < ow. A task of one row's columns has
// pitch = ow; a flat task (below) runs along the padded input's rows, whose last columns are no output.
struct Epilogue {
  int64_t n, oh0, f0, tw, pitch, ow;
  const int64_t* os;             // output strides
  const int64_t* rs;             // residual strides
  Activation act;
};

// out at positions t0 + [0, TV·VL) for channels oc0 + j, j < J, with the epilogue fused into the store.
template <typename scalar_t, typename acc, int J, int TV>
inline void micro_kernel(const acc* const* strip, int64_t k_total, const acc* w, int64_t t0,
                         int64_t oc0, int64_t oc_count, const scalar_t* bias, const scalar_t* residual, scalar_t* out,
                         const Epilogue& e) {
  using Vec = Vectorized<acc>;
  constexpr int VL = Vec::size();
  Vec c[J][TV];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < TV; ++v) c[j][v] = Vec(acc(0));
  for (int64_t k = 0; k < k_total; ++k) {
    const acc* s = strip[k] + t0;
    Vec sv[TV];
    for (int v = 0; v < TV; ++v) sv[v] = Vec::loadu(s + v * VL);
    const acc* wk = w + k * J;
    for (int j = 0; j < J; ++j) {
      const Vec wv(wk[j]);
      for (int v = 0; v < TV; ++v) c[j][v] = at::vec::fmadd(wv, sv[v], c[j][v]);
    }
  }
  // Leave the accumulators through a small L1 tile: indexing c with the runtime channel count below would make the
  // compiler keep c in memory, storing it on every k step.
  alignas(64) acc tile[J][TV * VL];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < TV; ++v) c[j][v].store(tile[j] + v * VL);
  const bool contiguous_rows = e.os[3] == 1 && (!residual || e.rs[3] == 1);
  const int64_t channels = std::min<int64_t>(J, oc_count);
  const int64_t end = std::min<int64_t>(TV * VL, e.tw - t0);
  // Runs of lanes that land in one output row: one per vector in a task of one row, more in a flat task.
  for (int64_t lane = 0; lane < end;) {
    const int64_t f = e.f0 + t0 + lane, row = e.oh0 + f / e.pitch, col = f % e.pitch;
    const int64_t run = std::min<int64_t>({end - lane, e.pitch - col, int64_t{VL}});
    const int64_t count = std::min<int64_t>(run, e.ow - col);  // (none in a row's padding columns)
    for (int64_t j = 0; j < channels && count > 0; ++j) {
      const int64_t oc = oc0 + j;
      const Vec b(bias ? static_cast<acc>(bias[oc]) : acc(0));
      scalar_t* dst = out + e.n * e.os[0] + oc * e.os[1] + row * e.os[2];
      const scalar_t* res = residual ? residual + e.n * e.rs[0] + oc * e.rs[1] + row * e.rs[2] : nullptr;
      Vec r = Vec::loadu(tile[j] + lane, count) + b;
      if constexpr (std::is_same_v<scalar_t, acc>) {
        if (contiguous_rows) {
          if (res) r = r + Vec::loadu(res + col, count);
          activate(r, e.act).store(dst + col, count);
          continue;
        }
      }
      // Other dtypes and strided rows: the residual gathered into lanes, added and activated as a vector (a scalar
      // ReLU after a residual add branched on the sign of each value: a bfloat16 1×1 layer ran 5x slower with
      // its residual than without), then each lane rounded to the output's dtype.
      acc lanes[VL];
      if (res) {
        for (int64_t i = 0; i < VL; ++i) lanes[i] = i < count ? static_cast<acc>(res[(col + i) * e.rs[3]]) : acc(0);
        r = r + Vec::loadu(lanes);
      }
      activate(r, e.act).store(lanes);
      for (int64_t i = 0; i < count; ++i) dst[(col + i) * e.os[3]] = static_cast<scalar_t>(lanes[i]);
    }
    lane += run;
  }
}

// x (images, C, H, W) in the accumulation type, each plane with `padding` zeros around it, and `slack` zeros after
// the last plane: a micro-kernel's lanes past the end of a row read on into the next row (their outputs are not
// stored), and past the last row into the slack. Every value is written once, by the threads (no serial memset).
template <typename scalar_t, typename acc>
std::unique_ptr<acc[]> zero_padded_copy(const scalar_t* x, const ConvGeometry& g, int64_t images, int64_t slack) {
  const int64_t p0 = g.padding[0], p1 = g.padding[1], hp = g.h + 2 * p0, wp = g.w + 2 * p1, planes = images * g.cin;
  std::unique_ptr<acc[]> out(new acc[planes * hp * wp + slack]);
  std::fill_n(out.get() + planes * hp * wp, slack, acc(0));
  at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (hp * wp)), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* src = x + plane * g.h * g.w;
      acc* dst = out.get() + plane * hp * wp;
      std::fill_n(dst, p0 * wp + p1, acc(0));  // (the top rows and the first row's left padding)
      for (int64_t r = 0; r < g.h; ++r) {
        acc* row = dst + (p0 + r) * wp + p1;
        for (int64_t c = 0; c < g.w; ++c) row[c] = static_cast<acc>(src[r * g.w + c]);
        // (this row's right padding, and the next row's left padding or the bottom rows)
        std::fill_n(row + g.w, r + 1 < g.h ? 2 * p1 : p1 + p0 * wp, acc(0));
      }
      if (g.h == 0) std::fill_n(dst, hp * wp, acc(0));
    }
  });
  return out;
}

template <typename scalar_t, int J, int TV>
void direct_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& residual,
                   at::Tensor& out, const ConvGeometry& g) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kCols = TV * Vectorized<acc>::size();  // columns per micro-kernel call
  const int64_t cin_g = g.cin / g.groups, cout_g = g.cout / g.groups, k_total = cin_g * g.kh * g.kw;
  const int64_t s1 = g.stride[1], p1 = g.padding[1], d1 = g.dilation[1];
  const bool padded = direct_reads_padded_copy(g);
  const int64_t hp = g.h + 2 * g.padding[0], wp = g.w + 2 * p1;
  // At stride 1 in both dimensions a tap's inputs for consecutive output rows are consecutive rows of the padded
  // copy: a task runs along the padded image, all its rows as one (`flat`; the wp − ow columns past each output row
  // are computed and not stored). Else a task is one output row's columns.
  const bool flat = padded && g.stride[0] == 1;
  const int64_t positions = flat ? direct_flat_positions(g) : g.ow, rows_per_image = flat ? 1 : g.oh;
  int64_t tile_w;
  if (flat) {
    // The task's inputs, its channels' rows over its columns plus the taps' reach, within 65536 values (L2); fewer
    // columns where that leaves under 16 tasks a thread, so that the threads finish together (batch 1, µs, 16 / 4
    // tasks a thread: 64→64 3×3 on 56×56 526 / 605, 16→16 on 112×112 157 / 184; batch 8 16→16 on 32×32 111 / 108).
    const int64_t reach = (g.kh - 1) * g.dilation[0] * wp + (g.kw - 1) * d1;
    const int64_t fit = (65536 / cin_g - reach) / kCols, widths = (positions + kCols - 1) / kCols;
    const int64_t spread = g.n * g.groups * widths / (16 * at::get_num_threads());
    tile_w = std::clamp<int64_t>(std::min(fit, spread), 1, widths) * kCols;
  } else {
    // As many micro-kernel widths as fit the strip budget (at least one), at most the row.
    const int64_t fit = std::max<int64_t>(1, kStripBytes / (k_total * kCols * static_cast<int64_t>(sizeof(acc))));
    tile_w = std::min<int64_t>(fit, (g.ow + kCols - 1) / kCols) * kCols;
  }
  const int64_t col_tiles = (positions + tile_w - 1) / tile_w;
  const std::vector<acc> wt = regroup_weights<scalar_t, acc, J>(w.const_data_ptr<scalar_t>(), g);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t* os = out.strides().data();
  const int64_t* rs = residual.defined() ? residual.strides().data() : os;
  // Without padding a float input is its own padded copy but for the slack past its end, which only its last image's
  // tiles read into: the copy then holds that image, and the others are read in place (1×1 layers: the copy had
  // been ~10 % of the call).
  const bool in_place = padded && g.padding[0] == 0 && g.padding[1] == 0 && std::is_same_v<scalar_t, acc>;
  const int64_t first_copied = in_place ? g.n - 1 : 0;
  const std::unique_ptr<acc[]> xpad =
      padded ? zero_padded_copy<scalar_t, acc>(xp + first_copied * g.cin * g.h * g.w, g, g.n - first_copied, kCols)
             : nullptr;
  const auto padded_image = [&](int64_t n) -> const acc* {  // image n's planes, padded
    if constexpr (std::is_same_v<scalar_t, acc>) {
      if (n < first_copied) return xp + n * g.cin * hp * wp;
    }
    return xpad.get() + (n - first_copied) * g.cin * hp * wp;
  };

  at::parallel_for(0, g.n * g.groups * rows_per_image * col_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> strip(padded ? 0 : static_cast<size_t>(k_total * tile_w));
    std::vector<const acc*> rows(static_cast<size_t>(k_total));
    for (int64_t k = 0; k < k_total && !padded; ++k) rows[k] = strip.data() + k * tile_w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ct = task % col_tiles;
      int64_t rest = task / col_tiles;
      const int64_t oh = rest % rows_per_image;
      rest /= rows_per_image;
      const int64_t grp = rest % g.groups, n = rest / g.groups;
      const int64_t ow0 = ct * tile_w, tw = std::min(tile_w, positions - ow0);
      if (padded) {
        // S[(ic, kh, kw)] is the padded row oh·stride + kh·dilation of channel ic from column ow0 + kw·dilation (a
        // flat task's oh is 0 and its ow0 runs on across the rows).
        const acc** r = rows.data();
        for (int64_t ic = 0; ic < cin_g; ++ic) {
          const acc* plane = padded_image(n) + (grp * cin_g + ic) * hp * wp;
          for (int64_t kh = 0; kh < g.kh; ++kh) {
            const acc* row = plane + (oh * g.stride[0] + kh * g.dilation[0]) * wp + ow0;
            for (int64_t kw = 0; kw < g.kw; ++kw) *r++ = row + kw * d1;
          }
        }
      } else {
        // Gather the strip: S[(ic, kh, kw)][t] = x[n][ic][ih][iw], 0 in the padding and past the row's end.
        acc* sp = strip.data();
        for (int64_t ic = 0; ic < cin_g; ++ic) {
          const scalar_t* xc = xp + (n * g.cin + grp * cin_g + ic) * g.h * g.w;
          for (int64_t kh = 0; kh < g.kh; ++kh) {
            const int64_t ih = oh * g.stride[0] - g.padding[0] + kh * g.dilation[0];
            for (int64_t kw = 0; kw < g.kw; ++kw, sp += tile_w) {
              const int64_t base = ow0 * s1 - p1 + kw * d1;
              int64_t t_lo = base >= 0 ? 0 : (-base + s1 - 1) / s1;
              int64_t t_hi = base >= g.w ? 0 : std::min(tw, (g.w - 1 - base) / s1 + 1);
              if (ih < 0 || ih >= g.h) t_lo = t_hi = 0;
              t_lo = std::min(t_lo, tile_w), t_hi = std::max(t_hi, t_lo);
              std::fill(sp, sp + t_lo, acc(0));
              const scalar_t* row = xc + (ih >= 0 && ih < g.h ? ih : 0) * g.w;
              if (s1 == 1) {
                for (int64_t t = t_lo; t < t_hi; ++t) sp[t] = static_cast<acc>(row[base + t]);
              } else {
                for (int64_t t = t_lo; t < t_hi; ++t) sp[t] = static_cast<acc>(row[base + t * s1]);
              }
              std::fill(sp + t_hi, sp + tile_w, acc(0));
            }
          }
        }
      }
      const Epilogue e{n, oh, ow0, tw, flat ? wp : g.ow, g.ow, os, rs, g.act};
      const acc* wg = wt.data() + grp * ((cout_g + J - 1) / J) * k_total * J;
      for (int64_t ocb = 0; ocb < cout_g; ocb += J) {
        for (int64_t t0 = 0; t0 < tw; t0 += kCols) {
          micro_kernel<scalar_t, acc, J, TV>(rows.data(), k_total, wg + ocb * k_total, t0, grp * cout_g + ocb,
                                             cout_g - ocb, bp, rp, op, e);
        }
      }
    }
  });
}

}  // namespace

void conv_bias_act_direct_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                              const at::Tensor& residual, at::Tensor& out, const ConvGeometry& g) {
  // Register tiles (direct_tile, conv_bn_relu.h) of J output channels × TV vectors of columns, as large as the vector
  // registers allow with 3 vectors of inputs and a weight beside them (32 registers in the AVX-512 build, 16 in the
  // AVX2 one): each input vector loaded feeds J FMAs, each weight broadcast TV; AVX-512 tiles of 4 channels where 8
  // would compute many padding channels. Few output channels per group (depthwise): one channel × 4 vectors.
  // Stop 36, Zen 5, µs, batch 8 unless said: AVX-512 8×3 / 12×2 / 4×3 / 6×4 tiles, 16→16 3×3 on 32×32 112 / 156 /
  // 114 / 121, 64→64 on 56×56 3949 / 4408 / 4460 / 4124, 256→256 on 14×14 4629 / 4493 / 4985 / 4960, 1024→256 1×1
  // on 14×14 2318 / 2296 / 3131 / 2657; 32→12 3×3 on 28×28 batch 2 44 / 36 / 37 / 37. AVX2 4×3 / 6×2 / the former
  // 4×2: 16→16 192 / 208 / 204, 64→64 7646 / 7795 / 8329, 256→256 8893 / 8375 / 9037.
  constexpr bool kWide = Vectorized<float>::size() == 16;
  const DirectTile tile = direct_tile(g, kWide);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_bias_act_direct_cpu", [&] {
    if (tile.j == 1) {
      direct_kernel<scalar_t, 1, 4>(x, w, b, residual, out, g);
    } else if (tile.j == 8) {
      direct_kernel<scalar_t, 8, 3>(x, w, b, residual, out, g);
    } else {
      direct_kernel<scalar_t, 4, 3>(x, w, b, residual, out, g);
    }
  });
}

}  // namespace PYOPS_CPU_ISA
}  // namespace pyops
