// Autograd of conv2d_bias_act and conv2d_bn_relu, in C++ at the Autograd key (common/dispatch.h says why C++; a
// fine-tuning step through a small fused layer spent most of its host time in the Python backward).
//
// The BN statistics are frozen (torchvision's FrozenBatchNorm2d): gradients reach the input, weight, bias, residual
// and γ, β, never μ, σ². With z = conv(x, W) + b, y = act(scale·(z − μ) + β + residual), scale = γ/√(σ²+ε), and
// g = grad·act'(y) (one pass of conv_act_backward gives both g·scale and g):
//   dz = g·scale feeds ATen's convolution backward (input, weight, bias); d residual = g; dβ = Σ_nhw g;
//   dγ = Σ_nhw g·(z − μ)/√(σ²+ε), using Σ_nhw g·conv(x, W) = Σ_{ic,kh,kw} W ⊙ conv_weight_grad(x, g), so that z is
//   never recomputed.
// conv2d_bias_act is the same with scale = 1 and no BN.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ops/conv_bn_relu/conv_bn_relu.h"

namespace pyops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// (grad·act'(output)·scale, grad·act'(output) if unscaled_too and scale given)
std::tuple<at::Tensor, at::Tensor> call_conv_act_backward(const at::Tensor& grad, const at::Tensor& output,
                                                          const OptTensor& scale, int64_t activation,
                                                          bool unscaled_too) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const OptTensor&, int64_t, bool)>(
      "pyops::conv_act_backward");
  return op.call(grad, output, scale, activation, unscaled_too);
}

}  // namespace

// act_backward (common/activation.h) by the fused op, or, when the backward is itself recorded (create_graph=True: a
// double backward, e.g. a gradient penalty), by ATen ops that autograd differentiates: the op has no derivative of
// its own, and a double backward through it was silently wrong (the mask's derivative is zero, as for torch.relu's).
std::tuple<at::Tensor, at::Tensor> act_backward(const at::Tensor& grad, const at::Tensor& output,
                                                const OptTensor& scale, int64_t activation, bool unscaled_too) {
  if (!at::GradMode::is_enabled()) {
    if (output.dim() >= 4) return call_conv_act_backward(grad, output, scale, activation, unscaled_too);
    // (the op takes (N, C, H, W): a conv1d's (N, C, L) output as (N, C, 1, L), a Linear's (M, N) as (M, N, 1, 1))
    const auto as_4d = [](at::Tensor t) {
      while (t.dim() < 4) t = t.unsqueeze(2);
      return t;
    };
    auto [scaled, masked] = call_conv_act_backward(as_4d(grad), as_4d(output), scale, activation, unscaled_too);
    return {scaled.view(output.sizes()), masked.dim() == 4 ? masked.view(output.sizes()) : masked};
  }
  at::Tensor g = grad;
  // (torch.relu's rule: zero where the output is <= 0, hardtanh's where it is <= 0 or >= 6, so a NaN output passes
  // the gradient, as in conv_bn_relu_cpu.cpp's act_grad. A select, not a product with the mask: a masked inf or NaN
  // gradient gives 0, as in the op and in torch's.)
  if (activation == static_cast<int64_t>(Activation::kRelu)) g = at::where(output.le(0), 0, grad);
  if (activation == static_cast<int64_t>(Activation::kRelu6))
    g = at::where(output.le(0).logical_or(output.ge(6)), 0, grad);
  if (!scale.has_value()) return {g, at::Tensor()};
  std::vector<int64_t> per_channel(output.dim(), 1);
  per_channel[1] = -1;
  const at::Tensor scaled = g * scale->to(g.scalar_type()).view(per_channel);
  return {scaled, unscaled_too ? g : at::Tensor()};
}

at::Tensor grad_before_activation(const at::Tensor& grad, const at::Tensor& output, int64_t activation) {
  if (activation == static_cast<int64_t>(Activation::kNone)) return grad;
  return std::get<0>(act_backward(grad, output, std::nullopt, activation, /*unscaled_too=*/false));
}

