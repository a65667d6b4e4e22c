// CPU entries of conv1d and its backward ops: checks, contiguous operands (float16/bfloat16 ones computed in
// float32), and the rewrites that turn each op into one of the two CPU correlation kernels (conv1d_cpu_correlate.cpp,
// conv1d_cpu_weight.cpp) -- or, for the ops whose product ATen's GEMM-based convolution runs faster
// (conv1d_use_library, bench/NOTES-conv1d.md), into ATen's convolution; the weight gradient into one of three paths,
// the third a matrix product through BLAS (cpu_weight_gradient_path, conv1d_cpu_gemm.cpp); and the ops of pointwise
// layers into matrix products (pointwise_as_product, conv1d_cpu_gemm.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/onednn.h"
#include "ops/conv1d/conv1d.h"

namespace pyops {
namespace {

// float16 / bfloat16 on the CPU: our kernels are float32/float64 ones, so these compute in float32 (the accumulation
// dtype the CUDA kernels use for them too) and round the result once to the arguments' dtype (checked equal before)
// -- except on the library path where oneDNN computes the dtype (common/onednn.h): it accumulates in fp32 and rounds
// once too, with the CPU's half-precision instructions (a bfloat16 dense layer in float32 was 2.3x slower).
bool computes_in_float(const at::Tensor& t, bool library) {
  return is_half(t) && !(library && onednn_computes(t.scalar_type()));
}
void check_cpu_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || is_half(t),
                   "pyops.conv1d: argument '", name, "' has dtype ", t.scalar_type(),
                   "; the CPU kernels take float32, float64, float16 and bfloat16");
}
at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat); }
std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? std::optional<at::Tensor>(as_float(*t)) : t;
}

// A strided layer's input gradient as stride-1 correlations, one per phase (polyphase). Tap k reads input position
// j*stride + k*dilation - padding for output j: the taps whose k*dilation - padding leave the same remainder r modulo
// the stride read only the input positions of phase r (r, r + stride, ...), and they are every `step`-th tap
// (step = stride / gcd(stride, dilation)), spaced dilation / gcd apart on that phase. So the first `step` taps each
// start one class, and a class is a stride-1 correlation on its phase. (Correlating a grad_output upsampled with
// zeros gave the same sums at stride times the work, and made NaN of 0 * inf where a weight or input is infinite:
// F.conv1d's gradients stay finite there.)
struct TapClass {
  int64_t first, taps;  // taps first, first + step, ... (taps of them)
  int64_t phase, shift;  // their input phase r, and floor((first*dilation - padding) / stride)
};

struct TapClasses {
  int64_t step, dilation;  // between a class's taps: in the kernel, and on its phase
  std::vector<TapClass> classes;
};

TapClasses tap_classes(int64_t kernel_size, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t common = std::gcd(stride, dilation);
  TapClasses t{stride / common, dilation / common, {}};
  for (int64_t k = 0; k < std::min(t.step, kernel_size); ++k) {
    const int64_t e = k * dilation - padding;
    const int64_t phase = ((e % stride) + stride) % stride;
    t.classes.push_back({k, (kernel_size - k + t.step - 1) / t.step, phase, (e - phase) / stride});
  }
  return t;
}

// The per-group transposed, flipped filter (groups * Cin/groups, Cout/groups, taps): grad_input as a correlation.
at::Tensor transposed_flipped(const at::Tensor& weight, int64_t groups) {
  const int64_t og = weight.size(0) / groups, cg = weight.size(1), taps = weight.size(2);
  return weight.contiguous().view({groups, og, cg, taps}).transpose(1, 2).flip({3}).reshape({groups * cg, og, taps})
      .contiguous();
}

