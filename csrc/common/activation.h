// The activations a fused convolution applies to its output (conv2d_bias_act, conv1d_bias_act): their codes in the
// ops' schemas ("int activation"; pyops/conv_bn_relu.py ACTIVATIONS maps the names), the check of a code, the same
// activation as ATen ops, and the derivative pass the fused ops' autograd shares.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

namespace pyops {

// SiLU (x·σ(x), EfficientNet's), Hardswish (x·relu6(x + 3)/6, MobileNetV3's), Hardsigmoid (relu6(x + 3)/6) and
// Sigmoid (σ(x) = 1/(1 + e^-x); these two gate MobileNetV3's and EfficientNet's squeeze-excitation blocks) as
// torch.nn defines them.
enum class Activation : int64_t {
  kNone = 0,
  kRelu = 1,
  kRelu6 = 2,
  kSilu = 3,
  kHardswish = 4,
  kHardsigmoid = 5,
  kSigmoid = 6,
};

// The activation of code `activation`, or a ValueError naming the argument of `op`.
inline Activation checked_activation(int64_t activation, const char* op) {
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 6, op, ": argument 'activation' must be 0 (none), 1 (relu), ",
                    "2 (relu6), 3 (silu), 4 (hardswish), 5 (hardsigmoid) or 6 (sigmoid), got ", activation);
  return static_cast<Activation>(activation);
}

// Whether act is the identity or a clamp (ReLU, ReLU6): the CPU kernels apply it as they store the output, and a
// backward needs only that output (the clamp's mask: pyops::conv_act_backward). The other activations run as ATen
// ops (activation_aten) after the op computed without them, on the CPU and wherever autograd records the call, and
// ATen's autograd differentiates them: SiLU and Hardswish take the same value at two inputs with different slopes
// (their output does not give their derivative), and their exponentials cost as much in a pass over the
// cache-resident output as inlined into the stores, which slowed the ReLU epilogue (bench/NOTES-conv_bn_relu.md,
// stop 40); Hardsigmoid and Sigmoid gate squeeze-excitation blocks, whose N×C outputs a pass reads in a few µs.
inline bool identity_or_clamp(Activation act) { return act <= Activation::kRelu6; }

// act(y) by ATen ops (differentiable; NaN stays NaN): in place on y (a fresh result nothing else holds) or not.
at::Tensor activation_aten(const at::Tensor& y, Activation act, bool in_place);

// (grad·act'(output)·scale[c], grad·act'(output) if unscaled_too and scale is given) for an (N, C, ...) output: one
// pass of pyops::conv_act_backward, or ATen ops autograd can differentiate where grad mode is on (a double backward).
// (csrc/ops/conv_bn_relu/conv_bn_relu_autograd.cpp)
std::tuple<at::Tensor, at::Tensor> act_backward(const at::Tensor& grad, const at::Tensor& output,
                                                const std::optional<at::Tensor>& scale, int64_t activation,
                                                bool unscaled_too);

// grad·act'(output), the gradient before the activation (grad itself where there is none): act_backward without a
// scale, for the fused ops' backwards.
at::Tensor grad_before_activation(const at::Tensor& grad, const at::Tensor& output, int64_t activation);

}  // namespace pyops
