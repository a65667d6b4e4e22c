// CPU kernels of the fused convolution ops: the BN fold, conv2d_bias_act's path choice (our direct kernel or
// oneDNN's convolution with its post-op epilogue), the same with a weight prepacked once in oneDNN's blocked layout,
// and the backward's single pass over grad_output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/activation_cpu.h"
#include "common/checks.h"
#include "common/cpu_vec.h"
#include "common/onednn.h"
#include "ops/conv_bn_relu/conv_bn_relu.h"
#include "ops/conv_bn_relu/linear.h"

namespace pyops {

namespace {

// ---- BN fold: one pass over the weight, per-channel factors in float64 ----

std::vector<double> as_doubles(const std::optional<at::Tensor>& t, int64_t len, double fill) {
  if (!t.has_value()) return std::vector<double>(static_cast<size_t>(len), fill);
  const at::Tensor d = t->to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + len);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_fold_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
    double eps) {
  check_bn_args(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
  const int64_t c = weight.size(0), k = c > 0 ? weight.numel() / c : 0;
  const auto mean = as_doubles(running_mean, c, 0.0), var = as_doubles(running_var, c, 0.0);
  const auto gamma = as_doubles(bn_weight, c, 1.0), beta = as_doubles(bn_bias, c, 0.0), b = as_doubles(bias, c, 0.0);
  const auto acc_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w_out = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor b_out = at::empty({c}, weight.options());
  at::Tensor scale_out = at::empty({c}, weight.options().dtype(acc_dtype));
  const at::Tensor w_in = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "conv_bn_fold_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* wi = w_in.const_data_ptr<scalar_t>();
    scalar_t* wo = w_out.mutable_data_ptr<scalar_t>();
    scalar_t* bo = b_out.mutable_data_ptr<scalar_t>();
    acc* so = scale_out.mutable_data_ptr<acc>();
    // Threads only past ~1M weights: a ResNet layer's fold is ~0.1 ms of work, less than waking a thread team.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(k, 1));
    at::parallel_for(0, c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const double s = gamma[ch] / std::sqrt(var[ch] + eps);
        so[ch] = static_cast<acc>(s);
        bo[ch] = static_cast<scalar_t>((b[ch] - mean[ch]) * s + beta[ch]);
        for (int64_t i = ch * k; i < (ch + 1) * k; ++i) wo[i] = static_cast<scalar_t>(static_cast<double>(wi[i]) * s);
      }
    });
  });
  return {w_out, b_out, scale_out};
}

// ---- backward: grad·act'(output)·scale[c] (and grad·act'(output)) in one pass ----

// grad·act'(output) on one vector: a select, as torch's threshold_backward and hardtanh_backward (a masked lane is 0
// even where the gradient is inf or NaN). Their masks, output <= 0 and output <= 0 or >= 6, are false for a NaN
// output, which passes the gradient: so torch's CUDA kernels, decompositions and CPU scalar loops (the vector body of
// its CPU hardtanh_backward stops it: ATen disagrees with itself there; ours follows the rest on both devices).
template <typename acc>
inline Vectorized<acc> act_grad(Vectorized<acc> grad, Vectorized<acc> output, Activation act) {
  using Vec = Vectorized<acc>;
  const Vec zero(acc(0));
  if (act == Activation::kRelu) return Vec::blendv(grad, zero, output <= zero);
  if (act == Activation::kRelu6) return Vec::blendv(grad, zero, (output <= zero) | (output >= Vec(acc(6))));
  return grad;
}

// The pass over one row of len values (a channel of one image, scale[c] for all; or a position's channels, scale
// read along the row), in vectors of scalar_t: fp16/bf16 lanes are converted to two float vectors and back.
template <typename scalar_t>
void act_backward_row(const scalar_t* grad, const scalar_t* output, const acc_t<scalar_t>* scale_along,
                      acc_t<scalar_t> row_scale, scalar_t* scaled, scalar_t* masked, int64_t len, Activation act) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<scalar_t>;
  using AccVec = Vectorized<acc>;
  constexpr int64_t V = Vec::size(), A = AccVec::size();
  const auto scaled_by = [&](AccVec m, int64_t i, int64_t n) {  // (n <= 0: the second float vector of a short tail)
    return scale_along ? m * AccVec::loadu(scale_along + i, std::max<int64_t>(0, std::min(A, n)))
                       : m * AccVec(row_scale);
  };
  for (int64_t i = 0; i < len; i += V) {
    const int64_t n = std::min(V, len - i);
    const Vec g = Vec::loadu(grad + i, n), y = Vec::loadu(output + i, n);
    if constexpr (std::is_same_v<scalar_t, acc>) {
      const AccVec m = act_grad(g, y, act);
      scaled_by(m, i, n).store(scaled + i, n);
      if (masked) m.store(masked + i, n);
    } else {
      auto [g0, g1] = at::vec::convert_to_float<scalar_t>(g);
      auto [y0, y1] = at::vec::convert_to_float<scalar_t>(y);
      const AccVec m0 = act_grad(g0, y0, act), m1 = act_grad(g1, y1, act);
      at::vec::convert_from_float<scalar_t>(scaled_by(m0, i, n), scaled_by(m1, i + A, n - A)).store(scaled + i, n);
      if (masked) at::vec::convert_from_float<scalar_t>(m0, m1).store(masked + i, n);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> conv_act_backward_cpu(const at::Tensor& grad, const at::Tensor& output,
                                                         const std::optional<at::Tensor>& scale, int64_t activation,
                                                         bool unscaled_too) {
  const Activation act = check_conv_act_backward_args(grad, output, scale, activation);
  const int64_t n = output.size(0), c = output.size(1), hw = output.size(2) * output.size(3);
  const auto fmt = output_memory_format(output);
  const bool has_scale = scale.has_value(), second = has_scale && unscaled_too;
  at::Tensor g_scaled, g_masked;  // (not structured bindings: the kernel lambda below captures them)
  std::tie(g_scaled, g_masked) = conv_act_backward_outputs(output, has_scale, unscaled_too);
  if (output.numel() == 0) return {g_scaled, g_masked};
  const at::Tensor gc = grad.contiguous(fmt), oc = output.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "conv_act_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor sc = has_scale ? scale->to(output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous()
                                    : at::Tensor();
    const acc* sp = has_scale ? sc.const_data_ptr<acc>() : nullptr;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* op = oc.const_data_ptr<scalar_t>();
    scalar_t* gs = g_scaled.mutable_data_ptr<scalar_t>();
    scalar_t* gm = second ? g_masked.mutable_data_ptr<scalar_t>() : nullptr;
    // Rows: (n, c) rows of hw elements sharing one scale (NCHW), or (n, h, w) rows of c elements (channels_last).
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    const int64_t rows = cl ? n * hw : n * c, len = cl ? c : hw;
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * len;
        act_backward_row<scalar_t>(gp + off, op + off, cl ? sp : nullptr, (!cl && sp) ? sp[r % c] : acc(1), gs + off,
                                   gm ? gm + off : nullptr, len, act);
      }
    });
  });
  return {g_scaled, g_masked};
}