// A single float32 image that F.conv1d gives to ATen's im2col GEMM (aten_takes_im2col), undilated (a dilated one
// takes ATen's slow_conv_dilated2d, 2-6x slower than our kernel), into many outputs (>= 128) of a reduction of >= 40
// taps -- short of the forward's bar in conv1d_use_library -- where ATen's convolution (that GEMM) beat the direct
// forward 1.1-1.5x on 1 and 2 threads (stop 28 sweep, bench/NOTES-conv1d.md: 8→256 k9 on 1024 positions 1.31x /
// 1.49x, 16→128 k5 1.38x / 1.13x, 16→128 k3 1.30x / 0.98x); at stride 2-5 too (stop 29: 24→384 k5 stride 2 on 273
// positions 2.4x, 8→256 k9 1.29x, 64→512 k1 1.64x; 16→128 k3 0.96x, 8→128 k10 stride 5 0.84x). At batch 4-8, with
// more input values (oneDNN's path) or a shorter reduction the direct kernel was as fast or faster.
bool one_small_image_into_many_outputs(const at::Tensor& input, const Conv1dGeometry& g) {
  return conv1d_path() == Conv1dPath::kAuto && input.scalar_type() == at::kFloat && aten_takes_im2col(g) &&
         g.dilation == 1 && g.out_channels >= 128 && g.in_channels * g.kernel_size >= 40;
}

// conv1d, and conv1d_bias_act with act and residual: added and applied as each path stores its output (after the
// library's call: one pass).
at::Tensor conv1d_act_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t stride, int64_t padding, int64_t dilation, int64_t groups, Activation act,
                          const std::optional<at::Tensor>& residual) {
  const Conv1dGeometry g = check_conv1d(input, weight, bias, stride, padding, dilation, groups);
  check_conv1d_residual(residual, input, g);
  stride = g.stride;  // (a stride past the padded length, capped: checked_conv_stride)
  const bool empty = g.batch * g.out_channels * g.out_length == 0;
  const bool library = !empty && (conv1d_use_library(g, Conv1dOp::kForward, /*cuda=*/false) ||
                                   one_small_image_into_many_outputs(input, g));
  if (computes_in_float(input, library)) {  // (the activation commutes with the rounding: both are monotone)
    return conv1d_act_cpu(as_float(input), as_float(weight), as_float(bias), stride, padding, dilation, groups, act,
                          as_float(residual))
        .to(input.scalar_type());
  }
  check_cpu_dtype(input, "input");
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() && residual->defined() ? residual->contiguous() : at::Tensor();
  if (!empty && pointwise_as_product(g, input.scalar_type(), Conv1dOp::kForward))
    return gemm_pointwise_conv1d(input, weight, b, r, g, act);
  // ATen allocates its own output: decide before allocating ours
  if (library) {
    at::Tensor out = library_conv1d(input, weight, b, g);
    add_residual_activate(out, r, act);
    return out;
  }
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_length}, input.options());
  if (empty) return out;
  // (the AVX-512 build where each output sums over several channels: 1.35x the AVX2 build's geomean on 35 dense
  // layers, 1.15x on grouped ones; one row per group, depthwise or single-channel, reads as fast in either: 0.95-1.05x,
  // stop 35, bench/NOTES-conv1d.md)
  const CorrelationShape s{g.batch, g.in_channels, g.in_length, g.out_channels, g.kernel_size, g.out_length,
                           stride, dilation, -padding, groups, act};
  PYOPS_CPU_KERNEL_IF(g.in_channels > groups, correlate_cpu)(input.contiguous(), weight.contiguous(), b, r, out, s,
                                                             /*end_to_end=*/true);
  return out;
}

at::Tensor conv1d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  return conv1d_act_cpu(input, weight, bias, stride, padding, dilation, groups, Activation::kNone, std::nullopt);
}

