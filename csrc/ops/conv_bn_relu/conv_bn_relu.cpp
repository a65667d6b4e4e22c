// Schemas of the fused convolution ops, their argument checks, and conv2d_bn_relu itself, which is the same on every
// backend: fold BN into (w, b) with the conv_bn_fold kernel, then run conv2d_bias_act (one mechanism, not two).
#include "ops/conv_bn_relu/conv_bn_relu.h"

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "common/autocast.h"
#include "common/checks.h"
#include "common/dispatch.h"

namespace pyops {

namespace {

void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, "pyops.conv2d: argument '", name, "' must have 2 elements, got ", v);
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, "pyops.conv2d: argument '", name, "' must be >= ",
                    min_value, ", got ", v);
}

void check_vector(const at::Tensor& t, int64_t len, const char* name, const at::Tensor& ref) {
  check_floating(t, name);
  check_same_device(t, ref, name, "weight");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, "pyops.conv2d: argument '", name,
                    "' must have shape (", len, ",) (one value per output channel), got ", t.sizes());
}

}  // namespace

ConvGeometry check_conv2d_bias_act_args(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        int64_t activation, const std::optional<at::Tensor>& residual) {
  check_floating(input, "input");
  check_dim(input, 4, "input");
  check_dim(weight, 4, "weight");
  check_same_dtype(weight, input, "weight", "input");
  check_same_device(weight, input, "weight", "input");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1, "pyops.conv2d: argument 'groups' must be >= 1, got ", groups);
  checked_activation(activation, "pyops.conv2d");
  ConvGeometry g{};
  g.n = input.size(0), g.cin = input.size(1), g.h = input.size(2), g.w = input.size(3);
  g.cout = weight.size(0), g.kh = weight.size(2), g.kw = weight.size(3);
  TORCH_CHECK_VALUE(g.cin % groups == 0 && g.cout % groups == 0, "pyops.conv2d: argument 'groups' = ", groups,
                    " must divide the input channels (", g.cin, ") and the output channels (", g.cout, ")");
  TORCH_CHECK_VALUE(weight.size(1) * groups == g.cin, "pyops.conv2d: argument 'weight' of shape ", weight.sizes(),
                    " expects ", weight.size(1) * groups, " input channels (groups=", groups, "), but 'input' has ",
                    g.cin, " channels");
  // No input channels: no terms to sum (F.conv2d returns an empty tensor there, not the bias); our kernels divide
  // by the reduction length, so refuse it by name rather than crash.
  TORCH_CHECK_VALUE(g.cin > 0, "pyops.conv2d: argument 'input' has 0 channels (shape ", input.sizes(),
                    "): a convolution over no input channels is not supported");
  TORCH_CHECK_VALUE(g.kh > 0 && g.kw > 0, "pyops.conv2d: argument 'weight' has an empty kernel: ", weight.sizes());
  // An empty image in a non-empty batch: F.conv2d refuses it too ("Only zero batch or zero channel inputs are
  // supported"); padded, our kernels returned the bias alone. An empty batch gives its empty output, as there.
  TORCH_CHECK_VALUE(g.n == 0 || (g.h > 0 && g.w > 0), "pyops.conv2d: argument 'input' has an empty spatial size "
                    "(shape ", input.sizes(), ")");
  for (int i = 0; i < 2; ++i) {
    const int64_t size = i == 0 ? g.h : g.w, k = i == 0 ? g.kh : g.kw;
    // A one-tap kernel dimension has no dilation (dilation·(k − 1) = 0): canonical 1, which the kernels compute
    // alike, and without which oneDNN crashed (1×1 kernel, dilation 2×3, padding 2×3, channels_last 31×1 input).
    g.stride[i] = checked_conv_stride(size, k, stride[i], padding[i], dilation[i], "pyops.conv2d");
    g.padding[i] = padding[i], g.dilation[i] = k == 1 ? 1 : dilation[i];
  }
  const int64_t span_h = g.dilation[0] * (g.kh - 1) + 1, span_w = g.dilation[1] * (g.kw - 1) + 1;
  TORCH_CHECK_VALUE(g.h + 2 * g.padding[0] >= span_h && g.w + 2 * g.padding[1] >= span_w,
                    "pyops.conv2d: argument 'input' of spatial size (", g.h, ", ", g.w, ") plus padding ", padding,
                    " is smaller than the dilated kernel (", span_h, ", ", span_w, ")");
  g.oh = (g.h + 2 * g.padding[0] - span_h) / g.stride[0] + 1;
  g.ow = (g.w + 2 * g.padding[1] - span_w) / g.stride[1] + 1;
  // A padding within int64 can still ask for more outputs than int64 counts (2^40 on each side: oneDNN then failed
  // with "could not construct a memory descriptor", naming nothing of ours)
  int64_t count = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(g.oh, g.ow, &count) && !c10::mul_overflows(count, g.cout, &count) &&
                        !c10::mul_overflows(count, std::max<int64_t>(g.n, 1), &count),
                    "pyops.conv2d: argument 'padding' = ", padding, " gives an output of (", g.n, ", ", g.cout, ", ",
                    g.oh, ", ", g.ow, ") values, more than int64 counts");
  g.groups = groups;
  g.act = static_cast<Activation>(activation);
  if (bias.has_value()) {
    check_vector(*bias, g.cout, "bias", weight);
    check_same_dtype(*bias, input, "bias", "input");
  }
  if (residual.has_value()) {
    check_same_dtype(*residual, input, "residual", "input");
    check_same_device(*residual, input, "residual", "input");
    const std::array<int64_t, 4> out_shape{g.n, g.cout, g.oh, g.ow};
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(out_shape), "pyops.conv2d: argument 'residual' must have ",
                      "the output's shape ", at::IntArrayRef(out_shape), ", got ", residual->sizes());
  }
  return g;
}