// ---- forward ----

// oneDNN's convolution with post-ops (what inductor's CPU fusion calls), reached through the dispatcher because
// ATen declares no C++ function for it. Absent on builds without oneDNN.
const c10::OperatorHandle* onednn_op(const char* overload) {
  static const auto unary = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  static const auto binary = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", "binary"});
  const auto& h = std::string(overload).empty() ? unary : binary;
  return h.has_value() ? &*h : nullptr;
}

// Whether some tap of some output window reads the input along a dimension (size, kernel k, stride s, padding p,
// dilation d, out outputs): not when the padding is so wide that every window lies in it.
bool reads_input(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, int64_t out) {
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t t = 0; t < k; ++t) {
      const int64_t i = o * s - p + t * d;
      if (i >= 0 && i < size) return true;
    }
  }
  return false;
}

// oneDNN's post-ops cover none/relu/relu6 alone, none/relu after a residual add (library_forward adds the others
// after it). Not a dilated dimension whose every window lies in the padding: oneDNN (torch 2.14's, with post-ops)
// crashed there, e.g. a 1×2 kernel dilated 1×2 with padding 0×3 on a 8×1 input, where F.conv2d, and our kernel,
// return the bias.
bool library_supports(const at::Tensor& x, const ConvGeometry& g, bool has_residual) {
  if (!onednn_computes(x.scalar_type()) || g.cin == 0) return false;
  if ((g.dilation[0] > 1 && !reads_input(g.h, g.kh, g.stride[0], g.padding[0], g.dilation[0], g.oh)) ||
      (g.dilation[1] > 1 && !reads_input(g.w, g.kw, g.stride[1], g.padding[1], g.dilation[1], g.ow))) {
    return false;
  }
  return onednn_op(has_residual ? "binary" : "") != nullptr;
}

// out = act(out + bias [+ residual]) in place on a float32 convolution output (bias: one per output channel, or
// undefined), in one pass of bias_residual_activate over out's rows in memory format fmt.
void epilogue_(at::Tensor& out, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
               const ConvGeometry& g, at::MemoryFormat fmt) {
  TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat && out.is_contiguous(fmt));
  const at::Tensor res = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  bias_residual_activate(out.mutable_data_ptr<float>(), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                         res.defined() ? res.const_data_ptr<float>() : nullptr, g.n * (cl ? g.oh * g.ow : g.cout),
                         cl ? g.cout : g.oh * g.ow, !cl, g.cout, g.act);
}

// t in memory format fmt with the strides a fresh tensor of its sizes has. contiguous(fmt) keeps a size-1
// dimension's stride as it is (vmap's per-sample slices: batch stride 256 on a 1×64×8×32 channels_last image), and
// mkldnn::_convolution_pointwise, which asks suggest_memory_format, then took such an input for NCHW and added the
// residual with ATen's add_relu, which has no bfloat16 kernel (INTERNAL ASSERT; fp32: an unfused add).
at::Tensor with_canonical_strides(const at::Tensor& t, at::MemoryFormat fmt) {
  at::Tensor c = t.contiguous(fmt);
  const auto sizes = c.sizes();
  const bool canonical = fmt == at::MemoryFormat::ChannelsLast
                             ? c.strides() == at::IntArrayRef(c10::get_channels_last_strides_2d(sizes))
                             : c.strides() == at::IntArrayRef(c10::contiguous_strides(sizes));
  return canonical ? c : at::empty(sizes, c.options().memory_format(fmt)).copy_(c);
}

