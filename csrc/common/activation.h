// The activations a fused convolution applies to its output (conv2d_bias_act, conv1d_bias_act): their codes in the
// ops' schemas ("int activation"; pyops/conv_bn_relu.py ACTIVATIONS maps the names), the check of a code, and the
// derivative pass the fused ops' autograd shares.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

namespace pyops {

enum class Activation : int64_t { kNone = 0, kRelu = 1, kRelu6 = 2 };

// The activation of code `activation`, or a ValueError naming the argument of `op`.
inline Activation checked_activation(int64_t activation, const char* op) {
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2, op, ": argument 'activation' must be 0 (none), 1 (relu) or ",
                    "2 (relu6), got ", activation);
  return static_cast<Activation>(activation);
}

// (grad·act'(output)·scale[c], grad·act'(output) if unscaled_too and scale is given) for an (N, C, ...) output: one
// pass of pyops::conv_act_backward, or ATen ops autograd can differentiate where grad mode is on (a double backward).
// (csrc/ops/conv_bn_relu/conv_bn_relu_autograd.cpp)
std::tuple<at::Tensor, at::Tensor> act_backward(const at::Tensor& grad, const at::Tensor& output,
                                                const std::optional<at::Tensor>& scale, int64_t activation,
                                                bool unscaled_too);

}  // namespace pyops