void check_bn_args(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                   const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  check_floating(weight, "weight");
  check_dim(weight, 4, "weight");
  const int64_t c = weight.size(0);
  if (bias.has_value()) check_vector(*bias, c, "bias", weight);
  check_vector(running_mean, c, "running_mean", weight);
  check_vector(running_var, c, "running_var", weight);
  if (bn_weight.has_value()) check_vector(*bn_weight, c, "bn_weight", weight);
  if (bn_bias.has_value()) check_vector(*bn_bias, c, "bn_bias", weight);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "pyops.conv2d_bn_relu: argument 'eps' must be finite and >= 0, got ",
                    eps);
}

Activation check_conv_act_backward_args(const at::Tensor& grad, const at::Tensor& output,
                                        const std::optional<at::Tensor>& scale, int64_t activation) {
  check_floating(output, "output");
  check_dim(output, 4, "output");
  check_same_dtype(grad, output, "grad", "output");
  check_same_device(grad, output, "grad", "output");
  TORCH_CHECK_VALUE(grad.sizes() == output.sizes(), "pyops.conv_act_backward: argument 'grad' has shape ",
                    grad.sizes(), " but 'output' has ", output.sizes());
  const Activation act = checked_activation(activation, "pyops.conv_act_backward");
  TORCH_CHECK_VALUE(identity_or_clamp(act), "pyops.conv_act_backward: argument 'activation' = ", activation,
                    ": it differentiates the identity and the clamps (0 none, 1 relu, 2 relu6) only; ATen's ",
                    "autograd differentiates the other activations");
  if (scale.has_value()) {
    check_floating(*scale, "scale");
    check_same_device(*scale, output, "scale", "output");
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == output.size(1), "pyops.conv_act_backward: argument ",
                      "'scale' must have shape (", output.size(1), ",), got ", scale->sizes());
  }
  return act;
}

