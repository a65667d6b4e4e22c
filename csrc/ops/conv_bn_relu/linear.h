// linear_bias_act, act(x·Wᵀ + b): the fused op of a Linear [→ BatchNorm1d folded in] → activation
// (pyops.nn.LinearBNReLU), and the CPU product that 1×1 convolutions on 1×1 maps share with it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "common/activation.h"
#include "common/cpu_isa.h"

namespace pyops {

// Checks linear_bias_act's arguments (input (*, K), weight (N, K), bias (N,) or None, an activation code), naming
// the one at fault; returns the activation.
Activation check_linear_bias_act_args(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t activation);

// linear_bias_act by ATen ops: at::linear, then the activation in place (the kernel off the CPU, and for CPU dtypes
// other than float32, as F.linear computes them).
at::Tensor linear_bias_act_aten(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t activation);

// act(x·Wᵀ + bias + residual) for float32 CPU tensors: x (M, K), weight (N, K), bias (N,) or undefined, residual
// (M, N) or undefined; act none, relu or relu6. Returns (M, N), contiguous. The product runs as
// small_batch_product_cpu where linear_cpu.cpp's rule says it is faster (or PYOPS_CONV_PATH=direct), else as the
// library's (oneDNN's inner product where MKL runs narrower than it, else MKL's GEMM), with the epilogue in one pass
// after it.
at::Tensor linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& residual, Activation act);

// y (m, n), contiguous = x (m, k; row stride ldx, unit stride along k) · wᵀ, w (n, k) contiguous; float32.
PYOPS_DECLARE_CPU_KERNEL(void small_batch_product_cpu(const float* x, int64_t ldx, int64_t m, const float* w,
                                                      int64_t n, int64_t k, float* y))

}  // namespace pyops