namespace {

// The strides the op computes with (checked_conv_stride: a stride past the padded size gives its one output
// position), for the ATen convolutions of the backward and the composites: a stride of 2**31 - 1 crashed oneDNN's
// backward (SIGFPE). A symbolic size (torch.compile with dynamic shapes) is read as the int it is only for a stride
// that large (the compiled graph then specializes on that size); smaller strides keep the one given.
std::vector<int64_t> computed_strides(const at::Tensor& x, at::IntArrayRef stride, at::IntArrayRef padding) {
  constexpr int64_t kLargeStride = int64_t{1} << 20;
  std::vector<int64_t> s(stride.begin(), stride.end());
  if (x.dim() != 4 || s.size() != 2 || padding.size() != 2) return s;  // (the op itself names what is wrong)
  for (int i = 0; i < 2; ++i) {
    const c10::SymInt& sym = x.sym_size(2 + i);
    std::optional<int64_t> size = sym.maybe_as_int();
    if (!size.has_value() && s[i] >= kLargeStride) size = sym.guard_int(__FILE__, __LINE__);
    if (size.has_value()) s[i] = checked_conv_stride(*size, /*kernel_size=*/1, s[i], padding[i], 1, "pyops.conv2d");
  }
  return s;
}

// stride, padding, dilation, groups of the convolution, kept in ctx->saved_data.
struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  static ConvArgs load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
  }
};

// A 1×1 layer without padding, in one group, on float32/float64 CPU tensors is a pointwise conv1d over the positions
// its stride samples, whose CPU gradients are matrix products where that is faster (conv1d's routing,
// pointwise_as_product): oneDNN's convolution_backward converts a 1×1 layer's tensors to its blocked layout and back
// (ResNet-50's bottleneck 1×1 layers at batch 4: 1.1-1.4x; bench/NOTES-conv_bn_relu.md, stop 31). At stride 1 on
// NCHW tensors under PYOPS_CONV_PATH=auto (library and direct keep ATen's backward). Strided layers, their
// positions gathered, on every path: NCHW ones 1.25-4x faster than ATen's backward (ResNet's downsampling layers
// at batch 4, stop 38); channels_last ones, oneDNN's own layout, 1.1-2x slower than it, except under 16 input
// channels, where oneDNN's strided 1×1 weight gradient writes outside its buffers in torch 2.14.1 (heap corruption
// and wrong results in later calls; found by tests/fuzz_routes.py, bench/NOTES-conv_bn_relu.md, stop 38).
bool is_pointwise_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const ConvArgs& c) {
  const bool one_by_one = w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && c.groups == 1;
  const bool dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (!one_by_one || c.padding != std::vector<int64_t>{0, 0} || !dtype || !x.device().is_cpu() || x.dim() != 4)
    return false;
  if (c.stride != std::vector<int64_t>{1, 1})
    return x.suggest_memory_format() != at::MemoryFormat::ChannelsLast || x.size(1) < 16;
  return x.is_contiguous() && grad.is_contiguous() && requested_conv_path() == ConvPath::kAuto;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pointwise_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& w, const ConvArgs& c,
                                                                  std::array<bool, 3> mask) {
  using Conv1dBackwardInput = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, int64_t,
                                         int64_t, int64_t);
  using Conv1dBackwardWeight = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, int64_t,
                                          int64_t, int64_t);
  using Conv1dBackwardWeightBias = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                      c10::SymInt, int64_t, int64_t, int64_t, int64_t);
  static const auto input_op = find_op<Conv1dBackwardInput>("pyops::conv1d_backward_input");
  static const auto weight_op = find_op<Conv1dBackwardWeight>("pyops::conv1d_backward_weight");
  static const auto weight_bias_op = find_op<Conv1dBackwardWeightBias>("pyops::conv1d_backward_weight_bias");
  // the positions the stride samples of a tensor shaped as x: (N, C, H_out, W_out)
  const auto sample = [&](const at::Tensor& t) {
    return t.slice(2, 0, x.size(2), c.stride[0]).slice(3, 0, x.size(3), c.stride[1]);
  };
  const at::Tensor sampled = sample(x);
  const int64_t n = x.size(0), positions = grad.size(2) * grad.size(3);
  const auto scatter = [&](const at::Tensor& g) {  // grad_x: zero where the stride samples nothing, in x's layout
    if (g.sizes().equals(x.sizes())) return g;
    at::Tensor full = at::zeros_like(x, x.suggest_memory_format());
    sample(full).copy_(g);
    return full;
  };
  at::Tensor gx, gw, gb;
  const at::Tensor gy = grad.contiguous().view({n, grad.size(1), positions});
  const at::Tensor w1 = w.reshape({w.size(0), w.size(1), 1});
  if (mask[0]) gx = scatter(input_op.call(gy, w1, positions, 1, 0, 1, 1).view(sampled.sizes()));
  if (mask[1]) {
    const at::Tensor x1 = sampled.contiguous().view({n, x.size(1), positions});
    if (mask[2]) {
      std::tie(gw, gb) = weight_bias_op.call(gy, x1, 1, 1, 0, 1, 1);
    } else {
      gw = weight_op.call(gy, x1, 1, 1, 0, 1, 1);
    }
  } else if (mask[2]) {
    gb = grad.sum(at::IntArrayRef{0, 2, 3});
  }
  return {gx, mask[1] ? gw.view(w.sizes()) : gw, gb};
}