at::Tensor conv1d_bias_act_cpu(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                               int64_t dilation, int64_t groups, int64_t activation,
                               const std::optional<at::Tensor>& residual) {
  const Activation act = checked_activation(activation, "pyops.conv1d_bias_act");
  if (!identity_or_clamp(act)) {  // a pass after the kernels (common/activation.h says why)
    return activation_aten(conv1d_act_cpu(input, weight, bias, stride, padding, dilation, groups, Activation::kNone,
                                          residual),
                           act, /*in_place=*/true);
  }
  return conv1d_act_cpu(input, weight, bias, stride, padding, dilation, groups, act, residual);
}

// grad_input[n, c, i] = sum_{o, k} weight[o, c, k] * grad_output[n, o, (i + padding - k*dilation) / stride]
// (where that divides exactly): the correlation of the upsampled grad_output with the per-group transposed,
// flipped filter.
at::Tensor conv1d_backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight, int64_t input_length,
                                     int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  const Conv1dGeometry g =
      check_conv1d_backward_input(grad_output, weight, input_length, stride, padding, dilation, groups);
  stride = g.stride;  // (a stride past the padded length, capped: checked_conv_stride)
  const bool empty = g.batch * g.in_channels * g.in_length == 0;
  const bool library = !empty && conv1d_use_library(g, Conv1dOp::kBackwardInput, /*cuda=*/false);
  if (computes_in_float(grad_output, library)) {
    return conv1d_backward_input_cpu(as_float(grad_output), as_float(weight), input_length, stride, padding, dilation,
                                     groups)
        .to(grad_output.scalar_type());
  }
  check_cpu_dtype(grad_output, "grad_output");
  if (!empty && pointwise_as_product(g, grad_output.scalar_type(), Conv1dOp::kBackwardInput))
    return gemm_pointwise_backward_input(grad_output, weight, g);
  if (library) return library_conv1d_backward_input(grad_output, weight, g);
  if (empty) return at::empty({g.batch, g.in_channels, g.in_length}, grad_output.options());
  // Phase r of grad_input (positions r, r + stride, ...) sums the taps of the class reading input phase r: output m
  // of the phase takes tap first + t*step from grad_output[m + shift' - t*dilation'], shift' = -shift, a
  // correlation with that class's taps flipped. Phases no class reads get no gradient (zeros, written only into
  // their slabs: zeroing all of grad_input first was 14-17 % of a strided depthwise layer's time).
  const TapClasses t = tap_classes(g.kernel_size, stride, padding, dilation);
  const at::Tensor gy = grad_output.contiguous();
  at::Tensor grad_input = at::empty({g.batch, g.in_channels, g.in_length}, grad_output.options());
  // (at a stride above 1 the phases are computed into their slabs, then merged into grad_input in one pass)
  const PhaseSlabs ph{g.batch, g.in_channels, g.in_length, stride};
  const at::Tensor slabs = stride == 1 ? at::Tensor() : at::empty({grad_input.numel()}, gy.options());
  for (const TapClass& c : t.classes) {
    if (c.phase >= ph.phases()) continue;
    const at::Tensor flipped = transposed_flipped(weight.slice(2, c.first, g.kernel_size, t.step), groups);
    at::Tensor part = stride == 1 ? grad_input : ph.slab(slabs, c.phase);
    const CorrelationShape s{g.batch, g.out_channels, g.out_length, g.in_channels, c.taps, part.size(2), 1,
                             t.dilation, -c.shift - t.dilation * (c.taps - 1), groups};
    PYOPS_CPU_KERNEL_IF(g.out_channels > groups, correlate_cpu)(gy, flipped, at::Tensor(), at::Tensor(), part, s,
                                                               /*end_to_end=*/stride == 1);
  }
  if (stride == 1) return grad_input;
  for (int64_t p = 0; p < ph.phases(); ++p) {
    const bool read = std::any_of(t.classes.begin(), t.classes.end(), [&](const TapClass& c) { return c.phase == p; });
    if (!read) ph.slab(slabs, p).zero_();
  }
  merge_phases(slabs, stride, grad_input);
  return grad_input;
}

