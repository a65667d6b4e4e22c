// Autograd of conv1d and its backward ops, in C++ at the Autograd key (common/dispatch.h says why C++; the H200
// single-channel fwd+bwd ran 0.64x F.conv1d with the Python autograd kernel, bench/NOTES-conv1d.md).
//
// The gradients (gy = grad_output, gg = the gradient flowing into a backward op's output):
//   conv1d(x, w, b):          grad_x = backward_input(gy, w), grad_w = backward_weight(gy, x), grad_b = sum gy
//                             (grad_w and grad_b together from backward_weight_bias, which a kernel may fuse).
//   conv1d_bias_act:          the same with gy·act'(output) for gy, which is also the residual's gradient.
//   backward_input(gy, w):    the adjoint of x -> conv1d(x, w), so <gg, backward_input(gy, w)> = <gy, conv1d(gg, w)>:
//                             grad_gy = conv1d(gg, w), grad_w = backward_weight(gy, gg).
//   backward_weight(gy, x):   the adjoint of w -> conv1d(x, w):
//                             grad_gy = conv1d(x, gg), grad_x = backward_input(gy, gg).
//   backward_weight_bias:     the above for its first output; its second (sum gy) sends gg_bias to gy broadcast.
// Every gradient is again a pyops op called through the dispatcher, so double backward and torch.compile see ops.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/activation.h"
#include "common/dispatch.h"
#include "ops/conv1d/conv1d.h"

namespace pyops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops through the dispatcher: from a backward (grad mode per create_graph) they reach these autograd kernels
// again; through below_autograd (a Function's forward, a call autograd does not see), the backend kernel.
at::Tensor call_conv1d(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t stride,
                       int64_t padding, int64_t dilation, int64_t groups) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                            int64_t, int64_t, int64_t, int64_t)>("pyops::conv1d");
  return op.call(x, w, b, stride, padding, dilation, groups);
}

at::Tensor call_conv1d_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                int64_t stride, int64_t padding, int64_t dilation, int64_t groups, int64_t activation,
                                const std::optional<at::Tensor>& residual) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                         int64_t, int64_t, int64_t, const std::optional<at::Tensor>&)>("pyops::conv1d_bias_act");
  return op.call(x, w, b, stride, padding, dilation, groups, activation, residual);
}

// conv1d, or conv1d_bias_act where there is an activation or a residual (so a plain convolution is pyops::conv1d
// in profiles and graphs).
at::Tensor call_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t stride,
                        int64_t padding, int64_t dilation, int64_t groups, int64_t activation,
                        const std::optional<at::Tensor>& residual) {
  if (activation == static_cast<int64_t>(Activation::kNone) && !is_defined(residual)) {
    return call_conv1d(x, w, b, stride, padding, dilation, groups);
  }
  return call_conv1d_bias_act(x, w, b, stride, padding, dilation, groups, activation, residual);
}

at::Tensor call_backward_input(const at::Tensor& gy, const at::Tensor& w, c10::SymInt input_length, int64_t stride,
                               int64_t padding, int64_t dilation, int64_t groups) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, int64_t, int64_t,
                                            int64_t)>("pyops::conv1d_backward_input");
  return op.call(gy, w, input_length, stride, padding, dilation, groups);
}

at::Tensor call_backward_weight(const at::Tensor& gy, const at::Tensor& x, c10::SymInt kernel_size, int64_t stride,
                                int64_t padding, int64_t dilation, int64_t groups) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, int64_t, int64_t,
                                            int64_t)>("pyops::conv1d_backward_weight");
  return op.call(gy, x, kernel_size, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor> call_backward_weight_bias(const at::Tensor& gy, const at::Tensor& x,
                                                             c10::SymInt kernel_size, int64_t stride, int64_t padding,
                                                             int64_t dilation, int64_t groups) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::SymInt,
                                                                    int64_t, int64_t, int64_t, int64_t)>(
      "pyops::conv1d_backward_weight_bias");
  return op.call(gy, x, kernel_size, stride, padding, dilation, groups);
}

// stride, padding, dilation, groups: what every op takes after its tensors and length, kept in ctx->saved_data.
struct Hyper {
  int64_t stride, padding, dilation, groups;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  static Hyper load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toInt(), ctx->saved_data["padding"].toInt(),
            ctx->saved_data["dilation"].toInt(), ctx->saved_data["groups"].toInt()};
  }
};