// (grad_x, grad_weight, grad_bias) of conv2d for the gradient of its output; undefined where not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& w, bool has_bias, const ConvArgs& c,
                                                             std::array<bool, 3> mask) {
  if (!mask[0] && !mask[1] && !mask[2]) return {};
  if (is_pointwise_cpu(grad, x, w, c)) return pointwise_backward(grad, x, w, c, mask);
  const int64_t out_channels = w.size(0);
  const at::OptionalIntArrayRef bias_sizes =
      has_bias ? at::OptionalIntArrayRef(at::IntArrayRef(&out_channels, 1)) : std::nullopt;
  auto [gx, gw, gb] = at::convolution_backward(grad, x, w, bias_sizes, c.stride, c.padding, c.dilation,
                                               /*transposed=*/false, {0, 0}, c.groups, mask);
  return {mask[0] ? gx : at::Tensor(), mask[1] ? gw : at::Tensor(), mask[2] ? gb : at::Tensor()};
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor call_conv2d_bias_act(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t activation,
                                const OptTensor& residual) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, int64_t, int64_t, const OptTensor&)>("pyops::conv2d_bias_act");
  return op.call(x, w, b, stride, padding, dilation, groups, activation, residual);
}

at::Tensor call_conv2d_bn_relu(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                               const at::Tensor& var, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu, const OptTensor& residual) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const at::Tensor&, const at::Tensor&, double, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, int64_t, bool, const OptTensor&)>("pyops::conv2d_bn_relu");
  return op.call(x, w, b, bn_weight, bn_bias, mean, var, eps, stride, padding, dilation, groups, relu, residual);
}

class ConvBiasActFunction : public torch::autograd::Function<ConvBiasActFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  // tensor arguments, in order: x, weight, bias?, residual?
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            int64_t activation, const OptTensor& residual) {
    const at::Tensor out =
        below_autograd(call_conv2d_bias_act, x, w, b, stride, padding, dilation, groups, activation, residual);
    ctx->set_materialize_grads(false);
    // The output only for an activation's mask: saved without one, a later in-place op on it (MobileNetV3's
    // Hardswish(inplace=True) after a fused conv + BN) would fail the backward's version check for nothing.
    const bool masked = activation != static_cast<int64_t>(Activation::kNone);
    ctx->save_for_backward({x, w, masked ? out : at::Tensor()});
    InputEdges::save(ctx, {true, true, is_defined(b), is_defined(residual)});
    ConvArgs{computed_strides(x, stride, padding), padding.vec(), dilation.vec(), groups}.save(ctx);
    ctx->saved_data["activation"] = activation;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &output = saved[2];
    const InputEdges edges(ctx);
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const at::Tensor grad_pre = grad_before_activation(grad, output, activation);
    const bool need_bias = edges.needs(2);  // (false without a bias)
    std::tie(out[0], out[1], out[2]) =
        conv_backward(grad_pre, x, w, need_bias, ConvArgs::load(ctx), {edges.needs(0), edges.needs(1), need_bias});
    if (edges.needs(3)) out[8] = grad_pre;
    return out;
  }
};