at::Tensor library_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& residual, const ConvGeometry& g, at::MemoryFormat fmt) {
  const std::vector<int64_t> padding(g.padding.begin(), g.padding.end()), stride(g.stride.begin(), g.stride.end()),
      dilation(g.dilation.begin(), g.dilation.end());
  c10::List<std::optional<at::Scalar>> scalars;
  std::string unary = "none";
  if (g.act == Activation::kRelu) unary = "relu";
  if (g.act == Activation::kRelu6) {
    unary = "hardtanh";
    scalars.push_back(at::Scalar(0.0));
    scalars.push_back(at::Scalar(6.0));
  }
  const c10::IValue bias = b.has_value() ? c10::IValue(b->contiguous()) : c10::IValue();
  const at::Tensor weight = w.is_mkldnn() ? w : w.contiguous();  // a prepacked (opaque) weight goes in as it is
  // With a residual, mkldnn::_convolution_pointwise fuses the add only for groups == 1 on channels_last tensors;
  // elsewhere it falls back to at::convolution and ATen's add_relu, which has no float16/bfloat16 kernel, and
  // at::convolution gives a small dilated image to slow_conv_dilated2d, which adds the bias one channel at a time
  // (3 ATen calls a channel: 48→48 on 5×5 took 110 µs, oneDNN's unary call 12). Those add here, after oneDNN's
  // convolution, as do residual adds followed by ReLU6, which its post-ops do not take.
  const bool add_after = residual.has_value() && (g.act == Activation::kRelu6 || g.groups != 1 ||
                                                  fmt != at::MemoryFormat::ChannelsLast);
  torch::jit::Stack stack;
  if (residual.has_value() && !add_after) {
    stack = {with_canonical_strides(x, fmt), with_canonical_strides(*residual, fmt), weight, bias, padding, stride,
             dilation, g.groups, std::string("add"), c10::IValue(),
             g.act == Activation::kNone ? c10::IValue() : c10::IValue(unary), scalars, c10::IValue()};
    onednn_op("binary")->callBoxed(&stack);
  } else {
    stack = {with_canonical_strides(x, fmt), weight, bias, padding, stride, dilation, g.groups,
             add_after ? std::string("none") : unary, scalars, std::string("")};
    onednn_op("")->callBoxed(&stack);
  }
  at::Tensor out = stack.back().toTensor();
  if (!out.is_contiguous(fmt)) out = out.contiguous(fmt);  // oneDNN keeps the format; this only guards it
  if (add_after && out.scalar_type() == at::kFloat) epilogue_(out, at::Tensor(), residual, g, fmt);
  if (add_after && out.scalar_type() != at::kFloat) activation_aten(out.add_(*residual), g.act, /*in_place=*/true);
  return out;
}

bool unit_stride(const ConvGeometry& g) { return g.stride[0] == 1 && g.stride[1] == 1; }
bool dilated(const ConvGeometry& g) { return g.dilation[0] > 1 || g.dilation[1] > 1; }

// Measured (bench/NOTES-conv_bn_relu.md, single-thread CPU time): our direct kernel beats oneDNN only where the
// reduction per output is short (Cin/groups·KH·KW <= 32, e.g. the homework's 3→16 3×3 layer), the stride is 1 (its
// strip gather is contiguous) and there are 4..16 output channels per group; oneDNN wins on ResNet-sized layers,
// strided stems and depthwise convolutions -- except on small ones: oneDNN's call (mkldnn::_convolution_pointwise
// builds its primitive and reorders the weight every time) costs ~150 µs whatever the size. Below 2^23 (8.4M)
// multiply-adds a call the direct kernel was 1.16-3.9x faster on dense and grouped shapes with reductions up to 512
// (2→2 to 256→64, 1×1 to 7×7, stride 1 and 2; 2 threads; around 9.4M it is 0.94-1.63x), but not with longer
// reductions on tiny maps (128→128 3×3 on 2×2: 0.34x, 512→16 3×3 on 4×4: 0.62x; 64→64 3×3 on 4×4: 0.93-1.22x),
// nor on depthwise layers (0.76-2.1x): those stay with the rule above. Nor on rows narrower than the kernel's
// 16-column tile (stop 24, 1 thread, µs direct vs oneDNN: RegNet's 400→400 in 25 groups on 7×7 314 vs 108, 160→160
// in 10 groups on 14×14 285 vs 113, 256→256 1×1 on a 1×1 map 176 vs 70; 16×16 maps 90 vs 84). Layers with a
// depth multiplier (one input channel per group, 2..16 outputs: 16→32 in 16 groups) are the direct kernel's at any
// stride: oneDNN's grouped path took 190 vs 58 µs at 28×28, 4423 vs 1294 at 32→96 stride 2 on 56×56, batch 8; so
// are single-channel stems at stride 1 (1→64 3×3 on 224×224: 6966 vs 1938 µs; at stride 2, 1→64 5×5: 403 vs 578).
// All of that on AVX2 CPUs. Where oneDNN runs AVX-512 beside our AVX2 kernel (onednn_vectors_wider: the Sapphire
// Rapids VMs, stop 26) its call costs ~30-50 µs and its dense convolutions run ~2x faster: the direct kernel wins
// on small products only, under ~1.5M multiply-adds per thread (µs direct vs oneDNN, 1 / 2 threads: 3→16 on 32×32
// batch 1 26 vs 55 / 18 vs 57, batch 8 178 vs 123 / 95 vs 85, the homework's batch 100 2246 vs 1136 / 1143 vs 619;
// 16→16 on 32×32 81 vs 84 / 48 vs 89; 1→32 3×3 on 112×112 265 vs 253 / 137 vs 118), and on depth multipliers
// (16→64 in 16 groups on 28×28, batch 8: 563 vs 2236 / 288 vs 1134). Measured on 1 and 2 threads; more threads
// keep the 2-thread bound.
// Dilated layers with rows narrower than the direct kernel's 16-column tile and a small product: oneDNN's call
// (~50 µs on the AVX-512 VMs, ~150 on AVX2 ones) is most of their time, and the direct kernel is 2-5x faster even
// where it must write a channels_last output (stop 29: 60 random dilated layers, 8-128 channels, dilation 2-6, 5×5 to
// 17×17 maps, batch 1-8, 1 and 2 threads, pyops.nn.ConvBNReLU2d µs direct vs oneDNN: 16→16 (3,1) dilation 2 on
// 12×12 14 vs 63, 16→8 3×3 on 9×9 17 vs 65, 8→16 (1,3) dilation 4 on 14×14 12 vs 51, 32→16 (1,3) dilation 6 on 14×14
// batch 2 27 vs 72, 64→8 (1,3) on 7×7 30 vs 49; but a 384-long reduction 128→8 (1,3) on 14×14 batch 2 106 vs 71,
// and 4.8M multiply-adds, 32→32 (3,1) on 14×14 batch 8, 110 vs 95). Measured on Sapphire Rapids (AVX-512).
bool tiny_dilated_layer(const ConvGeometry& g) {
  const int64_t k = g.cin / g.groups * g.kh * g.kw, threads = std::min<int64_t>(at::get_num_threads(), 2);
  return dilated(g) && g.ow < 16 && k <= 192 && g.n * g.cout * g.oh * g.ow * k < (int64_t{1} << 20) * threads;
}