// What every Function here keeps: its two tensor inputs and the hyper-parameters (gradients may arrive undefined:
// not materialized as zeros, so a backward skips what nothing flows into).
void save_state(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b, const Hyper& h) {
  ctx->set_materialize_grads(false);
  ctx->save_for_backward({a, b});
  h.save(ctx);
}

// (grad_w, grad_b) of conv1d from gy and x, each only if needed; together from one op when both are.
std::tuple<at::Tensor, at::Tensor> weight_and_bias_grads(const at::Tensor& gy, const at::Tensor& x,
                                                         c10::SymInt kernel_size, bool need_weight, bool need_bias,
                                                         const Hyper& h) {
  if (need_weight && need_bias) {
    return call_backward_weight_bias(gy, x, kernel_size, h.stride, h.padding, h.dilation, h.groups);
  }
  at::Tensor grad_w, grad_b;
  if (need_weight) grad_w = call_backward_weight(gy, x, kernel_size, h.stride, h.padding, h.dilation, h.groups);
  if (need_bias) grad_b = gy.sum(at::IntArrayRef{0, 2});
  return {grad_w, grad_b};
}

// conv1d (activation none, no residual) and conv1d_bias_act. With an activation, the output is saved too:
// gy·act'(output) (act_backward, common/activation.h: one pass) is the convolution's and the residual's gradient.
class Conv1dFunction : public torch::autograd::Function<Conv1dFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& b, int64_t stride, int64_t padding, int64_t dilation,
                            int64_t groups, int64_t activation, const std::optional<at::Tensor>& residual) {
    save_state(ctx, x, w, {stride, padding, dilation, groups});
    InputEdges::save(ctx, {true, true, is_defined(b), is_defined(residual)});
    ctx->saved_data["activation"] = activation;
    at::Tensor out = below_autograd(call_forward, x, w, b, stride, padding, dilation, groups, activation, residual);
    if (activation != static_cast<int64_t>(Activation::kNone)) ctx->save_for_backward({x, w, out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor gy = grads[0];
    variable_list out(9);
    if (!gy.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const int64_t activation = ctx->saved_data["activation"].toInt();
    if (activation != static_cast<int64_t>(Activation::kNone)) gy = grad_before_activation(gy, saved[2], activation);
    const Hyper h = Hyper::load(ctx);
    const InputEdges edges(ctx);
    if (edges.needs(0)) out[0] = call_backward_input(gy, w, x.sym_size(2), h.stride, h.padding, h.dilation, h.groups);
    std::tie(out[1], out[2]) = weight_and_bias_grads(gy, x, w.sym_size(2), edges.needs(1), edges.needs(2), h);
    if (edges.needs(3)) out[8] = gy;
    return out;
  }
};

class BackwardInputFunction : public torch::autograd::Function<BackwardInputFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gy, const at::Tensor& w, c10::SymInt input_length,
                            int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
    save_state(ctx, gy, w, {stride, padding, dilation, groups});
    return below_autograd(call_backward_input, gy, w, input_length, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& gg = grads[0];
    variable_list out(7);
    if (!gg.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &gy = saved[0], &w = saved[1];
    const Hyper h = Hyper::load(ctx);
    if (ctx->needs_input_grad(0)) out[0] = call_conv1d(gg, w, std::nullopt, h.stride, h.padding, h.dilation, h.groups);
    if (ctx->needs_input_grad(1)) {
      out[1] = call_backward_weight(gy, gg, w.sym_size(2), h.stride, h.padding, h.dilation, h.groups);
    }
    return out;
  }
};

// backward_weight and backward_weight_bias: the same saved state and the same gradients for the weight part.
variable_list backward_weight_grads(AutogradContext* ctx, const at::Tensor& gg_weight, const at::Tensor& gg_bias) {
  variable_list out(7);
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor &gy = saved[0], &x = saved[1];
  const Hyper h = Hyper::load(ctx);
  if (gg_weight.defined()) {
    if (ctx->needs_input_grad(0)) {
      out[0] = call_conv1d(x, gg_weight, std::nullopt, h.stride, h.padding, h.dilation, h.groups);
    }
    if (ctx->needs_input_grad(1)) {
      out[1] = call_backward_input(gy, gg_weight, x.sym_size(2), h.stride, h.padding, h.dilation, h.groups);
    }
  }
  if (gg_bias.defined() && ctx->needs_input_grad(0)) {
    const at::Tensor spread = gg_bias.view({1, -1, 1}).expand_as(gy);
    out[0] = out[0].defined() ? out[0] + spread : spread;
  }
  return out;
}

class BackwardWeightFunction : public torch::autograd::Function<BackwardWeightFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gy, const at::Tensor& x, c10::SymInt kernel_size,
                            int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
    save_state(ctx, gy, x, {stride, padding, dilation, groups});
    return below_autograd(call_backward_weight, gy, x, kernel_size, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return backward_weight_grads(ctx, grads[0], at::Tensor());
  }
};

class BackwardWeightBiasFunction : public torch::autograd::Function<BackwardWeightBiasFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gy, const at::Tensor& x, c10::SymInt kernel_size,
                               int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
    save_state(ctx, gy, x, {stride, padding, dilation, groups});
    auto [grad_w, grad_b] =
        below_autograd(call_backward_weight_bias, gy, x, kernel_size, stride, padding, dilation, groups);
    return {grad_w, grad_b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return backward_weight_grads(ctx, grads[0], grads[1]);
  }
};

