// smooth_max(x, beta, dim, keepdim) = (1/beta) * log(sum_i exp(beta * x_i)) along dim.
//
// Every kernel sees the contiguous input as (outer, n, inner), reducing over n:
//   outer = prod(sizes[:dim]), n = sizes[dim], inner = prod(sizes[dim+1:]).
// They keep an online state (m, S) per output over sign*x, sign = sign(beta), b = |beta|:
//   m = max(sign * x),  S = sum exp(b * (sign * x - m)),  result = sign * (m + log(S) / b).
// S >= 1 (the maximum contributes exp(0) = 1), so result >= max exactly; b = inf gives S = the number of ties
// and result = max exactly. Terms equal to m count as 1 rather than exp(b * 0), which keeps +-inf inputs and
// b = inf free of inf - inf and 0 * inf.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/cpu_isa.h"

namespace pyops {

struct ReductionView {
  int64_t outer, n, inner;
};

// Validates the arguments (naming the one at fault) and returns the wrapped dim.
int64_t check_smooth_max_args(const at::Tensor& x, double beta, int64_t dim);
// The backward's checks: x's as above, and grad and result in x's dtype and device, of the forward's output shape.
int64_t check_smooth_max_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& result,
                                       double beta, int64_t dim, bool keepdim);
ReductionView reduction_view(const at::Tensor& x, int64_t dim);
// The result's shape with the reduced dimension kept as 1.
std::vector<int64_t> keepdim_shape(const at::Tensor& x, int64_t dim);

// β as the kernels take it. They hold β in x's accumulation type, float for float32/float16/bfloat16, where a β
// beyond float's range is inf: the result then equals the max to float's rounding (log(ties)/β < 1e-38) and the
// gradient is β = ±inf's one-hot (a finite β made inf·0 = NaN in it), so such a β is passed as ±inf.
double kernel_beta(const at::Tensor& x, double beta);
// Whether β is below float's normal numbers while x computes in float: there it rounds to 0 or a denormal (0·inf =
// NaN; digits lost in β·x and in the division by β), so such calls compute in float64 (rare: at any cost).
bool beta_below_float(const at::Tensor& x, double beta);

// CPU kernels (common/cpu_isa.h): called as PYOPS_CPU_KERNEL(smooth_max_forward_cpu_impl)(...).
PYOPS_DECLARE_CPU_KERNEL(void smooth_max_forward_cpu_impl(const at::Tensor& x, at::Tensor& out,
                                                          const ReductionView& v, double beta))
PYOPS_DECLARE_CPU_KERNEL(void smooth_max_backward_cpu_impl(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& result, at::Tensor& grad_x,
                                                           const ReductionView& v, double beta))

}  // namespace pyops