// Layers our direct kernel runs in flat tasks (stride 1) with its AVX-512 build, on a CPU where oneDNN runs AVX-512
// too: for an NCHW output (a channels_last one takes oneDNN, use_library) the rule below chooses their path.
bool flat_avx512_direct(const ConvGeometry& g) {
  return onednn_vectors_wider() && cpu_avx512_selected() && direct_runs_flat(g);
}

// Such layers take our kernel rather than oneDNN or MKL's GEMM for reductions of at most 32 at any size and under 4M
// multiply-adds a thread; beyond those, with sizes counted per column its tiles compute (direct_flat_output_fraction:
// the padded rows' extra columns and each image's last tile are computed too), where at least 60 % of those columns
// are outputs and either oneDNN's AVX-512 blocks of 16 channels run partly empty (a group's input or output channels
// not a multiple of 16: oneDNN ran those at 0.45-0.75 of its rate on full blocks), or the product is under 16M
// multiply-adds a thread (oneDNN's call costs ~30 µs), or at least 92 % of the columns are outputs under 256M. Past
// that both run at ~235 GMAC/s (2 threads) and our wasted columns decide. Stop 39, Zen 5, 2 threads, random stride-1
// layers (1×1 to 7×7 kernels, 8-512 input and 8-256 output channels a group, 1-4 groups, 6×6 to 56×56 maps, batch
// 1-8, 8M-600M multiply-adds), the chosen path's time over the faster of the two, geomean (worst): 160 layers of up to
// 96 output channels a group it was fitted on 1.008 (1.14; stop 36's rule 1.067, 1.83), 200 more 1.010 (1.20; 1.062,
// 1.61), 120 of 104-256 channels 1.026 (1.39; 1.132, 2.12: stop 36's rule gave those all to oneDNN). µs ours vs
// oneDNN: 64→96 7×7 on 16×16 batch 2 (67 % of the columns outputs) 953 vs 599 and 384→384 3×3 in 8 groups on 12×12
// batch 8 (75 %) 1116 vs 837, now oneDNN's; 48→256 7×7 in 2 groups on 28×28 1170 vs 1653, 192→48 5×5 in 2 groups on
// 24×24 batch 8 (24 channels a group) 2534 vs 3979 and 256→240 1×1 in 2 groups on 40×40 batch 2 510 vs 934, now ours.
bool flat_avx512_direct_is_faster(const ConvGeometry& g) {
  const int64_t cin_g = g.cin / g.groups, cout_g = g.cout / g.groups, k = cin_g * g.kh * g.kw;
  const double threads = static_cast<double>(std::min<int64_t>(at::get_num_threads(), 2));
  const double fraction = direct_flat_output_fraction(g);
  const double work = static_cast<double>(g.n * g.cout * g.oh * g.ow * k) / fraction;
  const auto mega = [&](int64_t m) { return static_cast<double>(m << 20) * threads; };
  if (k <= 32 || work < mega(4)) return true;
  if (fraction < 0.6) return false;
  const bool partial_blocks = cin_g % 16 != 0 || cout_g % 16 != 0;
  return partial_blocks || work < mega(16) || (fraction >= 0.92 && work < mega(256));
}

