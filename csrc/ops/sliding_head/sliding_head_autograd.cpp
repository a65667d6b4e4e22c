// sliding_head at the Autograd key. The op is inference only (it has no backward): a call that autograd would have
// to record, i.e. grad mode on and an argument requiring grad (nn.Parameters, typically) or carrying a forward-mode
// tangent, is refused with an error naming that argument, instead of returning a result cut off from the graph or
// failing deep inside on an out= GEMM. Every other call goes straight to the backend kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "common/dispatch.h"

namespace pyops {
namespace {

// index < 0 names the argument itself, else its element [index]; the message is built only on failure.
void check_not_recorded(const at::Tensor& t, const char* name, int64_t index, bool grad_mode) {
  TORCH_CHECK_NOT_IMPLEMENTED(!autograd_sees(t, grad_mode), "pyops.sliding_head is inference only (no backward), ",
                              "but argument '", name, index < 0 ? std::string() : "[" + std::to_string(index) + "]",
                              "' requires grad (or carries a forward-mode tangent): call it under torch.no_grad() ",
                              "or pass detached tensors");
}

at::Tensor sliding_head_autograd(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef relu, bool allow_tf32, int64_t workspace_bytes) {
  const bool grad_mode = at::GradMode::is_enabled();
  check_not_recorded(features, "features", -1, grad_mode);
  for (size_t i = 0; i < weights.size(); ++i) check_not_recorded(weights[i], "weights", i, grad_mode);
  for (size_t i = 0; i < biases.size(); ++i) check_not_recorded(biases[i], "biases", i, grad_mode);
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, bool, int64_t)>(
          "pyops::sliding_head");
  return below_autograd([&] { return op.call(features, weights, biases, relu, allow_tf32, workspace_bytes); });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) { m.impl("sliding_head", &sliding_head_autograd); }

}  // namespace pyops
