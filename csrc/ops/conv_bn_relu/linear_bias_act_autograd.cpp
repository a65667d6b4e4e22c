// Autograd of linear_bias_act, in C++ at the Autograd key (common/dispatch.h says why C++). With y = act(x·Wᵀ + b)
// and g = grad·act'(y) (one pass of conv_act_backward over the output, as the fused convolutions' backward):
// dx = g·W, dW = gᵀ·x, db = Σ g over the rows; ATen's matrix products (torch.nn.Linear's backward).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "common/dispatch.h"
#include "ops/conv_bn_relu/linear.h"

namespace pyops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

at::Tensor call_linear_bias_act(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, int64_t activation) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t)>("pyops::linear_bias_act");
  return op.call(x, w, b, activation);
}

class LinearBiasActFunction : public torch::autograd::Function<LinearBiasActFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  // tensor arguments, in order: x, weight, bias?
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                            int64_t activation) {
    const at::Tensor out = below_autograd(call_linear_bias_act, x, w, b, activation);
    ctx->set_materialize_grads(false);
    // the output only for the activation's mask (ConvBiasActFunction, conv_bn_relu_autograd.cpp, says why)
    const bool masked = activation != static_cast<int64_t>(Activation::kNone);
    ctx->save_for_backward({x, w, masked ? out : at::Tensor()});
    InputEdges::save(ctx, {true, true, is_defined(b)});
    ctx->saved_data["activation"] = activation;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &output = saved[2];
    const InputEdges edges(ctx);
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const int64_t n = w.size(0), k = w.size(1);
    const bool masked = activation != static_cast<int64_t>(Activation::kNone);
    const at::Tensor g = grad_before_activation(grad.reshape({-1, n}), masked ? output.reshape({-1, n}) : output,
                                                activation);
    if (edges.needs(0)) out[0] = g.mm(w).view(x.sizes());
    if (edges.needs(1)) out[1] = g.t().mm(x.reshape({-1, k}));
    if (edges.needs(2)) out[2] = g.sum(0);
    return out;
  }
};

// The composite formulation (dispatch.h: torch.func transforms, forward-mode AD): ATen's linear and activation.
at::Tensor linear_bias_act_composite(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                     int64_t activation) {
  return activation_aten(at::linear(x, w, b), static_cast<Activation>(activation), /*in_place=*/false);
}

at::Tensor linear_bias_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                    int64_t activation) {
  if (!needs_autograd(x, w, b)) return below_autograd(call_linear_bias_act, x, w, b, activation);
  const Activation act = check_linear_bias_act_args(x, w, b, activation);
  if (!identity_or_clamp(act)) {  // (SiLU, Hardswish, Hardsigmoid, Sigmoid: common/activation.h)
    return activation_aten(linear_bias_act_autograd(x, w, b, static_cast<int64_t>(Activation::kNone)), act,
                           /*in_place=*/false);
  }
  if (needs_composite(x, w, b)) return linear_bias_act_composite(x, w, b, activation);
  return LinearBiasActFunction::apply(x, w, b, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) { m.impl("linear_bias_act", &linear_bias_act_autograd); }

}  // namespace pyops