bool direct_is_faster(const ConvGeometry& g) {
  const int64_t cin_g = g.cin / g.groups, k = cin_g * g.kh * g.kw, cout_g = g.cout / g.groups;
  const int64_t macs = g.n * g.cout * g.oh * g.ow * k;
  const bool depth_multiplier = cin_g == 1 && cout_g >= 2 && k <= 32 && (cout_g <= 16 || unit_stride(g));
  if (onednn_vectors_wider()) {
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), 2);
    // Depthwise layers are oneDNN's but where its fixed cost is most of the call: under 16K multiply-adds a thread
    // (stop 27, oneDNN / direct time, 1 thread: 32 channels 3×3 on 7×7 at batch 1 2.6, 288 on 2×2 1.45, 960 on 1×1
    // 0.93; above it 288 on 4×4 0.65, 32 on 20×20 0.95, at batch 8 0.1-0.8; they had fallen under the dense
    // clause below, 3-5x slower than oneDNN on 16×16 to 28×28 maps).
    if (cin_g == 1 && cout_g == 1 && g.groups > 1) return macs < (int64_t{1} << 14) * threads;
    if (flat_avx512_direct(g)) return flat_avx512_direct_is_faster(g);
    const bool avx512 = cpu_avx512_selected() && direct_avx512_pays(g);
    // Column stride 1, where the kernel reads a zero-padded copy of the input (conv_bn_relu.h), reductions up to
    // 1152: under 4M multiply-adds a thread at any row width; at any size into at most 8 output channels a group,
    // where oneDNN's blocking runs mostly empty; and under 32M a thread into at most 32 with rows that fill the
    // AVX-512 build's tiles, spatial kernels only (stop 35, Zen 5, 2 threads, µs direct vs oneDNN: 16→16 3×3 on
    // 28×28 b2 41 vs 74, 24→24 3×3 on 28×28 b2 at 8.1M 70 vs 139, 48→16 3×3 on 14×14 b2 47 vs 67; 96→8 3×3 on 56×56
    // b8 at 173M 1661 vs 2650; 32→32 3×3 on 32×32 b2 at 19M 124 vs 151, 48→32 3×3 on 32×32 b2 at 28M 183 vs 203;
    // but 96→32 3×3 on 14×14 b2 at 10.8M 174 vs 119, 24→128 3×3 on 16×16 b2 at 14M 216 vs 150, 96→32 1×1 on 56×56
    // b2 at 19M 260 vs 190, 16→32 5×5 on 28×28 b8 at 80M 507 vs 387). Fitted on 120 random layers; on 100 more,
    // auto's time over the faster path 1.03 geomean (1.05 with the first two clauses alone).
    const bool wide_small_outputs = avx512 && cout_g <= 32 && g.kh * g.kw > 1 && macs < (int64_t{1} << 25) * threads;
    if (direct_reads_padded_copy(g) && k <= 1152 &&
        (macs < (int64_t{1} << 22) * threads || cout_g <= 8 || wide_small_outputs))
      return true;
    // Other column strides (the kernel gathers its strips): under 1.5M multiply-adds a thread with the AVX2 build,
    // 4M with the AVX-512 one (rows that fill its tiles; stop 35: 3→128 3×3 stride 2 on 56×56 at 2.7M 50 vs 73 µs,
    // 24→24 3×3 stride 2 on 56×56 b2 at 8.1M 171 vs 199; but 48→8 at 2.7M 103 vs 94, 432 taps).
    const int64_t small = (avx512 ? int64_t{1} << 22 : 3 * (int64_t{1} << 19)) * threads;
    // Grouped layers with short reductions (k < 32) at any size: oneDNN's NCHW grouped convolution ran them 2.5-2.8x
    // slower (median of 252 shapes, 2-32 input and 2-16 output channels a group, 4 and 32 groups, 16×16 to 56×56,
    // batch 1 and 8, 1 and 2 threads, stop 28; 24→128 in 8 groups stride 2 on 38×38 batch 8: 2785 vs 1101 µs, eager
    // 1302); at 32 taps some 1×1 layers on 16×16 maps were 0.63-0.94x.
    const bool short_grouped = g.groups > 1 && k < 32;
    // Rows narrower than 16 columns (the tile of the AVX2 build, which runs them) at those strides: small products
    // with reductions up to 256 still beat oneDNN's call, under 1M multiply-adds a thread (stop 35, Zen 5, 2 threads,
    // µs direct vs oneDNN: 32→8 3×3 stride 2 on 14×14 44 vs 83, 16→64 3×3 stride 2 on 16×16 31 vs 57; but 8→64 5×5
    // stride 2 on 14×14 batch 8 at 5M 157 vs 76).
    const bool narrow_small = g.ow < 16 && k <= 256 && macs < (int64_t{1} << 20) * threads;
    return (depth_multiplier && g.groups > 1) || ((short_grouped || (k <= 512 && macs < small)) && g.ow >= 16) ||
           narrow_small;
  }
  if (cin_g == 1) return depth_multiplier;
  if (k <= 512 && macs < (int64_t{1} << 23) && g.ow >= 16) return true;
  return k <= 32 && unit_stride(g) && cout_g >= 4 && cout_g <= 16;
}

// The rule above was measured on NCHW tensors, the direct kernel's own layout. A channels_last output (a
// channels_last input, or any packed call) makes it convert the input to NCHW and store the output one element at a
// time, while oneDNN runs channels_last natively: there oneDNN runs. In fused networks, which are channels_last
// from the stem on, that took mobilenet_v2 at batch 1 from 20.7 to 14.2 ms and resnet18 from 24.7 to 22.8 ms
// (bench/NOTES-conv_bn_relu.md, stop 16). Tiny dilated layers take the direct kernel in either layout: oneDNN's
// fixed cost makes it slower anyway.
bool use_library(const at::Tensor& input, const ConvGeometry& g, bool has_residual, at::MemoryFormat out_format) {
  const ConvPath requested = requested_conv_path();
  const bool library_faster =
      !tiny_dilated_layer(g) && (out_format == at::MemoryFormat::ChannelsLast || !direct_is_faster(g));
  return g.n > 0 && g.cout > 0 && g.oh * g.ow > 0 && library_supports(input, g, has_residual) &&
         (requested == ConvPath::kLibrary || (requested == ConvPath::kAuto && library_faster));
}