// grad_weight and, when with_bias, grad_bias (undefined otherwise), each path summing the bias in its pass over
// grad_output (oneDNN's weight gradient, the matrix product, our kernel).
std::tuple<at::Tensor, at::Tensor> backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                       int64_t kernel_size, int64_t stride, int64_t padding,
                                                       int64_t dilation, int64_t groups, bool with_bias) {
  const Conv1dGeometry g =
      check_conv1d_backward_weight(grad_output, input, kernel_size, stride, padding, dilation, groups);
  stride = g.stride;  // (a stride past the padded length, capped: checked_conv_stride)
  const auto bias_sum = [&] { return with_bias ? grad_output.sum(at::IntArrayRef{0, 2}) : at::Tensor(); };
  const bool empty = g.batch * g.out_channels * g.in_per_group() == 0;
  const WeightGradientPath path =
      empty ? WeightGradientPath::kDirect : cpu_weight_gradient_path(g, grad_output.scalar_type());
  if (computes_in_float(grad_output, path == WeightGradientPath::kLibrary)) {
    const at::Tensor grad_weight = std::get<0>(backward_weight_cpu(as_float(grad_output), as_float(input), kernel_size,
                                                                   stride, padding, dilation, groups, false));
    return {grad_weight.to(grad_output.scalar_type()), bias_sum()};
  }
  check_cpu_dtype(grad_output, "grad_output");
  if (path == WeightGradientPath::kLibrary) return library_conv1d_backward_weight(grad_output, input, g, with_bias);
  if (path == WeightGradientPath::kGemm) {
    // The product also multiplies the columns' zeros (where a tap reads padding) by grad_output: an inf or NaN there
    // makes NaN where the sum of the existing pairs is not. Then our kernel sums only those pairs (a non-finite
    // result is the sign: checking the operands first would cost a pass over them on every call).
    auto [grad_weight, grad_bias] = gemm_conv1d_backward_weight(grad_output, input, g, with_bias);
    if (all_finite(grad_weight)) return {grad_weight, grad_bias};
  }
  at::Tensor grad_weight = at::empty({g.out_channels, g.in_per_group(), kernel_size}, input.options());
  if (grad_weight.numel() == 0) return {grad_weight, bias_sum()};
  if (path == WeightGradientPath::kDense) {
    // (as the product's: a tap reading padding multiplies zeros by grad_output; where that makes a non-finite sum,
    // the kernel below sums only the existing pairs)
    const at::Tensor gy = grad_output.contiguous();
    PYOPS_CPU_KERNEL(dense_weight_cpu)(gy, input.contiguous(), grad_weight, stride, padding, dilation, groups);
    if (all_finite(grad_weight)) return {grad_weight, with_bias ? bias_gradient_cpu(gy, g) : at::Tensor()};
  }
  at::Tensor grad_bias = with_bias ? at::empty({g.out_channels}, input.options()) : at::Tensor();
  // (the AVX-512 build only for long rows of one row per group: 1.10-1.19x the AVX2 build there, 0.92x on rows under
  // 64 outputs, and 0.84x geomean on dense layers, whose 16-lane accumulators end in longer reductions, stop 35)
  const bool one_row_per_group = g.in_channels == groups && g.out_channels == groups;
  PYOPS_CPU_KERNEL_IF(one_row_per_group && g.out_length >= 512, correlate_weight_cpu)(
      grad_output.contiguous(), input.contiguous(), grad_weight, grad_bias, stride, dilation, -padding, groups);
  return {grad_weight, grad_bias};
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
  m.impl("conv1d_bias_act", &conv1d_bias_act_cpu);
  m.impl("conv1d_backward_input", &conv1d_backward_input_cpu);
  m.impl("conv1d_backward_weight", &conv1d_backward_weight_cpu);
  m.impl("conv1d_backward_weight_bias", &conv1d_backward_weight_bias_cpu);
}

}  // namespace pyops
