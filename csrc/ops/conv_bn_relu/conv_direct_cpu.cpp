// Our direct convolution for the CPU, with the bias + residual + activation epilogue applied to the accumulators while
// they are still in registers: the output is written once, already final.
//
// One task per (image, group, output row, tile of output columns) computes out[oc][t] = Σ_k W[k][oc]·S[k][t], a small
// GEMM over the row-im2col strip S[k][t] of its outputs (k = (ic, kh, kw), t = output column, zero where the window is
// in the padding), whose micro-kernel keeps J output channels × TV vectors of columns in registers (each strip load
// feeds J FMAs, each weight broadcast TV FMAs). Every output channel of the group reuses the same strip. The
// micro-kernel reads S through one pointer per k. At column stride 1 each strip row is a slice of the input, so the
// call copies the input once into a zero-padded buffer and the pointers point into it; at other strides the task
// gathers its strip (at most kStripBytes, so it stays in L1/L2). (The gather had cost more than the FMAs on small
// layers: 57 % of the kernel's time on the homework's 16→16 3×3 layer on 32×32 maps, stop 35.)
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

// Weights regrouped as [group][k][oc padded to a multiple of J] (zeros in the padding) so the micro-kernel reads
// its J weights of one k contiguously.
template <typename scalar_t, typename acc>
std::vector<acc> regroup_weights(const scalar_t* w, const ConvGeometry& g, int64_t oc_pad) {
  const int64_t cout_g = g.cout / g.groups, k_total = (g.cin / g.groups) * g.kh * g.kw;
  std::vector<acc> out(static_cast<size_t>(g.groups * k_total * oc_pad), acc(0));
  for (int64_t oc = 0; oc < g.cout; ++oc) {
    const int64_t grp = oc / cout_g, ocl = oc % cout_g;
    for (int64_t k = 0; k < k_total; ++k) out[(grp * k_total + k) * oc_pad + ocl] = static_cast<acc>(w[oc * k_total + k]);
  }
  return out;
}

struct Epilogue {
  int64_t n, oh, ow0, tw;        // the task's outputs: image, row, first column, columns
  const int64_t* os;             // output strides
  const int64_t* rs;             // residual strides
  Activation act;
};

// out[oc0 + j][ow0 + t] for j < J, t < TV·VL, with the epilogue fused into the store.
template <typename scalar_t, typename acc, int J, int TV>
inline void micro_kernel(const acc* const* strip, int64_t k_total, const acc* w, int64_t ld_w, int64_t t0,
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
    const acc* wk = w + k * ld_w;
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
  for (int j = 0; j < J && j < oc_count; ++j) {
    const int64_t oc = oc0 + j;
    const Vec b(bias ? static_cast<acc>(bias[oc]) : acc(0));
    scalar_t* dst = out + e.n * e.os[0] + oc * e.os[1] + e.oh * e.os[2];
    const scalar_t* res = residual ? residual + e.n * e.rs[0] + oc * e.rs[1] + e.oh * e.rs[2] : nullptr;
    for (int v = 0; v < TV; ++v) {
      const int64_t t = t0 + v * VL, count = std::min<int64_t>(VL, e.tw - t);
      if (count <= 0) break;
      const int64_t ow = e.ow0 + t;
      Vec r = Vec::loadu(tile[j] + v * VL) + b;
      if constexpr (std::is_same_v<scalar_t, acc>) {
        if (contiguous_rows) {
          if (res) r = r + Vec::loadu(res + ow, count);
          activate(r, e.act).store(dst + ow, count);
          continue;
        }
      }
      // Other dtypes and strided rows: the residual gathered into lanes, added and activated as a vector (a scalar
      // ReLU after a residual add branched on the sign of each value: a bfloat16 1×1 layer ran 5x slower with
      // its residual than without), then each lane rounded to the output's dtype.
      acc lanes[VL];
      if (res) {
        for (int64_t i = 0; i < VL; ++i) lanes[i] = i < count ? static_cast<acc>(res[(ow + i) * e.rs[3]]) : acc(0);
        r = r + Vec::loadu(lanes);
      }
      activate(r, e.act).store(lanes);
      for (int64_t i = 0; i < count; ++i) dst[(ow + i) * e.os[3]] = static_cast<scalar_t>(lanes[i]);
    }
  }
}