std::tuple<at::Tensor, at::Tensor> conv_act_backward_outputs(const at::Tensor& output, bool has_scale,
                                                             bool unscaled_too) {
  const auto options = output.options().memory_format(output_memory_format(output));
  return {at::empty(output.sizes(), options),
          has_scale && unscaled_too ? at::empty(output.sizes(), options) : at::empty({0}, output.options())};
}

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                        : at::MemoryFormat::Contiguous;
}

ConvPath requested_conv_path() {
  const char* env = std::getenv("PYOPS_CONV_PATH");
  const std::string v = env ? env : "auto";
  if (v == "auto" || v.empty()) return ConvPath::kAuto;
  if (v == "direct" || v == "ours") return ConvPath::kDirect;
  if (v == "library" || v == "cudnn") return ConvPath::kLibrary;
  TORCH_CHECK_VALUE(false, "pyops: environment variable PYOPS_CONV_PATH must be one of auto, direct, library (CPU), ",
                    "ours, cudnn (CUDA); got '", v, "'");
}

namespace {

at::Tensor conv2d_bn_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                          const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          bool relu, const std::optional<at::Tensor>& residual) {
  check_bn_args(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
  const int64_t act = relu ? static_cast<int64_t>(Activation::kRelu) : static_cast<int64_t>(Activation::kNone);
  check_conv2d_bias_act_args(input, weight, bias, stride, padding, dilation, groups, act, residual);
  using OptTensor = std::optional<at::Tensor>;
  static const auto fold = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
      double)>("pyops::conv_bn_fold");
  static const auto bias_act =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, int64_t, int64_t, const OptTensor&)>("pyops::conv2d_bias_act");
  auto [w, b, scale] = fold.call(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
  return bias_act.call(input, w, b, stride, padding, dilation, groups, act, residual);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def(
      "conv2d_bn_relu(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor running_mean, Tensor running_var, float eps, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool relu, Tensor? residual=None) -> Tensor");
  m.def(
      "conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int activation, Tensor? residual) -> Tensor");
  // CPU inference with a weight packed once into oneDNN's blocked layout for inputs shaped like `input` (an opaque
  // MKLDNN tensor; not for autograd or torch.compile): conv2d_bias_act_packed takes it next to the dense weight, with
  // the stride, padding, dilation and groups it was packed for (the packing's layout cannot be checked beyond its
  // shape: ConvBNReLU2d keys its packing on them).
  m.def(
      "conv2d_pack_weight(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups) "
      "-> Tensor");
  m.def(
      "conv2d_bias_act_packed(Tensor input, Tensor weight, Tensor packed_weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int activation, Tensor? residual) -> Tensor");
  // (w·scale, (b − μ)·scale + β, scale) with scale = γ/√(σ²+ε), computed in float64, returned in weight's dtype
  // (scale in the accumulation dtype: float64 for float64 weights, float32 otherwise).
  m.def(
      "conv_bn_fold(Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor, Tensor)");
  // The backward's one pass over grad_output: (grad·act'(output)·scale[c], grad·act'(output) or an empty tensor).
  // The second output is computed only when scale is given and `unscaled_too` (the residual's / BN's gradient);
  // without scale the first output already is it.
  m.def(
      "conv_act_backward(Tensor grad, Tensor output, Tensor? scale, int activation, bool unscaled_too) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyops, CPU, m) { m.impl("conv2d_bn_relu", &conv2d_bn_relu); }
TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("conv2d_bn_relu", &conv2d_bn_relu); }

// In autocast regions: one dtype for input, weight, bias and residual; the BN statistics keep theirs
// (csrc/common/autocast.h). The packed op is CPU-only (its packed weight is float32, as the CPU policy casts to).
TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) {
  for (const char* op : {"conv2d_bn_relu", "conv2d_bias_act", "conv2d_bias_act_packed"})
    m.impl(op, autocast_kernel<c10::DeviceType::CPU>());
}
TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) {
  for (const char* op : {"conv2d_bn_relu", "conv2d_bias_act"}) m.impl(op, autocast_kernel<c10::DeviceType::CUDA>());
}

}  // namespace pyops
