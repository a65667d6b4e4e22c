// CUDA entries of conv1d and its backward ops, and our general path (any stride, dilation, groups). Depthwise
// stride-1 layers take the fast path in conv1d_cuda_depthwise.cu; dense layers go to cuDNN (conv1d_use_library,
// which follows torch's TF32 flags as F.conv1d does). Our kernels accumulate in fp32 (fp64 for fp64), never use
// tensor cores (fp32 is exact fp32), and reduce grad_weight in two deterministic stages: per-block partials in a
// fixed order, then a fixed-order sum over the blocks.
//   forward:    one thread per output element, a loop over the group's input channels and taps
//   grad_input: one thread per input element, a loop over the output channels and the taps that reach it
//   grad_weight: block (weight element, chunk of the (batch, position) pairs), block_sum, then sum_chunks_kernel
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/conv1d/conv1d_cuda.cuh"

namespace pyops {
namespace {

inline unsigned grid_for(int64_t count) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(count, kConvThreads), 65535LL * 32)));
}

template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    forward_general_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                           T* __restrict__ y, Conv1dGeometry g) {
  using acc = cuda_acc_t<T>;
  const int64_t total = g.batch * g.out_channels * g.out_length;
  const int64_t cg = g.in_channels / g.groups, og = g.out_channels / g.groups, K = g.kernel_size;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = idx % g.out_length, o = (idx / g.out_length) % g.out_channels;
    const int64_t n = idx / (g.out_length * g.out_channels);
    const T* xr = x + (n * g.in_channels + (o / og) * cg) * g.in_length;
    const T* wr = w + o * cg * K;
    const int64_t base = l * g.stride - g.padding;
    acc s = bias ? static_cast<acc>(bias[o]) : acc(0);
    for (int64_t c = 0; c < cg; ++c) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = base + k * g.dilation;
        if (i >= 0 && i < g.in_length) s += static_cast<acc>(wr[c * K + k]) * static_cast<acc>(xr[c * g.in_length + i]);
      }
    }
    y[idx] = static_cast<T>(s);
  }
}

// grad_input[n, c, i] = sum_{o in c's group, k} w[o, c % cg, k] * gy[n, o, (i + padding - k*dilation) / stride]
// over the taps where the division is exact and lands inside [0, L_out).
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    backward_input_general_kernel(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                                  Conv1dGeometry g) {
  using acc = cuda_acc_t<T>;
  const int64_t total = g.batch * g.in_channels * g.in_length;
  const int64_t cg = g.in_channels / g.groups, og = g.out_channels / g.groups, K = g.kernel_size;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % g.in_length, c = (idx / g.in_length) % g.in_channels;
    const int64_t n = idx / (g.in_length * g.in_channels);
    const int64_t o0 = (c / cg) * og;
    acc s = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = i + g.padding - k * g.dilation;
      if (t < 0 || t % g.stride != 0 || t / g.stride >= g.out_length) continue;
      const int64_t l = t / g.stride;
      for (int64_t o = o0; o < o0 + og; ++o)
        s += static_cast<acc>(w[(o * cg + c % cg) * K + k]) * static_cast<acc>(gy[(n * g.out_channels + o) * g.out_length + l]);
    }
    gx[idx] = static_cast<T>(s);
  }
}

// grid: (weight elements, chunks). Block (widx, chunk) sums gy[n, o, l] * x[n, c, l*stride + k*dilation - padding]
// over the chunk's (n, l) pairs; consecutive threads take consecutive l (coalesced).
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    backward_weight_partial_kernel(const T* __restrict__ gy, const T* __restrict__ x, cuda_acc_t<T>* partial,
                                   Conv1dGeometry g, int64_t per_chunk) {
  using acc = cuda_acc_t<T>;
  __shared__ acc scratch[kConvThreads / kWarpSize];
  const int64_t cg = g.in_channels / g.groups, og = g.out_channels / g.groups, K = g.kernel_size;
  const int64_t widx = blockIdx.x, chunk = blockIdx.y, weights = g.out_channels * cg * K;
  const int64_t k = widx % K, o = widx / (K * cg), c = (o / og) * cg + (widx / K) % cg;
  const int64_t first = chunk * per_chunk, last = min(g.batch * g.out_length, first + per_chunk);
  acc s = 0;
  for (int64_t q = first + threadIdx.x; q < last; q += kConvThreads) {
    const int64_t n = q / g.out_length, l = q % g.out_length;
    const int64_t i = l * g.stride + k * g.dilation - g.padding;
    if (i >= 0 && i < g.in_length)
      s += static_cast<acc>(gy[(n * g.out_channels + o) * g.out_length + l]) *
           static_cast<acc>(x[(n * g.in_channels + c) * g.in_length + i]);
  }
  const acc total = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[chunk * weights + widx] = total;
}

// conv1d of arguments check_conv1d accepted (g: their geometry, its stride capped): cuDNN's, the depthwise kernel's
// or the general one's.
at::Tensor convolve_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const Conv1dGeometry& g) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const bool empty = g.batch * g.out_channels * g.out_length == 0;
  if (!empty && conv1d_use_library(g, Conv1dOp::kForward, /*cuda=*/true)) {
    return library_conv1d(input, weight, b, g);
  }
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_length}, input.options());
  if (empty) return out;
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  if (depthwise_fast_path(g)) {
    depthwise_correlate_cuda(x, w, b, out, g.dilation, -g.padding, /*flip=*/false);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyops_conv1d_cuda", [&] {
    forward_general_kernel<scalar_t><<<grid_for(out.numel()), kConvThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor conv1d_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  return convolve_cuda(input, weight, bias, check_conv1d(input, weight, bias, stride, padding, dilation, groups));
}

