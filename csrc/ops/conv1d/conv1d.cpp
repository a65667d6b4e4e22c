// Schemas of conv1d and its backward ops, and the argument checks every backend shares.
#include "ops/conv1d/conv1d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/autocast.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/onednn.h"

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

bool aten_takes_im2col(const Conv1dGeometry& g) {
  return g.batch == 1 && g.groups == 1 && double(g.in_channels) * g.in_length <= 20480;
}

bool conv1d_use_library(const Conv1dGeometry& g, Conv1dOp op, bool cuda) {
  const Conv1dPath path = conv1d_path();
  if (path != Conv1dPath::kAuto) return path != Conv1dPath::kDirect;
  // CUDA: H200, 2026-11-27: wav2vec2 conv1 (512->512, k=3, s=2) ours 12.8 ms vs cuDNN 0.66 ms forward; conv0
  // (1->512, k=10, s=5) 0.31 vs 0.12 ms; ours wins on depthwise and single-channel layers. (Grouped layers are not
  // measured: they stay ours.)
  if (cuda) return g.groups == 1 && (g.in_channels >= 32 || g.out_channels >= 32);
  // CPU: each op is a product of M output channels by a reduction over K = channels x taps (per group) at each of
  // P positions (N * L_out), which ATen's kernels run as a matrix product. Where that is oneDNN's convolution, it
  // wins once the product is wide on both sides (M >= 16, K >= 128) and large enough (>= 1M multiply-adds) to pay
  // its fixed cost (~50 us a call on this VM); our direct kernels take the rest (depthwise, single-channel and
  // small-channel layers, few outputs, short reductions). The same test for each op on its own M and K: the input
  // gradient reduces over the layer's output channels, so a long reduction into few outputs forward (256->2) is
  // many outputs of a short one backward, where ours is 2-7x faster, and the other way round. The weight gradient
  // reduces over the positions instead: with few of them (<= 128) our kernel cannot fill its vectors, and the
  // library is faster from M * K >= 2048. Where ATen takes its im2col GEMM instead (aten_takes_im2col: little fixed
  // cost), the backward ops go to it much sooner: the input gradient from K >= 32 (wav2vec2's 1->512 k10 stride 5:
  // 0.25 vs 1.1 ms), the weight gradient from M >= 16, K >= 16, or from M * K >= 4096 undilated (the same layer:
  // 0.42 vs 0.97 ms; dilated, ATen's kernel is slower) -- at stride 1 where MKL runs as wide as oneDNN; elsewhere
  // from wide products or few positions (below, stop 34); our forward stays ahead to K = 128 as elsewhere.
  // Stop 29 sweeps of 910 random layers (batch 1-8, stride 1-5, 1 and 2 threads) and 150 grouped ones (2-8
  // groups of 4-128 channels), bench/NOTES-conv1d.md. The weight gradient's choice is refined by
  // cpu_weight_gradient_path, which may give either side's layers to a third path (a matrix product).
  const int64_t in = g.in_per_group(), out = g.out_per_group();
  const bool input_gradient = op == Conv1dOp::kBackwardInput;
  const double outputs = input_gradient ? in : out, reduction = double(input_gradient ? out : in) * g.kernel_size;
  if (aten_takes_im2col(g)) {
    switch (op) {
      case Conv1dOp::kForward: return outputs >= 16 && reduction >= 128;
      case Conv1dOp::kBackwardInput: return reduction >= 32;
      case Conv1dOp::kBackwardWeight: {
        // Since stop 34 our kernel reads grad_output once at any stride (it had re-read it per phase of the input),
        // and ATen's GEMM is MKL's, AVX2 code on AMD AVX-512 CPUs: at a stride above 1, and at stride 1 where MKL
        // runs narrower than oneDNN, ATen's only for wide products or few positions (400 single images on a Zen 5:
        // 1.01 geomean over the faster path, worst 1.6x; the rule before 1.11, worst 2.6x; wav2vec2's conv0, 1->512
        // k10 stride 5 on 16000 samples: ours 0.23 ms, ATen's 0.49). Undilated only: ATen's dilated kernel is slower.
        if (g.stride > 1 || !blas_runs_full_width()) {
          return g.dilation == 1 && ((outputs >= 64 && reduction >= 64) ||
                                     (g.out_length <= 128 && outputs * reduction >= 2048));
        }
        return (outputs >= 16 && reduction >= 16) || (outputs * reduction >= 4096 && g.dilation == 1);
      }
    }
  }
  const double positions = double(g.batch) * g.out_length;  // (the call's multiply-adds: every group's)
  // Where our kernels run their AVX-512 build (stop 35), ours stays ahead on reductions up to 512 forward and back,
  // but for pointwise filters (256->256 k1 on 8 x 400: 1.27 vs 0.96 ms) and beyond the 1-4 groups swept (8 groups
  // of 128->64 k5 on 2 positions, input gradient 0.88 vs 0.19 ms): stop 37, 200 random layers on the Zen 5 VM (1-4
  // groups, 4-512 channels, k 1-9, strides 1-3, 1M-300M multiply-adds), the choice's time over the faster path:
  // forward 1.03 geomean, input gradient 1.04 (from 128: 1.11 and 1.10; the dense TCN's forward 0.88 vs oneDNN's
  // 0.92 ms, its input gradient 0.91 vs 0.92).
  const bool avx512 = op != Conv1dOp::kBackwardWeight && cpu_avx512_selected() && g.kernel_size > 1 && g.groups <= 4;
  const double wide = avx512 ? 512 : 128;
  if (outputs >= 16 && reduction >= wide && outputs * reduction * positions * g.groups >= 1e6) return true;
  return op == Conv1dOp::kBackwardWeight && outputs * reduction >= 2048 && positions <= 128;
}