class ConvBNReLUFunction : public torch::autograd::Function<ConvBNReLUFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  // tensor arguments, in order: x, weight, bias?, bn_weight?, bn_bias?, running_mean, running_var, residual?
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                            const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                            const at::Tensor& var, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, bool relu, const OptTensor& residual) {
    const at::Tensor out = below_autograd(call_conv2d_bn_relu, x, w, b, bn_weight, bn_bias, mean, var, eps, stride,
                                          padding, dilation, groups, relu, residual);
    ctx->set_materialize_grads(false);
    const at::Tensor none;
    ctx->save_for_backward({x, w, b.value_or(none), bn_weight.value_or(none), bn_bias.value_or(none), mean, var,
                            relu ? out : none});  // the output only for the ReLU's mask (ConvBiasActFunction says why)
    InputEdges::save(ctx, {true, true, is_defined(b), is_defined(bn_weight), is_defined(bn_bias), true, true,
                           is_defined(residual)});
    ConvArgs{computed_strides(x, stride, padding), padding.vec(), dilation.vec(), groups}.save(ctx);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(14);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &bn_weight = saved[3], &bn_bias = saved[4];
    const at::Tensor &mean = saved[5], &var = saved[6], &output = saved[7];
    const InputEdges edges(ctx);
    const ConvArgs c = ConvArgs::load(ctx);
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool need_bn_weight = edges.needs(3), need_bn_bias = edges.needs(4), need_residual = edges.needs(7);
    const bool need_unscaled = need_residual || need_bn_weight || need_bn_bias;

    static const auto fold = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
        double)>("pyops::conv_bn_fold");
    const auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    // γ/√(σ²+ε): from the fold op, or, in a recorded backward (double backward), from ATen ops that autograd
    // differentiates with respect to γ (the fold op has no derivative).
    at::Tensor scale;
    if (at::GradMode::is_enabled()) {
      scale = at::rsqrt(var.to(acc_dtype(grad.scalar_type())) + eps);
      if (bn_weight.defined()) scale = scale * bn_weight;
    } else {
      scale = std::get<2>(fold.call(w, opt(b), opt(bn_weight), opt(bn_bias), mean, var, eps));
    }
    const int64_t activation = static_cast<int64_t>(ctx->saved_data["relu"].toBool() ? Activation::kRelu
                                                                                      : Activation::kNone);
    // Without the ReLU there is no saved output; grad stands in for it (the op reads only its shape and layout then).
    const auto [grad_conv, grad_pre] =
        act_backward(grad, output.defined() ? output : grad, scale, activation, need_unscaled);
    std::tie(out[0], out[1], out[2]) =
        conv_backward(grad_conv, x, w, b.defined(), c, {edges.needs(0), edges.needs(1), edges.needs(2)});
    if (need_bn_weight || need_bn_bias) {
      const at::ScalarType acc = acc_dtype(grad.scalar_type());
      const at::Tensor sum_pre = grad_pre.sum(at::IntArrayRef{0, 2, 3}, /*keepdim=*/false, acc);
      if (need_bn_bias) out[4] = sum_pre.to(bn_bias.scalar_type());
      if (need_bn_weight) {
        const at::Tensor grad_w_raw = std::get<1>(conv_backward(grad_pre, x, w, false, c, {false, true, false}));
        at::Tensor centered = -mean.to(acc);
        if (b.defined()) centered = centered + b.to(acc);
        const at::Tensor sum_pre_z =
            (w.to(acc) * grad_w_raw.to(acc)).sum(at::IntArrayRef{1, 2, 3}) + centered * sum_pre;
        out[3] = (sum_pre_z * at::rsqrt(var.to(acc) + eps)).to(bn_weight.scalar_type());
      }
    }
    if (need_residual) out[13] = grad_pre;
    return out;
  }
};

// The composite formulations (dispatch.h): ATen's conv2d, add and activation; BN folded by ATen ops.
at::Tensor conv2d_bias_act_composite(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, int64_t activation, const OptTensor& residual) {
  at::Tensor y = at::conv2d(x, w, b, computed_strides(x, stride, padding), padding, dilation, groups);
  if (is_defined(residual)) y = y + *residual;
  return activation_aten(y, static_cast<Activation>(activation), /*in_place=*/false);
}

