// Autograd of smooth_max and of its backward op (double backward), in C++ at the Autograd key (common/dispatch.h
// says why C++).
//
//   smooth_max(x) = r:  grad_x = smooth_max_backward(G, x, r) = G·p,  p = exp(β(x − r)) (the softmax along dim).
//   smooth_max_backward(G, x, r), taking r as an independent input: d/dG = p (summed along dim back to G's shape),
//   d/dx = β·gg·p·G, d/dr = −Σ_dim β·gg·p·G. Autograd then carries r's gradient through smooth_max's own backward,
//   which together gives the softmax Jacobian β·(diag p − p pᵀ). At β = ±inf p is piecewise constant: only G has a
//   gradient (zeros for x and r).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ops/smooth_max/smooth_max.h"

namespace pyops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_smooth_max_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& result,
                                    double beta, int64_t dim, bool keepdim) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, bool)>(
          "pyops::smooth_max_backward");
  return op.call(grad, x, result, beta, dim, keepdim);
}

void save_reduction(AutogradContext* ctx, double beta, int64_t dim, bool keepdim) {
  ctx->saved_data["beta"] = beta;
  ctx->saved_data["dim"] = dim;
  ctx->saved_data["keepdim"] = keepdim;
}

at::Tensor call_smooth_max(const at::Tensor& x, double beta, int64_t dim, bool keepdim) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, double, int64_t, bool)>("pyops::smooth_max");
  return op.call(x, beta, dim, keepdim);
}

class SmoothMaxFunction : public torch::autograd::Function<SmoothMaxFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double beta, int64_t dim, bool keepdim) {
    const at::Tensor result = below_autograd(call_smooth_max, x, beta, dim, keepdim);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, result});
    save_reduction(ctx, beta, dim, keepdim);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &result = saved[1];
    const double beta = ctx->saved_data["beta"].toDouble();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const bool keepdim = ctx->saved_data["keepdim"].toBool();
    at::Tensor grad = grads[0];
    if (!std::isinf(kernel_beta(x, beta)) && is_half(x) && x.dim() > 0) {
      // exp(β(x − r)) is softmax(βx) times exp(β(r_exact − r)): one factor per output, from the rounding of r to
      // x's dtype, which for float16/bfloat16 reaches |β|·|r|·2⁻⁹ (bfloat16 [100, 100] at β = 1: gradients 0.605
      // instead of 0.5). Dividing grad by Σ_dim exp(β(x − r)) (one more pass, in float32) cancels it.
      const int64_t d = wrap_dim(dim, x.dim(), "dim");
      const at::Tensor p = call_smooth_max_backward(at::ones_like(result), x, result, beta, dim, keepdim);
      const at::Tensor total = p.sum(d, keepdim, at::kFloat);
      // (not where the sum is NaN or 0: a row holding +inf, whose other gradients stay 0 as in float32, or a
      // result that overflowed to inf)
      const at::Tensor usable = at::isfinite(total).logical_and(total > 0);
      grad = at::where(usable, grad.to(at::kFloat) / total, grad.to(at::kFloat)).to(grad.scalar_type());
    }
    out[0] = call_smooth_max_backward(grad, x, result, beta, dim, keepdim);
    return out;
  }
};