at::Tensor library_conv1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          const Conv1dGeometry& g) {
  return at::convolution(standard_strides(input), standard_strides(weight), bias, {g.stride}, {g.padding},
                         {g.dilation}, false, {0}, g.groups);
}

void add_residual_activate(at::Tensor& out, const at::Tensor& residual, Activation act) {
  const bool vectorized = out.device().is_cpu() && out.is_contiguous() &&
                          (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble);
  if (vectorized) return add_bias_residual_activate_cpu(out, at::Tensor(), residual.defined() ? residual.contiguous()
                                                                                               : residual, act);
  if (residual.defined()) out.add_(residual);
  activation_aten(out, act, /*in_place=*/true);
}

// F.conv1d's own input gradient: convolution_backward with only the input output, which reads the input's shape
// and nothing of its values (an uninitialized tensor stands in). conv_transpose1d computes the same sums but ATen
// picks its kernel for a transposed convolution: 1.0x where both reach oneDNN, 2.5x slower where F.conv1d's
// backward takes the im2col GEMM (one small image, 24->384 k5 stride 2: 0.208 vs 0.082 ms), 10x slower on
// wav2vec2's 1->512 k10 stride 5 (2.46 vs 0.25 ms; stop 29, bench/NOTES-conv1d.md).
at::Tensor library_conv1d_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                         const Conv1dGeometry& g) {
  const at::Tensor input_shape = at::empty({g.batch, g.in_channels, g.in_length}, grad_output.options());
  return std::get<0>(at::convolution_backward(standard_strides(grad_output), input_shape, standard_strides(weight),
                                              std::nullopt, {g.stride}, {g.padding}, {g.dilation}, false, {0},
                                              g.groups, {true, false, false}));
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

void check_conv1d_residual(const std::optional<at::Tensor>& residual, const at::Tensor& input,
                           const Conv1dGeometry& g) {
  if (!residual.has_value() || !residual->defined()) return;
  check_floating(*residual, "residual");
  check_same_dtype(*residual, input, "residual", "input");
  check_same_device(*residual, input, "residual", "input");
  TORCH_CHECK_VALUE(residual->dim() == 3 && residual->size(0) == g.batch && residual->size(1) == g.out_channels &&
                        residual->size(2) == g.out_length,
                    "pyops.conv1d_bias_act: argument 'residual' must have the output's shape (", g.batch, ", ",
                    g.out_channels, ", ", g.out_length, "), got ", residual->sizes());
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
  // act(conv1d(input, weight, bias) + residual), the activation (0 none, 1 relu, 2 relu6, 3 silu, 4 hardswish,
  // 5 hardsigmoid, 6 sigmoid: common/activation.h) applied as the output is stored: the Conv1d → BatchNorm1d (→ add)
  // → activation chains pyops.fuse folds.
  m.def("conv1d_bias_act(Tensor input, Tensor weight, Tensor? bias, int stride, int padding, int dilation, int groups, "
        "int activation, Tensor? residual=None) -> Tensor");
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
TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) {
  for (const char* op : {"conv1d", "conv1d_bias_act"}) m.impl(op, autocast_kernel<c10::DeviceType::CPU>());
}
TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) {
  for (const char* op : {"conv1d", "conv1d_bias_act"}) m.impl(op, autocast_kernel<c10::DeviceType::CUDA>());
}

}  // namespace pyops