at::Tensor conv2d_bn_relu_composite(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                    const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                                    const at::Tensor& var, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool relu, const OptTensor& residual) {
  // The fold as the op computes it: in float64 (in the statistics' dtype, float16 statistics under autocast were
  // off by ~5e-4), rounded once; the statistics are frozen constants, as the op's backward has it (they came out
  // differentiated here, where torch.func and forward-mode AD run this formulation).
  const auto f64 = [](const at::Tensor& t) { return t.to(at::kDouble); };
  const at::Tensor mu = f64(mean.detach());
  at::Tensor scale = at::rsqrt(f64(var.detach()) + eps);
  if (is_defined(bn_weight)) scale = scale * f64(*bn_weight);
  at::Tensor shift = (is_defined(b) ? f64(*b) - mu : -mu) * scale;
  if (is_defined(bn_bias)) shift = shift + f64(*bn_bias);
  const at::Tensor folded = (f64(w) * scale.view({-1, 1, 1, 1})).to(w.scalar_type());
  const int64_t act = static_cast<int64_t>(relu ? Activation::kRelu : Activation::kNone);
  return conv2d_bias_act_composite(x, folded, shift.to(w.scalar_type()), stride, padding, dilation, groups, act,
                                   residual);
}

at::Tensor conv2d_bias_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, int64_t activation, const OptTensor& residual) {
  if (!needs_autograd(x, w, b, residual)) {
    return below_autograd(call_conv2d_bias_act, x, w, b, stride, padding, dilation, groups, activation, residual);
  }
  const Activation act = checked_activation(activation, "pyops.conv2d");
  if (!identity_or_clamp(act)) {  // (SiLU, Hardswish, Hardsigmoid, Sigmoid: common/activation.h)
    return activation_aten(conv2d_bias_act_autograd(x, w, b, stride, padding, dilation, groups,
                                                    static_cast<int64_t>(Activation::kNone), residual),
                           act, /*in_place=*/false);
  }
  if (needs_composite(x, w, b, residual)) {
    return conv2d_bias_act_composite(x, w, b, stride, padding, dilation, groups, activation, residual);
  }
  return ConvBiasActFunction::apply(x, w, b, stride, padding, dilation, groups, activation, residual);
}

at::Tensor conv2d_bn_relu_autograd(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                   const OptTensor& bn_weight, const OptTensor& bn_bias, const at::Tensor& mean,
                                   const at::Tensor& var, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, bool relu, const OptTensor& residual) {
  if (!needs_autograd(x, w, b, bn_weight, bn_bias, mean, var, residual)) {
    return below_autograd(call_conv2d_bn_relu, x, w, b, bn_weight, bn_bias, mean, var, eps, stride, padding,
                          dilation, groups, relu, residual);
  }
  if (needs_composite(x, w, b, bn_weight, bn_bias, mean, var, residual)) {
    return conv2d_bn_relu_composite(x, w, b, bn_weight, bn_bias, mean, var, eps, stride, padding, dilation, groups,
                                    relu, residual);
  }
  return ConvBNReLUFunction::apply(x, w, b, bn_weight, bn_bias, mean, var, eps, stride, padding, dilation, groups,
                                   relu, residual);
}

// The packed op is inference only (ConvBNReLU2d calls it when nothing requires grad): a call autograd would record
// is refused by name (without this kernel PyTorch's fallback warned and returned a result without gradients).
at::Tensor conv2d_bias_act_packed_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& packed,
                                           const OptTensor& b, at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups, int64_t activation,
                                           const OptTensor& residual) {
  const bool grad_mode = at::GradMode::is_enabled();
  constexpr const char* kOp = "pyops.conv2d_bias_act_packed";
  check_not_recorded(x, kOp, "input", -1, grad_mode);
  check_not_recorded(w, kOp, "weight", -1, grad_mode);
  check_not_recorded(b, kOp, "bias", grad_mode);
  check_not_recorded(residual, kOp, "residual", grad_mode);
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef,
                         at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, const OptTensor&)>(
          "pyops::conv2d_bias_act_packed");
  return below_autograd(
      [&] { return op.call(x, w, packed, b, stride, padding, dilation, groups, activation, residual); });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act_autograd);
  m.impl("conv2d_bn_relu", &conv2d_bn_relu_autograd);
  m.impl("conv2d_bias_act_packed", &conv2d_bias_act_packed_autograd);
}

}  // namespace pyops
