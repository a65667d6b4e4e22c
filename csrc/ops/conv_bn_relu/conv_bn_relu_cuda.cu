// CUDA kernels of the fused convolution ops: the BN fold, conv2d_bias_act's path choice (cuDNN, with runtime fusion
// where it applies, or our implicit GEMM), and the backward's single pass over grad_output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "ops/conv_bn_relu/conv_bn_relu.h"
#include "ops/conv_bn_relu/conv_igemm_cuda.cuh"

namespace pyops {

namespace {

constexpr int kBlock = 256;

int64_t grid_for(int64_t n) { return std::min<int64_t>(ceil_div(n, kBlock), 32LL * sm_count() * 8); }

// ---- BN fold: w' = w·scale[c], b' = (b − μ)·scale + β, scale = γ/√(σ²+ε), all in float64 ----

// The per-channel vectors are read in their own dtype (stat_t, shared by all of them in the usual case), so the
// functional op costs one launch; vectors of another dtype are converted to stat_t first.
template <typename scalar_t, typename stat_t>
__global__ void fold_kernel(const scalar_t* __restrict__ w, const stat_t* __restrict__ bias,
                            const stat_t* __restrict__ gamma, const stat_t* __restrict__ beta,
                            const stat_t* __restrict__ mean, const stat_t* __restrict__ var, double eps, int64_t c,
                            int64_t per_channel, scalar_t* __restrict__ w_out, scalar_t* __restrict__ b_out,
                            cuda_acc_t<scalar_t>* __restrict__ scale_out) {
  const int64_t total = c * per_channel;
  auto at = [](const stat_t* v, int64_t i, double fallback) { return v ? static_cast<double>(v[i]) : fallback; };
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total + c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = i < total ? i / per_channel : i - total;
    const double s = at(gamma, ch, 1.0) / sqrt(static_cast<double>(var[ch]) + eps);
    if (i < total) {
      w_out[i] = static_cast<scalar_t>(static_cast<double>(w[i]) * s);
    } else {  // the last c threads write the per-channel outputs
      scale_out[ch] = static_cast<cuda_acc_t<scalar_t>>(s);
      b_out[ch] = static_cast<scalar_t>((at(bias, ch, 0.0) - static_cast<double>(mean[ch])) * s + at(beta, ch, 0.0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_fold_cuda(
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
    double eps) {
  check_bn_args(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
  c10::cuda::CUDAGuard guard(weight.device());
  const int64_t c = weight.size(0), per = c > 0 ? weight.numel() / c : 0;
  const auto acc_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w_out = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor b_out = at::empty({c}, weight.options());
  at::Tensor scale_out = at::empty({c}, weight.options().dtype(acc_dtype));
  if (c == 0) return {w_out, b_out, scale_out};
  const auto stat_dtype = running_var.scalar_type();
  auto as_stat = [&](const at::Tensor& t) { return t.to(stat_dtype).contiguous(); };  // no-ops in the usual case
  auto opt = [&](const std::optional<at::Tensor>& t) { return t.has_value() ? as_stat(*t) : at::Tensor(); };
  const at::Tensor bs = opt(bias), gs = opt(bn_weight), betas = opt(bn_bias), ms = as_stat(running_mean),
                   vs = as_stat(running_var);
  const at::Tensor w_in = weight.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "conv_bn_fold_cuda", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, stat_dtype, "conv_bn_fold_cuda_stats", [&] {
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
      fold_kernel<w_t, scalar_t><<<grid_for(c * per + c), kBlock, 0, stream>>>(
          w_in.const_data_ptr<w_t>(), ptr(bs), ptr(gs), ptr(betas), ptr(ms), ptr(vs), eps, c, per,
          w_out.mutable_data_ptr<w_t>(), b_out.mutable_data_ptr<w_t>(), scale_out.mutable_data_ptr<cuda_acc_t<w_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {w_out, b_out, scale_out};
}

// ---- backward: grad·act'(output)·scale[c] (and grad·act'(output)) in one pass ----

template <typename scalar_t>
__global__ void act_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ output,
                                    const cuda_acc_t<scalar_t>* __restrict__ scale, int act, int64_t total, int64_t c,
                                    int64_t hw, bool channels_last, scalar_t* __restrict__ g_scaled,
                                    scalar_t* __restrict__ g_masked) {
  using acc = cuda_acc_t<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc o = static_cast<acc>(output[i]);
    // torch.relu's rule (zero where o <= 0) and hardtanh's (zero where o <= 0 or o >= 6): a NaN output passes
    const bool pass = act == 0 || (act == 1 ? !(o <= acc(0)) : !(o <= acc(0) || o >= acc(6)));
    const acc masked = pass ? static_cast<acc>(grad[i]) : acc(0);
    const int64_t ch = channels_last ? i % c : (i / hw) % c;
    g_scaled[i] = static_cast<scalar_t>(scale ? masked * scale[ch] : masked);
    if (g_masked) g_masked[i] = static_cast<scalar_t>(masked);
  }
}

std::tuple<at::Tensor, at::Tensor> conv_act_backward_cuda(const at::Tensor& grad, const at::Tensor& output,
                                                          const std::optional<at::Tensor>& scale, int64_t activation,
                                                          bool unscaled_too) {
  check_conv_act_backward_args(grad, output, scale, activation);
  c10::cuda::CUDAGuard guard(output.device());
  const int64_t c = output.size(1), hw = output.size(2) * output.size(3);
  const auto fmt = output_memory_format(output);
  const bool has_scale = scale.has_value(), second = has_scale && unscaled_too;
  at::Tensor g_scaled, g_masked;  // (not structured bindings: the kernel lambda below captures them)
  std::tie(g_scaled, g_masked) = conv_act_backward_outputs(output, has_scale, unscaled_too);
  if (output.numel() == 0) return {g_scaled, g_masked};
  const at::Tensor gc = grad.contiguous(fmt), oc = output.contiguous(fmt);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "conv_act_backward_cuda", [&] {
    using acc = cuda_acc_t<scalar_t>;
    const at::Tensor sc = has_scale ? scale->to(c10::CppTypeToScalarType<acc>::value).contiguous() : at::Tensor();
    act_backward_kernel<scalar_t><<<grid_for(output.numel()), kBlock, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), oc.const_data_ptr<scalar_t>(), has_scale ? sc.const_data_ptr<acc>() : nullptr,
        static_cast<int>(activation), output.numel(), c, hw, fmt == at::MemoryFormat::ChannelsLast,
        g_scaled.mutable_data_ptr<scalar_t>(), second ? g_masked.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_scaled, g_masked};
}

// ---- forward ----

// The library path: cuDNN's runtime fusion (conv + bias (+ residual) + ReLU in one kernel) where it can express the
// case -- ReLU in fp32/fp16/bf16 -- else cuDNN's convolution with the bias, then the residual and the activation in
// place on its output. Both follow torch.backends.cudnn.allow_tf32 as F.conv2d does.
at::Tensor library_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& residual, const ConvGeometry& g, at::MemoryFormat fmt) {
  const std::vector<int64_t> stride(g.stride.begin(), g.stride.end()), padding(g.padding.begin(), g.padding.end()),
      dilation(g.dilation.begin(), g.dilation.end());
  const at::Tensor xc = x.contiguous(fmt), wc = w.contiguous(fmt);
  const auto dt = x.scalar_type();
  const bool fused = g.act == Activation::kRelu && (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16);
  at::Tensor out;
  if (fused) {
    out = residual.has_value() ? at::cudnn_convolution_add_relu(xc, wc, residual->contiguous(fmt), at::Scalar(1.0),
                                                                 b, stride, padding, dilation, g.groups)
                               : at::cudnn_convolution_relu(xc, wc, b, stride, padding, dilation, g.groups);
  } else {
    out = at::convolution(xc, wc, b, stride, padding, dilation, false, {0, 0}, g.groups);
    if (residual.has_value()) out.add_(*residual);
    activation_aten(out, g.act, /*in_place=*/true);
  }
  return out.is_contiguous(fmt) ? out : out.contiguous(fmt);
}

at::Tensor conv2d_bias_act_cuda(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, int64_t activation,
                                const std::optional<at::Tensor>& residual) {
  const ConvGeometry g =
      check_conv2d_bias_act_args(input, weight, bias, stride, padding, dilation, groups, activation, residual);
  c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = output_memory_format(input);
  const bool empty = g.n * g.cout * g.oh * g.ow == 0;
  // Default (auto): the library path on every shape. bench/ (H200, 2026-11-27) has cuDNN ahead of our SIMT implicit
  // GEMM everywhere: 3-6x in fp32, 5-25x in fp16/bf16 where cuDNN uses the tensor cores and ours does not.
  // PYOPS_CONV_PATH=ours forces our kernel, which also takes layers without input channels (bias only).
  if (!empty && g.cin > 0 && requested_conv_path() != ConvPath::kDirect) {
    return library_forward(input, weight, bias, residual, g, fmt);
  }
  at::Tensor out = at::empty({g.n, g.cout, g.oh, g.ow}, input.options().memory_format(fmt));
  if (empty) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? *residual : at::Tensor();
  conv_bias_act_igemm_cuda(input.contiguous(fmt), weight.contiguous(), b, r, out, g);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act_cuda);
  m.impl("conv_bn_fold", &conv_bn_fold_cuda);
  m.impl("conv_act_backward", &conv_act_backward_cuda);
}

}  // namespace pyops