// x (N, C, H, W) in the accumulation type, each plane with `padding` zeros around it, and `slack` zeros after the
// last plane: a micro-kernel's lanes past the end of a row read on into the next row (their outputs are not
// stored), and past the last row into the slack. Every value is written once, by the threads (no serial memset).
template <typename scalar_t, typename acc>
std::unique_ptr<acc[]> zero_padded_copy(const scalar_t* x, const ConvGeometry& g, int64_t slack) {
  const int64_t p0 = g.padding[0], p1 = g.padding[1], hp = g.h + 2 * p0, wp = g.w + 2 * p1, planes = g.n * g.cin;
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
  const int64_t oc_pad = (cout_g + J - 1) / J * J;
  // Columns per task: as many micro-kernel widths as fit the strip budget (at least one), at most the row.
  const int64_t fit = std::max<int64_t>(1, kStripBytes / (k_total * kCols * static_cast<int64_t>(sizeof(acc))));
  const int64_t tile_w = std::min<int64_t>(fit, (g.ow + kCols - 1) / kCols) * kCols;
  const int64_t col_tiles = (g.ow + tile_w - 1) / tile_w;
  const std::vector<acc> wt = regroup_weights<scalar_t, acc>(w.const_data_ptr<scalar_t>(), g, oc_pad);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t* os = out.strides().data();
  const int64_t* rs = residual.defined() ? residual.strides().data() : os;
  const int64_t s1 = g.stride[1], p1 = g.padding[1], d1 = g.dilation[1];
  const bool padded = direct_reads_padded_copy(g);
  const std::unique_ptr<acc[]> xpad = padded ? zero_padded_copy<scalar_t, acc>(xp, g, kCols) : nullptr;
  const int64_t hp = g.h + 2 * g.padding[0], wp = g.w + 2 * p1;

  at::parallel_for(0, g.n * g.groups * g.oh * col_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> strip(padded ? 0 : static_cast<size_t>(k_total * tile_w));
    std::vector<const acc*> rows(static_cast<size_t>(k_total));
    for (int64_t k = 0; k < k_total && !padded; ++k) rows[k] = strip.data() + k * tile_w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ct = task % col_tiles;
      int64_t rest = task / col_tiles;
      const int64_t oh = rest % g.oh;
      rest /= g.oh;
      const int64_t grp = rest % g.groups, n = rest / g.groups;
      const int64_t ow0 = ct * tile_w, tw = std::min(tile_w, g.ow - ow0);
      if (padded) {
        // S[(ic, kh, kw)] is the padded row oh·stride + kh·dilation of channel ic from column ow0 + kw·dilation.
        const acc** r = rows.data();
        for (int64_t ic = 0; ic < cin_g; ++ic) {
          const acc* plane = xpad.get() + (n * g.cin + grp * cin_g + ic) * hp * wp;
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
      const Epilogue e{n, oh, ow0, tw, os, rs, g.act};
      const acc* wg = wt.data() + grp * k_total * oc_pad;
      for (int64_t ocb = 0; ocb < cout_g; ocb += J) {
        for (int64_t t0 = 0; t0 < tw; t0 += kCols) {
          micro_kernel<scalar_t, acc, J, TV>(rows.data(), k_total, wg + ocb, oc_pad, t0, grp * cout_g + ocb,
                                             cout_g - ocb, bp, rp, op, e);
        }
      }
    }
  });
}

}  // namespace

void conv_bias_act_direct_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                              const at::Tensor& residual, at::Tensor& out, const ConvGeometry& g) {
  // Few output channels per group (depthwise): one channel × 4 vectors of columns; else 4 channels × 2 vectors.
  const bool narrow = g.cout / g.groups < 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_bias_act_direct_cpu", [&] {
    if (narrow) {
      direct_kernel<scalar_t, 1, 4>(x, w, b, residual, out, g);
    } else {
      direct_kernel<scalar_t, 4, 2>(x, w, b, residual, out, g);
    }
  });
}

}  // namespace PYOPS_CPU_ISA
}  // namespace pyops