at::Tensor conv1d_bias_act_autograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                    int64_t stride, int64_t padding, int64_t dilation, int64_t groups,
                                    int64_t activation, const std::optional<at::Tensor>& residual) {
  if (!needs_autograd(x, w, b, residual)) {
    return below_autograd(call_forward, x, w, b, stride, padding, dilation, groups, activation, residual);
  }
  const Activation act = checked_activation(activation, "pyops.conv1d_bias_act");
  if (!identity_or_clamp(act)) {  // (SiLU, Hardswish, Hardsigmoid, Sigmoid: common/activation.h)
    return activation_aten(conv1d_bias_act_autograd(x, w, b, stride, padding, dilation, groups,
                                                    static_cast<int64_t>(Activation::kNone), residual),
                           act, /*in_place=*/false);
  }
  if (needs_composite(x, w, b, residual)) {  // dispatch.h
    at::Tensor y = at::conv1d(x, w, b, {stride}, {padding}, {dilation}, groups);
    if (is_defined(residual)) {  // (checked as the kernels check it: `+` would broadcast)
      check_conv1d_residual(residual, x, check_conv1d(x, w, b, stride, padding, dilation, groups));
      y = y + *residual;
    }
    return activation_aten(y, act, /*in_place=*/false);
  }
  return Conv1dFunction::apply(x, w, b, stride, padding, dilation, groups, activation, residual);
}

at::Tensor conv1d_autograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                           int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  return conv1d_bias_act_autograd(x, w, b, stride, padding, dilation, groups, static_cast<int64_t>(Activation::kNone),
                                  std::nullopt);
}

at::Tensor conv1d_backward_input_autograd(const at::Tensor& gy, const at::Tensor& w, c10::SymInt input_length,
                                          int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  if (!needs_autograd(gy, w)) {
    return below_autograd(call_backward_input, gy, w, input_length, stride, padding, dilation, groups);
  }
  return BackwardInputFunction::apply(gy, w, input_length, stride, padding, dilation, groups);
}

at::Tensor conv1d_backward_weight_autograd(const at::Tensor& gy, const at::Tensor& x, c10::SymInt kernel_size,
                                           int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  if (!needs_autograd(gy, x)) {
    return below_autograd(call_backward_weight, gy, x, kernel_size, stride, padding, dilation, groups);
  }
  return BackwardWeightFunction::apply(gy, x, kernel_size, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor> conv1d_backward_weight_bias_autograd(const at::Tensor& gy, const at::Tensor& x,
                                                                        c10::SymInt kernel_size, int64_t stride,
                                                                        int64_t padding, int64_t dilation,
                                                                        int64_t groups) {
  if (!needs_autograd(gy, x)) {
    return below_autograd(call_backward_weight_bias, gy, x, kernel_size, stride, padding, dilation, groups);
  }
  const variable_list grads = BackwardWeightBiasFunction::apply(gy, x, kernel_size, stride, padding, dilation, groups);
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("conv1d", &conv1d_autograd);
  m.impl("conv1d_bias_act", &conv1d_bias_act_autograd);
  m.impl("conv1d_backward_input", &conv1d_backward_input_autograd);
  m.impl("conv1d_backward_weight", &conv1d_backward_weight_autograd);
  m.impl("conv1d_backward_weight_bias", &conv1d_backward_weight_bias_autograd);
}

}  // namespace pyops
