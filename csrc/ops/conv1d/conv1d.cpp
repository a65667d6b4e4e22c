// Schemas of conv1d and its backward ops, and the argument checks every backend shares.
#include "ops/conv1d/conv1d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/autocast.h"
#include "common/checks.h"

namespace pyops {
namespace {

void check_hyper(int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  TORCH_CHECK_VALUE(stride >= 1, "pyops.conv1d: argument 'stride' must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0, "pyops.conv1d: argument 'padding' must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(dilation >= 1, "pyops.conv1d: argument 'dilation' must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(groups >= 1, "pyops.conv1d: argument 'groups' must be >= 1, got ", groups);
}

void check_channels(int64_t in_channels, int64_t out_channels, int64_t weight_in_per_group, int64_t groups,
                    const char* in_name) {
  // No input channels: F.conv1d returns an empty (N, 0, L_out) tensor, not the bias; refused by name, as
  // pyops.conv2d does (our kernels gave three different answers).
  TORCH_CHECK_VALUE(in_channels > 0, "pyops.conv1d: argument '", in_name, "' has 0 channels: a convolution needs "
                    "at least one input channel");
  TORCH_CHECK_VALUE(in_channels % groups == 0, "pyops.conv1d: ", in_name, " channels (", in_channels,
                    ") must be divisible by 'groups' (", groups, ")");
  TORCH_CHECK_VALUE(out_channels % groups == 0, "pyops.conv1d: output channels (", out_channels,
                    ") must be divisible by 'groups' (", groups, ")");
  TORCH_CHECK_VALUE(in_channels / groups == weight_in_per_group, "pyops.conv1d: channel mismatch: '", in_name,
                    "' has ", in_channels, " channels, so 'weight' must have ", in_channels / groups,
                    " input channels per group (groups=", groups, "), got ", weight_in_per_group);
}

// The geometry of a layer with these sizes, its output length computed; the stride is the one to compute with
// (checked_conv_stride: one past the padded length gives the same single output position).
Conv1dGeometry geometry(int64_t batch, int64_t in_channels, int64_t in_length, int64_t out_channels,
                        int64_t kernel_size, int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  stride = checked_conv_stride(in_length, kernel_size, stride, padding, dilation, "pyops.conv1d");
  const int64_t span = dilation * (kernel_size - 1) + 1;
  TORCH_CHECK_VALUE(in_length + 2 * padding >= span, "pyops.conv1d: input length ", in_length, " (padded: ",
                    in_length + 2 * padding, ") is shorter than the dilated filter span ", span,
                    " (kernel_size=", kernel_size, ", dilation=", dilation, ")");
  const int64_t l_out = (in_length + 2 * padding - span) / stride + 1;
  return {batch, in_channels, in_length, out_channels, kernel_size, l_out, stride, padding, dilation, groups};
}

void check_tensor3(const at::Tensor& t, const char* name, const char* layout) {
  check_floating(t, name);
  TORCH_CHECK_VALUE(t.dim() == 3, "pyops.conv1d: argument '", name, "' must be 3-D ", layout, ", got shape ",
                    t.sizes());
}

// t itself, or a copy with the standard strides where t's differ. oneDNN (torch 2.14) crashes on a 3-D tensor of
// length 1 whose length stride is not 1, e.g. (2, 32, 1) with strides (32, 1, 32) from a transpose: PyTorch calls
// such a tensor contiguous (a size-1 dimension's stride is irrelevant), so contiguous() returns it unchanged.
at::Tensor standard_strides(const at::Tensor& t) {
  int64_t expected = 1;
  bool standard = true;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    standard = standard && t.stride(d) == expected;
    expected *= t.size(d);
  }
  return standard ? t : t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

Conv1dPath conv1d_path() {
  const char* env = std::getenv("PYOPS_CONV1D_PATH");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return Conv1dPath::kAuto;
  if (std::strcmp(env, "direct") == 0) return Conv1dPath::kDirect;
  if (std::strcmp(env, "library") == 0) return Conv1dPath::kLibrary;
  TORCH_CHECK_VALUE(std::strcmp(env, "gemm") == 0,
                    "pyops.conv1d: environment variable PYOPS_CONV1D_PATH must be auto, direct, library or gemm, got '",
                    env, "'");
  return Conv1dPath::kGemm;
}

bool conv1d_use_library(const Conv1dGeometry& g, bool cuda) {
  const Conv1dPath path = conv1d_path();
  if (path != Conv1dPath::kAuto) return path != Conv1dPath::kDirect;
  // CPU, 2026-11-27, N=4 C=128->128 L=1024 k=3: our forward 6.9 ms vs oneDNN 3.8 ms, fwd+bwd 21.0 vs 14.4 ms;
  // 2026-12-06, grouped: 128->128 in 2 groups (64 per group) ours 0.61-0.65x, its weight gradient at stride 2 11x
  // slower. H200, 2026-11-27: wav2vec2 conv1 (512->512, k=3, s=2) ours 12.8 ms vs cuDNN 0.66 ms forward; conv0
  // (1->512, k=10, s=5) 0.31 vs 0.12 ms. Our kernels win on depthwise and single-channel layers on both. (CUDA's
  // grouped layers are not measured: they stay ours.)
  if (cuda) return g.groups == 1 && (g.in_channels >= 32 || g.out_channels >= 32);
  // Also long reductions into few outputs (stop 27, a fuzzing helper; oneDNN / direct forward time, 1 thread,
  // batch 1 and 8): 512→16 0.05-0.08 at stride 3-4 with dilation (its window outgrows the staging budget: the
  // bounds-checked loop), 0.3-0.7 at stride 1-2; 256→16 0.07-0.79; 128→16 0.75-0.94; but 128→8 1.35-1.51, 64→16
  // 0.75-1.23, 16→128 0.95-1.9: the direct kernel keeps many outputs of short reductions.
  const int64_t in = g.in_per_group(), out = g.out_per_group();
  return (in >= 32 && out >= 32) || (in >= 128 && out >= 16) || in >= 256;
}

at::Tensor library_conv1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          const Conv1dGeometry& g) {
  return at::convolution(standard_strides(input), standard_strides(weight), bias, {g.stride}, {g.padding},
                         {g.dilation}, false, {0}, g.groups);
}

at::Tensor library_conv1d_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                         const Conv1dGeometry& g) {
  // output_padding makes the transposed convolution's length round-trip to the input's
  const int64_t natural = (grad_output.size(2) - 1) * g.stride - 2 * g.padding + g.dilation * (g.kernel_size - 1) + 1;
  return at::conv_transpose1d(standard_strides(grad_output), standard_strides(weight), {}, {g.stride}, {g.padding},
                              {g.in_length - natural}, g.groups, {g.dilation});
}

std::tuple<at::Tensor, at::Tensor> library_conv1d_backward_weight(const at::Tensor& grad_output,
                                                                  const at::Tensor& input, const Conv1dGeometry& g,
                                                                  bool with_bias) {
  const at::Tensor weight_shape = at::empty({g.out_channels, g.in_per_group(), g.kernel_size}, input.options());
  const auto grads =
      at::convolution_backward(standard_strides(grad_output), standard_strides(input), weight_shape,
                               at::IntArrayRef{g.out_channels}, {g.stride},
                               {g.padding}, {g.dilation}, false, {0}, g.groups, {false, true, with_bias});
  return {std::get<1>(grads), std::get<2>(grads)};
}

Conv1dGeometry check_conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  check_tensor3(input, "input", "(N, C_in, L_in)");
  check_tensor3(weight, "weight", "(C_out, C_in / groups, K)");
  check_same_dtype(weight, input, "weight", "input");
  check_same_device(weight, input, "weight", "input");
  check_hyper(stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(weight.size(2) >= 1, "pyops.conv1d: argument 'weight' has kernel size 0");
  check_channels(input.size(1), weight.size(0), weight.size(1), groups, "input");
  if (bias.has_value() && bias->defined()) {
    check_floating(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "pyops.conv1d: argument 'bias' must have shape (",
                      weight.size(0), ",) (one per output channel), got ", bias->sizes());
    check_same_dtype(*bias, input, "bias", "input");
    check_same_device(*bias, input, "bias", "input");
  }
  // F.conv1d refuses an empty length too; our kernels could pad it, but their backward has nothing to return to
  TORCH_CHECK_VALUE(input.size(2) >= 1, "pyops.conv1d: argument 'input' has length 0 (shape ", input.sizes(), ")");
  return geometry(input.size(0), input.size(1), input.size(2), weight.size(0), weight.size(2), stride, padding,
                  dilation, groups);
}

Conv1dGeometry check_conv1d_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                           int64_t input_length, int64_t stride, int64_t padding, int64_t dilation,
                                           int64_t groups) {
  check_tensor3(grad_output, "grad_output", "(N, C_out, L_out)");
  check_tensor3(weight, "weight", "(C_out, C_in / groups, K)");
  check_same_dtype(weight, grad_output, "weight", "grad_output");
  check_same_device(weight, grad_output, "weight", "grad_output");
  check_hyper(stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(weight.size(2) >= 1, "pyops.conv1d: argument 'weight' has kernel size 0");
  TORCH_CHECK_VALUE(input_length >= 1, "pyops.conv1d_backward_input: argument 'input_length' must be >= 1, got ",
                    input_length);
  TORCH_CHECK_VALUE(grad_output.size(1) == weight.size(0), "pyops.conv1d_backward_input: channel mismatch: 'grad_output' has ",
                    grad_output.size(1), " channels but 'weight' has ", weight.size(0), " output channels");
  check_channels(weight.size(1) * groups, weight.size(0), weight.size(1), groups, "grad_input");
  const Conv1dGeometry g = geometry(grad_output.size(0), weight.size(1) * groups, input_length, weight.size(0),
                                    weight.size(2), stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_output.size(2) == g.out_length, "pyops.conv1d_backward_input: 'grad_output' has length ",
                    grad_output.size(2), " but 'input_length'=", input_length, " gives an output length of ",
                    g.out_length);
  return g;
}

Conv1dGeometry check_conv1d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                            int64_t kernel_size, int64_t stride, int64_t padding, int64_t dilation,
                                            int64_t groups) {
  check_tensor3(grad_output, "grad_output", "(N, C_out, L_out)");
  check_tensor3(input, "input", "(N, C_in, L_in)");
  check_same_dtype(input, grad_output, "input", "grad_output");
  check_same_device(input, grad_output, "input", "grad_output");
  check_hyper(stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(kernel_size >= 1, "pyops.conv1d_backward_weight: argument 'kernel_size' must be >= 1, got ",
                    kernel_size);
  TORCH_CHECK_VALUE(grad_output.size(0) == input.size(0), "pyops.conv1d_backward_weight: 'grad_output' has batch ",
                    grad_output.size(0), " but 'input' has batch ", input.size(0));
  TORCH_CHECK_VALUE(input.size(1) % groups == 0, "pyops.conv1d: input channels (", input.size(1),
                    ") must be divisible by 'groups' (", groups, ")");
  check_channels(input.size(1), grad_output.size(1), input.size(1) / groups, groups, "input");
  const Conv1dGeometry g = geometry(input.size(0), input.size(1), input.size(2), grad_output.size(1), kernel_size,
                                    stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_output.size(2) == g.out_length, "pyops.conv1d_backward_weight: 'grad_output' has length ",
                    grad_output.size(2), " but 'input' (length ", input.size(2), ") gives an output length of ",
                    g.out_length);
  return g;
}

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("conv1d(Tensor input, Tensor weight, Tensor? bias, int stride, int padding, int dilation, int groups) -> Tensor");
  m.def("conv1d_backward_input(Tensor grad_output, Tensor weight, SymInt input_length, int stride, int padding, "
        "int dilation, int groups) -> Tensor");
  m.def("conv1d_backward_weight(Tensor grad_output, Tensor input, SymInt kernel_size, int stride, int padding, "
        "int dilation, int groups) -> Tensor");
  // (grad_weight, grad_bias = grad_output summed over batch and length): what autograd asks for when a layer has a
  // bias, from one read of grad_output where a kernel fuses the two (CUDA depthwise), else one after the other.
  m.def("conv1d_backward_weight_bias(Tensor grad_output, Tensor input, SymInt kernel_size, int stride, int padding, "
        "int dilation, int groups) -> (Tensor, Tensor)");
}

// In autocast regions: one dtype for input, weight and bias (csrc/common/autocast.h). The backward ops need none:
// they get the dtypes of the forward's (cast) tensors.
TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) { m.impl("conv1d", autocast_kernel<c10::DeviceType::CPU>()); }
TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) { m.impl("conv1d", autocast_kernel<c10::DeviceType::CUDA>()); }

}  // namespace pyops