// A 1×1 layer (stride 1, no padding, one group) on a float32 input is a matrix product, run under
// PYOPS_CONV_PATH=auto as MKL's GEMM with the epilogue in place after it where that beats oneDNN's fused call
// (`one_by_one_runs_as_gemm`; measurements in bench/NOTES-conv_bn_relu.md, stops 24 and 25).
// On a channels_last input the product is one GEMM over all positions ((N·H·W, Cin) rows times the weight's
// transpose: the output's channels_last rows), where oneDNN runs channels_last natively; there oneDNN's call costs
// ~30 µs whatever the size (an 8→8 layer on 4×4), so the GEMM wins on small layers and loses on many positions.
// µs, GEMM vs oneDNN, 1 thread / 2 threads (bench/NOTES-conv_bn_relu.md, stop 25): 72→24 on 28×28 30 / 53, 23 / 52;
// 96→40 on 14×14 18 / 46, 16 / 49; 512→2048 on 7×7 696 / 978, 479 / 562; 1024→256 on 14×14 583 / 577, 317 / 333;
// 104→104 on 28×28 119 / 143, 64 / 96; 2048→512 on 7×7 batch 8 4577 / 5228, 2328 / 2887 (392 positions); but
// 64→256 on 56×56 817 / 551, 385 / 292 (2^25·1.5 multiply-adds), 1024→256 on 14×14 batch 8 4099 / 3800, 2063 /
// 1991, and small products with large outputs, whose bias and ReLU passes after the GEMM cost more than oneDNN's
// fused epilogue: 16→96 on 112×112 638 / 370, 286 / 207.
// On an NCHW input (one GEMM per image, of H·W columns) the GEMM wins on both thread counts where the images have
// >= 196 positions, 1.04-3.9x on 2 threads (64→64 on 56×56 batch 8 766 vs 1130; 1 thread, against oneDNN and our
// direct kernel: 1558 / 6523 / 3365, 116→116 on 14×14 53 / 120 / 101), and on small products as above,
// but not on several images of few positions and many channels: 2048→512 on 7×7 batch 4 1560 vs 1419, batch 8
// 3096 vs 2626, 512→2048 on 7×7 batch 16 7686 vs 5685 (2 threads). A 1×1 map is one product over the batch, a
// Linear: 2.5-3.2x faster than oneDNN's call (256→256 at batch 256: 111 vs 290 µs).
// A strided 1×1 layer (ResNet's downsampling shortcuts) is the same product over the input's subsampled positions
// (a strided view, gathered by the copy into the product's layout), under the same rule on its output positions.
// µs, GEMM vs oneDNN's call, 1 / 2 threads (stop 28): NCHW 64→128 stride 2 on 56×56 123 / 219, 88 / 144; at batch
// 8 1052 / 1488, 582 / 847; 256→512 on 14×14 123 / 176, 84 / 133; channels_last 256→512 on 14×14 98 / 154, 83 /
// 120; 1024→2048 on 14×14 batch 8 9537 / 11398, 4840 / 5792; but 1024→2048 on 14×14 NCHW 1781 / 2053, 1161 / 1116.
// oneDNN with a packed weight (conv2d_bias_act_packed) was as fast or faster on those (channels_last 1024→2048 on
// 14×14 1281 / 697 µs): the packed op keeps it for strided layers.
// (An NCHW layer that flat_avx512_direct_is_faster gives to our kernel runs there: the GEMM rule predates it. Not a
// 1×1 map, which that kernel computes in tiles of 48 columns with one output each: squeeze-excitation layers took
// 39-72 µs there against 5-10 µs for the product, 120→480 and 168→672 at batch 1, stop 43.)
bool gemm_is_faster(const at::Tensor& x, const ConvGeometry& g, at::MemoryFormat fmt) {
  return x.scalar_type() == at::kFloat && g.kh == 1 && g.kw == 1 && g.groups == 1 && g.padding[0] == 0 &&
         g.padding[1] == 0 && one_by_one_runs_as_gemm(g.n, g.cin, g.cout, g.oh, g.ow, fmt) &&
         (g.oh * g.ow == 1 ||
          !(fmt == at::MemoryFormat::Contiguous && flat_avx512_direct(g) && flat_avx512_direct_is_faster(g)));
}

at::Tensor gemm_forward(const at::Tensor& input, const at::Tensor& w, const std::optional<at::Tensor>& b,
                        const std::optional<at::Tensor>& residual, const ConvGeometry& g, at::MemoryFormat fmt) {
  const at::Tensor x =
      unit_stride(g) ? input : input.slice(2, 0, g.h, g.stride[0]).slice(3, 0, g.w, g.stride[1]);  // (oh × ow)
  const at::Tensor w2 = w.reshape({g.cout, g.cin});
  const at::Tensor bias = b.has_value() ? b->contiguous() : at::Tensor();
  const int64_t hw = g.oh * g.ow;
  // A 1×1 map (squeeze-excitation blocks, DeepLab's ASPP pooling branch) is a Linear over the batch, the product
  // linear_bias_act runs (per image it would be a batch of matrix-vector products, each reading the whole weight:
  // 2048→256 at batch 8 3x slower than eager); its rows are the output's (NCHW's and channels_last's alike there).
  if (hw == 1) {
    const at::Tensor res = residual.has_value() ? residual->reshape({g.n, g.cout}) : at::Tensor();
    return linear_forward_cpu(x.reshape({g.n, g.cin}), w2, bias, res, g.act)
        .view({g.n, 1, 1, g.cout})
        .permute({0, 3, 1, 2});
  }
  // A channels_last input is one product over all positions, a row of the result one position's channels.
  if (fmt == at::MemoryFormat::ChannelsLast) {
    at::Tensor out = at::mm(x.permute({0, 2, 3, 1}).reshape({g.n * hw, g.cin}), w2.t())
                         .view({g.n, g.oh, g.ow, g.cout})
                         .permute({0, 3, 1, 2});
    epilogue_(out, bias, residual, g, at::MemoryFormat::ChannelsLast);
    return out;
  }
  // NCHW: one product per image (H·W columns), batched (a loop of per-image products, each with its epilogue
  // while in cache, was 10-35 % slower on 2 threads: MKL's batched call spreads better). bmm with the weight
  // broadcast, not at::matmul: for a weight that requires grad (a module's Parameter, even under inference_mode)
  // matmul folds the batch into one product of the transposed images, copying the input and the result, 2-9x
  // slower (240→48 on 112×112 at batch 4: 57.6 vs 6.8 ms, 1 thread; bench/NOTES-conv_bn_relu.md, stop 27).
  at::Tensor out = at::bmm(w2.expand({g.n, g.cout, g.cin}), x.contiguous().view({g.n, g.cin, hw}))
                       .view({g.n, g.cout, g.oh, g.ow});
  epilogue_(out, bias, residual, g, at::MemoryFormat::Contiguous);
  return out;
}