class SmoothMaxBackwardFunction : public torch::autograd::Function<SmoothMaxBackwardFunction> {
 public:
  static constexpr bool is_traceable = true;  // (compiled autograd: the backward calls ops on saved state)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& x,
                            const at::Tensor& result, double beta, int64_t dim, bool keepdim) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, x, result});
    save_reduction(ctx, beta, dim, keepdim);
    return below_autograd(call_smooth_max_backward, grad, x, result, beta, dim, keepdim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& gg = grads[0];
    variable_list out(6);
    if (!gg.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &x = saved[1], &result = saved[2];
    const double beta = ctx->saved_data["beta"].toDouble();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const bool keepdim = ctx->saved_data["keepdim"].toBool();
    const bool scalar = x.dim() == 0;
    const int64_t d = wrap_dim(dim, x.dim(), "dim");
    const bool need_grad = ctx->needs_input_grad(0), need_x = ctx->needs_input_grad(1),
               need_result = ctx->needs_input_grad(2);
    const at::Tensor p = call_smooth_max_backward(at::ones_like(grad), x, result, beta, dim, keepdim);
    const at::Tensor gg_p = gg * p;
    if (need_grad) out[0] = (scalar ? gg_p : gg_p.sum(d, /*keepdim=*/true)).reshape(grad.sizes());
    if (!need_x && !need_result) return out;
    if (std::isinf(kernel_beta(x, beta))) {
      if (need_x) out[1] = at::zeros_like(x);
      if (need_result) out[2] = at::zeros_like(result);
      return out;
    }
    const at::Tensor g_b = (keepdim || scalar) ? grad : grad.unsqueeze(d);
    const at::Tensor term = beta * gg_p * g_b;
    if (need_x) out[1] = term;
    if (need_result) out[2] = -(scalar ? term : term.sum(d, /*keepdim=*/true)).reshape(result.sizes());
    return out;
  }
};

// The composite formulation (dispatch.h), the kernels' math in ATen ops: m + logsumexp(β·(x − m))/β with m the max
// (β > 0; the min for β < 0) along dim (a constant: its derivative cancels, Σ softmax = 1), so β·x cannot overflow
// where the result does not (logsumexp(β·x) overflowed float32 at β = 1e30, x = 1e10); in float32 for half-precision x as the kernels compute,
// in float64 for a β below float's normal numbers (beta_below_float); at β = ±inf (or beyond float's range for
// float-computed x: kernel_beta) the max / min, whose derivative ATen shares equally between ties, as the Function
// does.
at::Tensor smooth_max_composite(const at::Tensor& x, double beta, int64_t dim, bool keepdim) {
  const double b = kernel_beta(x, beta);
  if (std::isinf(b)) return b > 0 ? at::amax(x, {dim}, keepdim) : at::amin(x, {dim}, keepdim);
  const at::Tensor xa = x.to(x.scalar_type() == at::kDouble || beta_below_float(x, beta) ? at::kDouble : at::kFloat);
  // (the max for β > 0, the min for β < 0: β·(x − m) <= 0 either way)
  const at::Tensor top = (beta > 0 ? at::amax(xa, {dim}, /*keepdim=*/true) : at::amin(xa, {dim}, /*keepdim=*/true))
                             .detach();
  const at::Tensor m = at::where(at::isfinite(top), top, at::zeros_like(top));  // (±inf, NaN rows: no shift)
  at::Tensor out = m + at::logsumexp((xa - m) * beta, {dim}, /*keepdim=*/true) / beta;
  if (!keepdim && x.dim() > 0) out = out.squeeze(dim);
  return out.to(x.scalar_type());
}

at::Tensor smooth_max_autograd(const at::Tensor& x, double beta, int64_t dim, bool keepdim) {
  if (!needs_autograd(x)) return below_autograd(call_smooth_max, x, beta, dim, keepdim);
  if (needs_composite(x)) return smooth_max_composite(x, beta, dim, keepdim);
  return SmoothMaxFunction::apply(x, beta, dim, keepdim);
}

at::Tensor smooth_max_backward_autograd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& result,
                                        double beta, int64_t dim, bool keepdim) {
  if (!needs_autograd(grad, x, result)) {
    return below_autograd(call_smooth_max_backward, grad, x, result, beta, dim, keepdim);
  }
  return SmoothMaxBackwardFunction::apply(grad, x, result, beta, dim, keepdim);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("smooth_max", &smooth_max_autograd);
  m.impl("smooth_max_backward", &smooth_max_backward_autograd);
}

}  // namespace pyops
