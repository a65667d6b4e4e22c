// Schemas and the device-independent half of smooth_max: argument checks, shape math, and the CPU/CUDA kernel
// registrations that share them.
#include "ops/smooth_max/smooth_max.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/autocast.h"
#include "common/checks.h"

namespace pyops {

int64_t check_smooth_max_args(const at::Tensor& x, double beta, int64_t dim) {
  check_floating(x, "x");
  TORCH_CHECK_VALUE(beta != 0.0 && !std::isnan(beta),
                    "pyops.smooth_max: argument 'beta' must be non-zero and not NaN, got ", beta,
                    " (beta -> 0 is the mean, not a smooth max)");
  const int64_t d = wrap_dim(dim, x.dim(), "dim");
  TORCH_CHECK_VALUE(x.dim() == 0 || x.size(d) > 0, "pyops.smooth_max: argument 'x' has size 0 along dim ", dim,
                    " (shape ", x.sizes(), "): the smooth max of nothing is undefined");
  return d;
}

ReductionView reduction_view(const at::Tensor& x, int64_t dim) {
  if (x.dim() == 0) return {1, 1, 1};
  ReductionView v{1, x.size(dim), 1};
  for (int64_t i = 0; i < dim; ++i) v.outer *= x.size(i);
  for (int64_t i = dim + 1; i < x.dim(); ++i) v.inner *= x.size(i);
  return v;
}

double kernel_beta(const at::Tensor& x, double beta) {
  if (x.scalar_type() == at::kDouble || std::abs(beta) <= std::numeric_limits<float>::max()) return beta;
  return std::copysign(std::numeric_limits<double>::infinity(), beta);
}

bool beta_below_float(const at::Tensor& x, double beta) {
  return x.scalar_type() != at::kDouble && std::abs(beta) < std::numeric_limits<float>::min();
}

std::vector<int64_t> keepdim_shape(const at::Tensor& x, int64_t dim) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (!shape.empty()) shape[dim] = 1;
  return shape;
}

int64_t check_smooth_max_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& result,
                                       double beta, int64_t dim, bool keepdim) {
  const int64_t d = check_smooth_max_args(x, beta, dim);
  std::vector<int64_t> shape = keepdim_shape(x, d);
  if (!keepdim && !shape.empty()) shape.erase(shape.begin() + d);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad, "grad"}, {result, "result"}}) {
    check_same_dtype(t, x, name, "x");
    check_same_device(t, x, name, "x");
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "pyops.smooth_max_backward: argument '", name,
                      "' must have the forward's output shape ", at::IntArrayRef(shape), ", got ", t.sizes());
  }
  return d;
}

namespace {

at::Tensor finish_shape(at::Tensor out, const at::Tensor& x, int64_t dim, bool keepdim) {
  return (keepdim || x.dim() == 0) ? out : out.squeeze(dim);
}

at::Tensor smooth_max_cpu(const at::Tensor& x, double beta, int64_t dim, bool keepdim) {
  const int64_t d = check_smooth_max_args(x, beta, dim);
  if (beta_below_float(x, beta)) return smooth_max_cpu(x.to(at::kDouble), beta, dim, keepdim).to(x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(keepdim_shape(x, d), x.options());
  if (out.numel() > 0) {
    PYOPS_CPU_KERNEL(smooth_max_forward_cpu_impl)(xc, out, reduction_view(xc, d), kernel_beta(x, beta));
  }
  return finish_shape(out, x, d, keepdim);
}

at::Tensor smooth_max_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& result,
                                   double beta, int64_t dim, bool keepdim) {
  const int64_t d = check_smooth_max_backward_args(grad, x, result, beta, dim, keepdim);
  if (beta_below_float(x, beta)) {
    return smooth_max_backward_cpu(grad.to(at::kDouble), x.to(at::kDouble), result.to(at::kDouble), beta, dim,
                                   keepdim).to(x.scalar_type());
  }
  const auto shape = keepdim_shape(x, d);
  // grad and result come in the forward's output shape; the kernels read them with the reduced dim kept.
  const at::Tensor g = grad.reshape(shape).contiguous();
  const at::Tensor r = result.reshape(shape).contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_x.numel() > 0) {
    PYOPS_CPU_KERNEL(smooth_max_backward_cpu_impl)(g, x.contiguous(), r, grad_x, reduction_view(x, d),
                                                   kernel_beta(x, beta));
  }
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("smooth_max(Tensor x, float beta, int dim, bool keepdim) -> Tensor");
  m.def("smooth_max_backward(Tensor grad, Tensor x, Tensor result, float beta, int dim, bool keepdim) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("smooth_max", &smooth_max_cpu);
  m.impl("smooth_max_backward", &smooth_max_backward_cpu);
}

// In autocast regions: float32, as autocast runs torch.logsumexp (csrc/common/autocast.h).
TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) {
  m.impl("smooth_max", autocast_kernel<c10::DeviceType::CPU, AutocastPolicy::kFloat32>());
}
TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) {
  m.impl("smooth_max", autocast_kernel<c10::DeviceType::CUDA, AutocastPolicy::kFloat32>());
}

}  // namespace pyops