// A small image that auto would give to oneDNN runs ATen's own im2col + GEMM (the convolution F.conv2d calls
// "slow": the input unfolded, MKL's GEMM) with our epilogue in one pass after it, on the images for which ATen's
// convolution itself prefers that main loop to oneDNN's (aten/src/ATen/native/Convolution.cpp, use_mkldnn: one
// image of at most 20480 input values, one group, not a kernel wider than 3 in both dimensions); channels_last
// ones, which oneDNN runs natively, up to half that. There oneDNN's call costs ~30-50 µs whatever the size, and its
// per-call weight reorder more (µs, 1 thread, NCHW / channels_last, oneDNN vs unfolded GEMM: 16→16 3×3 on 4×4
// 55 / 40 vs 11 / 11, 32→32 on 7×7 59 / 48 vs 28 / 22, 48→48 on 14×14 107 / 86 vs 90 / 68, 512→512 on 2×2
// 1185 / 3737 vs 700 / 1649; channels_last 24→24 on 28×28 92 vs 111, 20→20 on 32×32 100 vs 130;
// bench/NOTES-conv_bn_relu.md, stop 27). Our direct kernel, where its rule takes a layer, stays ahead of both.
// Dilated images (ATen's slow_conv_dilated2d, the bias left to our epilogue: it adds one channel at a time) only
// up to 64 output positions, in either layout: µs, 1 thread, oneDNN vs unfolded, 24→128 3×3 dilation 2 on 8×8
// 71 / 60 vs 22 / 30, 512→256 on 4×4 689 / 1201 vs 372 / 990, 256→256 on 8×8 627 / 850 vs 568 / 810; but
// 128→128 dilation 6 on 12×12 198 / 249 vs 345 / 319, 16→16 dilation 2 on 32×32 83 / 65 vs 214 / 85 (stop 28).
bool unfolded_gemm_is_faster(const at::Tensor& x, const ConvGeometry& g, at::MemoryFormat fmt) {
  const int64_t most = fmt == at::MemoryFormat::ChannelsLast && !dilated(g) ? 10240 : 20480;
  return requested_conv_path() == ConvPath::kAuto && x.scalar_type() == at::kFloat && g.n == 1 && g.groups == 1 &&
         !(g.kh > 3 && g.kw > 3) && g.cin * g.h * g.w <= most && (!dilated(g) || g.oh * g.ow <= 64);
}

at::Tensor unfolded_gemm_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                 const std::optional<at::Tensor>& residual, const ConvGeometry& g,
                                 at::MemoryFormat fmt) {
  const at::Tensor bias = b.has_value() ? b->contiguous() : at::Tensor();
  const std::array<int64_t, 2> kernel{g.kh, g.kw}, stride{g.stride[0], g.stride[1]},
      padding{g.padding[0], g.padding[1]}, dilation{g.dilation[0], g.dilation[1]};
  // (an NCHW weight: with a channels_last one ATen's output would be channels_last whatever x is)
  const at::Tensor weight = w.contiguous();
  at::Tensor out;
  if (dilated(g)) {
    out = at::slow_conv_dilated2d(x, weight, kernel, std::nullopt, stride, padding, dilation).contiguous(fmt);
    epilogue_(out, bias, residual, g, fmt);
  } else {  // (the bias inside its GEMM)
    out = at::_slow_conv2d_forward(x, weight, kernel, bias, stride, padding).contiguous(fmt);
    epilogue_(out, at::Tensor(), residual, g, fmt);
  }
  return out;
}

at::Tensor conv2d_bias_act_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, int64_t activation, const std::optional<at::Tensor>& residual) {
  const ConvGeometry g =
      check_conv2d_bias_act_args(input, weight, bias, stride, padding, dilation, groups, activation, residual);
  const auto fmt = output_memory_format(input);
  const at::ScalarType dtype = input.scalar_type();
  if ((dtype == at::kHalf || dtype == at::kBFloat16) && !onednn_computes(dtype)) {
    // computed in float32 (oneDNN's or our fp32 kernels, whichever the shape takes) and rounded once; each layout
    // kept. Our direct kernel converted element by element: a float16 resnet18 ran 6x slower than eager.
    const auto fp32 = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : t;
    };
    return conv2d_bias_act_cpu(input.to(at::kFloat), weight.to(at::kFloat), fp32(bias), stride, padding, dilation,
                               groups, activation, fp32(residual))
        .to(dtype);
  }
  // SiLU, Hardswish, Hardsigmoid, Sigmoid: the convolution and the residual add, then ATen's activation in place
  // (common/activation.h says why).
  if (!identity_or_clamp(g.act)) {
    return activation_aten(conv2d_bias_act_cpu(input, weight, bias, stride, padding, dilation, groups,
                                               static_cast<int64_t>(Activation::kNone), residual),
                           g.act, /*in_place=*/true);
  }
  if (gemm_is_faster(input, g, fmt)) return gemm_forward(input, weight, bias, residual, g, fmt);
  const bool library = use_library(input, g, residual.has_value(), fmt);
  if (library && unfolded_gemm_is_faster(input, g, fmt))
    return unfolded_gemm_forward(input, weight, bias, residual, g, fmt);
  if (!library) {
    at::Tensor out = at::empty({g.n, g.cout, g.oh, g.ow}, input.options().memory_format(fmt));
    if (out.numel() == 0) return out;
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const at::Tensor r = residual.has_value() ? *residual : at::Tensor();
    PYOPS_CPU_KERNEL_IF(direct_avx512_pays(g), conv_bias_act_direct_cpu)(input.contiguous(), weight.contiguous(),
                                                                          b, r, out, g);
    return out;
  }
  return library_forward(input, weight, bias, residual, g, fmt);
}

