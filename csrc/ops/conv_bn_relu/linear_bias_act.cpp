// Schema and argument checks of linear_bias_act, act(x·Wᵀ + b), and its kernel off the CPU: ATen's linear and the
// activation in place (cuBLAS's GEMM is the main loop there; no kernel of ours to add).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "common/checks.h"
#include "ops/conv_bn_relu/linear.h"

namespace pyops {

Activation check_linear_bias_act_args(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t activation) {
  check_floating(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, "pyops.linear_bias_act: argument 'input' must have at least 1 dimension ",
                    "(*, in_features), got a 0-d tensor");
  check_dim(weight, 2, "weight");
  check_same_dtype(weight, input, "weight", "input");
  check_same_device(weight, input, "weight", "input");
  TORCH_CHECK_VALUE(weight.size(1) == input.size(-1), "pyops.linear_bias_act: argument 'weight' of shape ",
                    weight.sizes(), " expects ", weight.size(1), " input features, but 'input' of shape ",
                    input.sizes(), " has ", input.size(-1));
  if (bias.has_value()) {
    check_same_dtype(*bias, input, "bias", "input");
    check_same_device(*bias, input, "bias", "input");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "pyops.linear_bias_act: argument 'bias' ",
                      "must have shape (", weight.size(0), ",) (one value per output feature), got ", bias->sizes());
  }
  return checked_activation(activation, "pyops.linear_bias_act");
}

at::Tensor linear_bias_act_aten(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t activation) {
  const Activation act = check_linear_bias_act_args(input, weight, bias, activation);
  return activation_aten(at::linear(input, weight, bias), act, /*in_place=*/true);
}

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("linear_bias_act(Tensor input, Tensor weight, Tensor? bias, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("linear_bias_act", &linear_bias_act_aten); }

// In autocast regions the dtype F.linear would compute in (the convolutions' policy, common/autocast.h).
TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) {
  m.impl("linear_bias_act", autocast_kernel<c10::DeviceType::CPU>());
}
TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) {
  m.impl("linear_bias_act", autocast_kernel<c10::DeviceType::CUDA>());
}

}  // namespace pyops