// The residual and activation in a second pass over the output (the CUDA kernels store without them; measured on
// the CPU only, where the kernels apply them as they store). In half precision the convolution is thus rounded to
// its dtype before the residual is added, as in the unfused chain (the CPU kernels add it in float32 and round once:
// the two can differ by a unit in the last place).
at::Tensor conv1d_bias_act_cuda(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                                int64_t dilation, int64_t groups, int64_t activation,
                                const std::optional<at::Tensor>& residual) {
  const Activation act = checked_activation(activation, "pyops.conv1d_bias_act");
  const Conv1dGeometry g = check_conv1d(input, weight, bias, stride, padding, dilation, groups);
  check_conv1d_residual(residual, input, g);
  at::Tensor out = convolve_cuda(input, weight, bias, g);
  add_residual_activate(out, residual.has_value() ? *residual : at::Tensor(), act);
  return out;
}

at::Tensor conv1d_backward_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight, int64_t input_length,
                                      int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  const Conv1dGeometry g =
      check_conv1d_backward_input(grad_output, weight, input_length, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const bool empty = g.batch * g.in_channels * g.in_length == 0;
  if (!empty && conv1d_use_library(g, Conv1dOp::kBackwardInput, /*cuda=*/true)) {
    return library_conv1d_backward_input(grad_output, weight, g);
  }
  at::Tensor grad_input = at::empty({g.batch, g.in_channels, g.in_length}, grad_output.options());
  if (empty) return grad_input;
  const at::Tensor gy = grad_output.contiguous(), w = weight.contiguous();
  if (depthwise_fast_path(g)) {
    depthwise_correlate_cuda(gy, w, at::Tensor(), grad_input, g.dilation, g.padding - g.dilation * (g.kernel_size - 1),
                             /*flip=*/true);
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "pyops_conv1d_backward_input_cuda", [&] {
    backward_input_general_kernel<scalar_t><<<grid_for(grad_input.numel()), kConvThreads, 0,
                                              at::cuda::getCurrentCUDAStream()>>>(
        gy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

// The weight gradient, and the bias gradient with it when with_bias (the two ops below share this, as on the CPU).
std::tuple<at::Tensor, at::Tensor> backward_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                        int64_t kernel_size, int64_t stride, int64_t padding,
                                                        int64_t dilation, int64_t groups, bool with_bias) {
  const Conv1dGeometry g =
      check_conv1d_backward_weight(grad_output, input, kernel_size, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto bias_sum = [&] { return with_bias ? grad_output.sum(at::IntArrayRef{0, 2}) : at::Tensor(); };
  const bool empty = g.batch * g.out_channels * g.in_per_group() == 0;
  if (!empty && conv1d_use_library(g, Conv1dOp::kBackwardWeight, /*cuda=*/true)) {
    return library_conv1d_backward_weight(grad_output, input, g, with_bias);
  }
  at::Tensor grad_weight = at::empty({g.out_channels, g.in_per_group(), kernel_size}, input.options());
  if (grad_weight.numel() == 0) return {grad_weight, bias_sum()};
  if (g.batch == 0) return {grad_weight.zero_(), bias_sum()};
  const at::Tensor gy = grad_output.contiguous(), x = input.contiguous();
  if (depthwise_fast_path(g)) {
    // one pass over grad_output for both (a separate sum re-read it: 63 µs of a 413 µs fwd+bwd on an H200)
    at::Tensor grad_bias = with_bias ? at::empty({g.out_channels}, input.options()) : at::Tensor();
    depthwise_weight_cuda(gy, x, grad_weight, g.dilation, g.padding, with_bias ? &grad_bias : nullptr);
    return {grad_weight, grad_bias};
  }
  const int64_t weights = grad_weight.numel(), pairs = g.batch * g.out_length;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({ceil_div(pairs, kConvThreads * 8), 1024, ceil_div(8 * sm_count(), weights)}));
  const int64_t per_chunk = ceil_div(pairs, chunks);
  TORCH_CHECK(weights <= (1LL << 31) - 1, "pyops.conv1d_backward_weight: too many weight elements for the CUDA kernel");
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({chunks, weights}, input.options().dtype(acc_dtype));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyops_conv1d_backward_weight_cuda", [&] {
    using acc = cuda_acc_t<scalar_t>;
    backward_weight_partial_kernel<scalar_t><<<dim3(weights, chunks), kConvThreads, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc>(), g, per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_chunks_kernel<scalar_t><<<grid_for(weights), kConvThreads, 0, stream>>>(
        partial.const_data_ptr<acc>(), grad_weight.mutable_data_ptr<scalar_t>(), weights, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_weight, bias_sum()};
}

at::Tensor conv1d_backward_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_size,
                                       int64_t stride, int64_t padding, int64_t dilation, int64_t groups) {
  return std::get<0>(backward_weight_cuda(grad_output, input, kernel_size, stride, padding, dilation, groups, false));
}

std::tuple<at::Tensor, at::Tensor> conv1d_backward_weight_bias_cuda(const at::Tensor& grad_output,
                                                                    const at::Tensor& input, int64_t kernel_size,
                                                                    int64_t stride, int64_t padding,
                                                                    int64_t dilation, int64_t groups) {
  return backward_weight_cuda(grad_output, input, kernel_size, stride, padding, dilation, groups, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("conv1d", &conv1d_cuda);
  m.impl("conv1d_bias_act", &conv1d_bias_act_cuda);
  m.impl("conv1d_backward_input", &conv1d_backward_input_cuda);
  m.impl("conv1d_backward_weight", &conv1d_backward_weight_cuda);
  m.impl("conv1d_backward_weight_bias", &conv1d_backward_weight_bias_cuda);
}

}  // namespace pyops
