// CPU entries of conv1d and its backward ops: checks, contiguous operands (float16/bfloat16 ones computed in
// float32), and the rewrites that turn each op into one of the two CPU correlation kernels (conv1d_cpu_correlate.cpp,
// conv1d_cpu_weight.cpp) -- or, for dense layers where oneDNN's GEMM-based convolution is faster
// (bench/NOTES-conv1d.md), into ATen's convolution, except the float32 weight gradient, which per-tap GEMMs compute
// faster still on CPUs where MKL runs oneDNN's vector width (conv1d_cpu_gemm.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/conv1d/conv1d.h"

namespace pyops {
namespace {

// float16 / bfloat16 on the CPU: the kernels are float32/float64 ones, so these compute in float32 (the accumulation
// dtype the CUDA kernels use for them too) and round the result once to the arguments' dtype (checked equal before).
bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }
void check_cpu_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "pyops.conv1d: argument '", name,
                   "' has dtype ", t.scalar_type(), "; the CPU kernels take float32, float64, float16 and bfloat16");
}
at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat); }
std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? std::optional<at::Tensor>(as_float(*t)) : t;
}

// grad_output of a strided convolution with zeros between its samples, (N, C, (L-1)*stride + 1): every backward
// op then is a stride-1 correlation. The zeros cost stride times the work, only where stride > 1.
at::Tensor upsample_by_stride(const at::Tensor& grad_output, int64_t stride) {
  const at::Tensor gy = grad_output.contiguous();
  if (stride == 1) return gy;
  const int64_t length = (gy.size(2) - 1) * stride + 1;
  at::Tensor up = at::zeros({gy.size(0), gy.size(1), length}, gy.options());
  up.slice(2, 0, length, stride).copy_(gy);
  return up;
}

at::Tensor conv1d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  const Conv1dGeometry g = check_conv1d(input, weight, bias, stride, padding, dilation, groups);
  if (is_half(input)) {
    return conv1d_cpu(as_float(input), as_float(weight), as_float(bias), stride, padding, dilation, groups)
        .to(input.scalar_type());
  }
  check_cpu_dtype(input, "input");
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const bool empty = g.batch * g.out_channels * g.out_length == 0;
  // ATen allocates its own output: decide before allocating ours
  if (!empty && conv1d_use_library(g, /*cuda=*/false)) {
    return library_conv1d(input, weight, b, g);
  }
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_length}, input.options());
  if (empty) return out;
  correlate_cpu(input.contiguous(), weight.contiguous(), b, out,
                {g.batch, g.in_channels, g.in_length, g.out_channels, g.kernel_size, g.out_length, stride, dilation,
                 -padding, groups});
  return out;
}

// grad_input[n, c, i] = sum_{o, k} weight[o, c, k] * grad_output[n, o, (i + padding - k*dilation) / stride]
// (where that divides exactly): the correlation of the upsampled grad_output with the per-group transposed,
// flipped filter.
at::Tensor conv1d_backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight, int64_t input_length,
                                     int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  const Conv1dGeometry g =
      check_conv1d_backward_input(grad_output, weight, input_length, stride, padding, dilation, groups);
  if (is_half(grad_output)) {
    return conv1d_backward_input_cpu(as_float(grad_output), as_float(weight), input_length, stride, padding, dilation,
                                     groups)
        .to(grad_output.scalar_type());
  }
  check_cpu_dtype(grad_output, "grad_output");
  const bool empty = g.batch * g.in_channels * g.in_length == 0;
  if (!empty && conv1d_use_library(g, /*cuda=*/false)) return library_conv1d_backward_input(grad_output, weight, g);
  at::Tensor grad_input = at::empty({g.batch, g.in_channels, g.in_length}, grad_output.options());
  if (empty) return grad_input;
  const int64_t cg = g.in_per_group(), og = g.out_per_group(), k = g.kernel_size;
  const at::Tensor flipped =
      weight.contiguous().view({groups, og, cg, k}).transpose(1, 2).flip({3}).reshape({groups * cg, og, k}).contiguous();
  const at::Tensor gy = upsample_by_stride(grad_output, stride);
  correlate_cpu(gy, flipped, at::Tensor(), grad_input,
                {g.batch, g.out_channels, gy.size(2), g.in_channels, k, g.in_length, 1, dilation,
                 padding - dilation * (k - 1), groups});
  return grad_input;
}

// grad_weight and, when with_bias, grad_bias (undefined otherwise). oneDNN's weight gradient sums the bias in the
// same pass; the other paths sum it apart.
std::tuple<at::Tensor, at::Tensor> backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                       int64_t kernel_size, int64_t stride, int64_t padding,
                                                       int64_t dilation, int64_t groups, bool with_bias) {
  const Conv1dGeometry g =
      check_conv1d_backward_weight(grad_output, input, kernel_size, stride, padding, dilation, groups);
  const auto bias_sum = [&] { return with_bias ? grad_output.sum(at::IntArrayRef{0, 2}) : at::Tensor(); };
  if (is_half(grad_output)) {
    const at::Tensor grad_weight = std::get<0>(backward_weight_cpu(as_float(grad_output), as_float(input), kernel_size,
                                                                   stride, padding, dilation, groups, false));
    return {grad_weight.to(grad_output.scalar_type()), bias_sum()};
  }
  check_cpu_dtype(grad_output, "grad_output");
  const bool empty = g.batch * g.out_channels * g.in_per_group() == 0;
  if (!empty && conv1d_use_library(g, /*cuda=*/false)) {
    if (!use_gemm_backward_weight(g, input.scalar_type())) {
      return library_conv1d_backward_weight(grad_output, input, g, with_bias);
    }
    return {gemm_conv1d_backward_weight(grad_output, input, g), bias_sum()};
  }
  at::Tensor grad_weight = at::empty({g.out_channels, g.in_per_group(), kernel_size}, input.options());
  if (grad_weight.numel() > 0) {
    correlate_weight_cpu(upsample_by_stride(grad_output, stride), input.contiguous(), grad_weight, dilation, -padding,
                         groups);
  }
  return {grad_weight, bias_sum()};
}

at::Tensor conv1d_backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_size,
                                      int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  return std::get<0>(backward_weight_cpu(grad_output, input, kernel_size, stride, padding, dilation, groups, false));
}

std::tuple<at::Tensor, at::Tensor> conv1d_backward_weight_bias_cpu(const at::Tensor& grad_output,
                                                                   const at::Tensor& input, int64_t kernel_size,
                                                                   int64_t stride, int64_t padding, int64_t dilation,
                                                                   int64_t groups) {
  return backward_weight_cpu(grad_output, input, kernel_size, stride, padding, dilation, groups, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("conv1d", &conv1d_cpu);
  m.impl("conv1d_backward_input", &conv1d_backward_input_cpu);
  m.impl("conv1d_backward_weight", &conv1d_backward_weight_cpu);
  m.impl("conv1d_backward_weight_bias", &conv1d_backward_weight_bias_cpu);
}

}  // namespace pyops