// ---- prepacked weights ----
// oneDNN reorders a plain OIHW weight into its blocked layout on every call: for ResNet's 3×3 layers that is 10-40 %
// of the call at batch 1 (a 512→512 layer's 9.4 MB weight). A module that runs many inputs of one shape packs the
// weight once (conv2d_pack_weight) and passes both weights to conv2d_bias_act_packed. The packed tensor is an opaque
// MkldnnCPU tensor, so the dispatcher sends the call to that backend's kernel below; the dense weight remains the
// truth, used for the checks and by every path that cannot take the packed one.

at::Tensor conv2d_pack_weight_cpu(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_conv2d_bias_act_args(input, weight, std::nullopt, stride, padding, dilation, groups, 0, std::nullopt);
  TORCH_CHECK_VALUE(at::hasMKLDNN(), "pyops.conv2d_pack_weight: this PyTorch build has no oneDNN");
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat, "pyops.conv2d_pack_weight: argument 'weight' must be ",
                    "float32 (oneDNN's packed path is fp32), got ", weight.scalar_type());
  // The layout oneDNN picks for this input shape (the input's values are not read), for the stride and dilation
  // the packed call will pass (the geometry's canonical ones).
  return at::mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), padding,
                                          std::vector<int64_t>(g.stride.begin(), g.stride.end()),
                                          std::vector<int64_t>(g.dilation.begin(), g.dilation.end()), groups,
                                          input.sizes());
}

at::Tensor conv2d_bias_act_packed_cpu(const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& packed_weight, const std::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, int64_t activation, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(input.device().is_cpu() && !input.is_mkldnn(), "pyops.conv2d_bias_act_packed: argument 'input' ",
                    "must be a dense CPU tensor (the packed path is CPU only)");
  TORCH_CHECK_VALUE(packed_weight.is_mkldnn() && packed_weight.sizes() == weight.sizes(),
                    "pyops.conv2d_bias_act_packed: argument 'packed_weight' must be conv2d_pack_weight's result for ",
                    "'weight' (an MKLDNN tensor of shape ", weight.sizes(), ")");
  const ConvGeometry g =
      check_conv2d_bias_act_args(input, weight, bias, stride, padding, dilation, groups, activation, residual);
  // oneDNN computes a packed weight's convolution in channels_last (it converts an NCHW input itself), as PyTorch's
  // convolution does for a channels_last weight: the output is channels_last whatever the input's format. Every
  // path here keeps that, so the result's layout depends only on which op was called.
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (!identity_or_clamp(g.act)) {  // (as conv2d_bias_act_cpu)
    return activation_aten(conv2d_bias_act_packed_cpu(input, weight, packed_weight, bias, stride, padding, dilation,
                                                      groups, static_cast<int64_t>(Activation::kNone), residual),
                           g.act, /*in_place=*/true);
  }
  if (g.n == 0 || g.cout == 0 || g.oh * g.ow == 0)  // (an empty tensor counts as NCHW too: the format by hand)
    return at::empty({g.n, g.cout, g.oh, g.ow}, input.options().memory_format(cl));
  if (unit_stride(g) && gemm_is_faster(input, g, cl)) return gemm_forward(input, weight, bias, residual, g, cl);
  if (!use_library(input, g, residual.has_value(), cl))
    return conv2d_bias_act_cpu(input.contiguous(cl), weight, bias, stride, padding, dilation, groups, activation,
                               residual);
  return library_forward(input, packed_weight, bias, residual, g, cl);
}

}  // namespace

bool one_by_one_runs_as_gemm(int64_t n, int64_t cin, int64_t cout, int64_t h, int64_t w, at::MemoryFormat fmt,
                             std::optional<bool> full_width_blas) {
  if (n == 0 || cin == 0 || requested_conv_path() != ConvPath::kAuto) return false;
  if (h * w == 1) return true;
  const double positions = static_cast<double>(n) * h * w;  // (double: no overflow for any shape)
  // Where MKL runs narrower than oneDNN (common/onednn.h: AMD AVX-512 CPUs) only small products, whose oneDNN call
  // costs ~30-70 µs whatever the size: stop 34, Zen 5, 2 threads, GEMM vs oneDNN µs, NCHW / channels_last: 116→116
  // on 14×14 46 / 88, 49 / 61; 72→24 on 28×28 37 / 98, 30 / 46; but 64→64 on 56×56 203 / 163, 152 / 91; at batch
  // 8 1133 / 636, 442 / 439; 1024→256 on 14×14 batch 8 3931 / 1829, 1658 / 1651; 512→2048 on 7×7 batch 8 1883 /
  // 1880, 4255 / 1990 (bench/NOTES-conv_bn_relu.md).
  if (!full_width_blas.value_or(blas_runs_full_width()))
    return positions * cin * cout <= double(1 << 22) && positions * cout <= double(1 << 19);
  const bool small_product = positions * cin * cout <= double(1 << 25);
  if (fmt == at::MemoryFormat::ChannelsLast)
    return positions <= 512 || (small_product && positions * cout <= double(1 << 19));
  return positions <= 128 || small_product || h * w >= 196;
}

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act_cpu);
  m.impl("conv_bn_fold", &conv_bn_fold_cpu);
  m.impl("conv_act_backward", &conv_act_backward_cpu);
  m.impl("conv2d_pack_weight", &conv2d_pack_weight_cpu);
  m.impl("conv2d_bias_act_packed", &conv2d_bias_act_packed_cpu);  // reached only by a dense 'packed_weight': an error
}

// A packed weight is an MkldnnCPU tensor, and that key outranks CPU: this is where packed calls land.
TORCH_LIBRARY_IMPL(pyops, MkldnnCPU, m) { m.impl("conv2d_bias_act_packed", &conv2d_bias_act_packed_cpu); }

}  // namespace pyops
