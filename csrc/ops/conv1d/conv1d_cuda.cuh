// Shared pieces of the CUDA conv1d kernels: block reductions in a fixed order (deterministic) and the depthwise
// fast path's launchers.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cuda_utils.cuh"
#include "ops/conv1d/conv1d.h"

namespace pyops {

constexpr int kConvThreads = 128;  // threads per block of every conv1d kernel

// Sum of v over the block, in a fixed order (xor-shuffle tree in each warp, then the warps in order); valid in
// thread 0. `scratch` holds kConvThreads / kWarpSize values.
template <typename acc>
__device__ __forceinline__ acc block_sum(acc v, acc* scratch) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) scratch[warp] = v;
  __syncthreads();
  acc total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kConvThreads / kWarpSize; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// out[i] = sum over chunks of partial[chunk, i], in chunk order: the second, deterministic stage of grad_weight.
template <typename T>
__global__ void sum_chunks_kernel(const cuda_acc_t<T>* __restrict__ partial, T* __restrict__ out, int64_t count,
                                  int64_t chunks) {
  using acc = cuda_acc_t<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc s = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) s += partial[ch * count + i];  // fixed order: deterministic
    out[i] = static_cast<T>(s);
  }
}

// Depthwise fast path: groups == C_in == C_out, stride 1, K <= kMaxTaps, a window that fits shared memory.
constexpr int kMaxTaps = 8;
bool depthwise_fast_path(const Conv1dGeometry& g);

// out[n, c, l] = bias[c] + sum_k w[c, flip ? K-1-k : k] * in[n, c, l + k*dilation + offset]: the forward
// (offset = -padding) and, with the filter flipped, grad_input (offset = padding - dilation*(K-1)).
void depthwise_correlate_cuda(const at::Tensor& in, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out,
                              int64_t dilation, int64_t offset, bool flip);
// grad_weight[c, 0, k] = sum_{n, l} gy[n, c, l] * x[n, c, l + k*dilation - padding], two-stage and deterministic;
// with grad_bias, also grad_bias[c] = sum_{n, l} gy[n, c, l] from the same reads.
void depthwise_weight_cuda(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight, int64_t dilation,
                           int64_t padding, at::Tensor* grad_bias);

}  // namespace pyops
