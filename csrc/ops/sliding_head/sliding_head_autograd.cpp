// sliding_head at the Autograd key. The op is inference only (it has no backward): a call that autograd would have
// to record, i.e. grad mode on and an argument requiring grad (nn.Parameters, typically) or carrying a forward-mode
// tangent, is refused with an error naming that argument, instead of returning a result cut off from the graph or
// failing deep inside on an out= GEMM. Every other call goes straight to the backend kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/dispatch.h"

namespace pyops {
namespace {

at::Tensor sliding_head_autograd(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef relu, bool allow_tf32, int64_t workspace_bytes) {
  const bool grad_mode = at::GradMode::is_enabled();
  constexpr const char* kOp = "pyops.sliding_head";
  check_not_recorded(features, kOp, "features", -1, grad_mode);
  for (size_t i = 0; i < weights.size(); ++i) check_not_recorded(weights[i], kOp, "weights", i, grad_mode);
  for (size_t i = 0; i < biases.size(); ++i) check_not_recorded(biases[i], kOp, "biases", i, grad_mode);
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, bool, int64_t)>(
          "pyops::sliding_head");
  return below_autograd([&] { return op.call(features, weights, biases, relu, allow_tf32, workspace_bytes); });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) { m.impl("sliding_head", &sliding_head_autograd); }

}  // namespace pyops
