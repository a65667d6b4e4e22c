// Depthwise conv1d on CUDA, in the spirit of causal-conv1d: each block owns a tile of kTile positions of one
// (batch, channel) row, stages the input window it needs (tile + halo) in shared memory with coalesced 16-byte
// loads from a 16-byte-aligned start (so causal and other odd paddings keep vector loads), and keeps the filter taps
// in registers. Forward and grad_input are the same kernel (grad_input reads the filter flipped); grad_weight sums
// tap products per block and reduces the blocks' partials in a second pass in a fixed order (no atomics).
// Nothing is allocated beyond the returned tensors except grad_weight's partials (chunks x C x K floats).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>

#include "ops/conv1d/conv1d_cuda.cuh"

namespace pyops {
namespace {

constexpr int kOutPerThread = 8;
constexpr int kTile = kConvThreads * kOutPerThread;  // output positions per block
constexpr int64_t kMaxHalo = 4096;                    // (K-1)*dilation staged in shared memory

__device__ __forceinline__ int64_t floor_div_dev(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// sm[j] = row[start + j] for j in [0, count), zero outside [0, length). 16-byte loads of aligned chunks that lie
// inside the row; element loads at the row's ends or when the row itself is not 16-byte aligned.
template <typename T, typename acc>
__device__ __forceinline__ void load_window(const T* __restrict__ row, int64_t length, int64_t start, int count,
                                            acc* sm) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t a0 = floor_div_dev(start, VEC) * VEC;
  const int lead = static_cast<int>(start - a0);
  const int nvec = (lead + count + VEC - 1) / VEC;
  const bool aligned = reinterpret_cast<uintptr_t>(row) % 16 == 0;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int64_t pos = a0 + static_cast<int64_t>(v) * VEC;
    alignas(16) T vals[VEC];
    if (aligned && pos >= 0 && pos + VEC <= length) {
      *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<const uint4*>(row + pos);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) vals[j] = (pos + j >= 0 && pos + j < length) ? row[pos + j] : T(0);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int s = v * VEC + j - lead;
      if (s >= 0 && s < count) sm[s] = static_cast<acc>(vals[j]);
    }
  }
}

template <typename T>
struct DepthwiseArgs {
  const T* in;
  const T* w;
  const T* bias;  // nullptr for none
  T* out;
  int64_t channels, in_length, out_length, offset;
  int taps, dilation;
  bool flip;
};

// grid: (rows = N*C, tiles of the output length)
template <typename T>
__global__ void __launch_bounds__(kConvThreads) depthwise_correlate_kernel(DepthwiseArgs<T> a) {
  using acc = cuda_acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc* sm = reinterpret_cast<acc*>(smem_raw);
  const int64_t row = blockIdx.x, c = row % a.channels;
  const int64_t l0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTile), a.out_length - l0));
  load_window(a.in + row * a.in_length, a.in_length, l0 + a.offset, count + (a.taps - 1) * a.dilation, sm);
  acc taps[kMaxTaps];
#pragma unroll
  for (int k = 0; k < kMaxTaps; ++k)
    taps[k] = k < a.taps ? static_cast<acc>(a.w[c * a.taps + (a.flip ? a.taps - 1 - k : k)]) : acc(0);
  const acc b = a.bias ? static_cast<acc>(a.bias[c]) : acc(0);
  __syncthreads();
  T* out = a.out + row * a.out_length + l0;
  for (int j = threadIdx.x; j < count; j += kConvThreads) {  // consecutive threads, consecutive positions
    acc s = b;
#pragma unroll
    for (int k = 0; k < kMaxTaps; ++k)
      if (k < a.taps) s += taps[k] * sm[j + k * a.dilation];
    out[j] = static_cast<T>(s);
  }
}

// grid: (C, chunks). Block (c, chunk) sums gy * x-window products over its share of the (batch, tile) pairs.
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    depthwise_weight_partial_kernel(const T* __restrict__ gy, const T* __restrict__ x, cuda_acc_t<T>* partial,
                                    int64_t batch, int64_t channels, int64_t in_length, int64_t out_length, int taps,
                                    int dilation, int64_t offset, int64_t tiles, int64_t per_chunk) {
  using acc = cuda_acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc* sm = reinterpret_cast<acc*>(smem_raw);
  __shared__ acc scratch[kConvThreads / kWarpSize];
  const int64_t c = blockIdx.x, chunk = blockIdx.y;
  acc sums[kMaxTaps];
#pragma unroll
  for (int k = 0; k < kMaxTaps; ++k) sums[k] = acc(0);
  const int64_t first = chunk * per_chunk, last = min(batch * tiles, first + per_chunk);
  for (int64_t item = first; item < last; ++item) {
    const int64_t n = item / tiles, l0 = (item % tiles) * kTile, row = n * channels + c;
    const int count = static_cast<int>(min(static_cast<int64_t>(kTile), out_length - l0));
    __syncthreads();  // the previous item's window is no longer read
    load_window(x + row * in_length, in_length, l0 + offset, count + (taps - 1) * dilation, sm);
    __syncthreads();
    const T* g = gy + row * out_length + l0;
    for (int j = threadIdx.x; j < count; j += kConvThreads) {
      const acc gv = static_cast<acc>(g[j]);
#pragma unroll
      for (int k = 0; k < kMaxTaps; ++k)
        if (k < taps) sums[k] += gv * sm[j + k * dilation];
    }
  }
  for (int k = 0; k < taps; ++k) {
    const acc total = block_sum(sums[k], scratch);
    if (threadIdx.x == 0) partial[(chunk * channels + c) * taps + k] = total;
  }
}

size_t window_bytes(int64_t taps, int64_t dilation, size_t acc_size) {
  return (kTile + (taps - 1) * dilation) * acc_size;
}

}  // namespace

bool depthwise_fast_path(const Conv1dGeometry& g) {
  return g.groups == g.in_channels && g.out_channels == g.in_channels && g.stride == 1 &&
         g.kernel_size <= kMaxTaps && (g.kernel_size - 1) * g.dilation <= kMaxHalo;
}

void depthwise_correlate_cuda(const at::Tensor& in, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out,
                              int64_t dilation, int64_t offset, bool flip) {
  const int64_t rows = out.size(0) * out.size(1), tiles = ceil_div(out.size(2), kTile);
  TORCH_CHECK(tiles <= 65535, "pyops.conv1d: length ", out.size(2), " too long for the depthwise CUDA kernel");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "pyops_conv1d_depthwise_cuda", [&] {
    using acc = cuda_acc_t<scalar_t>;
    DepthwiseArgs<scalar_t> a{in.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                              out.mutable_data_ptr<scalar_t>(), out.size(1), in.size(2), out.size(2), offset,
                              static_cast<int>(w.size(2)), static_cast<int>(dilation), flip};
    depthwise_correlate_kernel<scalar_t><<<dim3(rows, tiles), kConvThreads,
                                           window_bytes(w.size(2), dilation, sizeof(acc)), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void depthwise_weight_cuda(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight, int64_t dilation,
                           int64_t padding) {
  const int64_t batch = x.size(0), channels = x.size(1), taps = grad_weight.size(2);
  const int64_t tiles = ceil_div(gy.size(2), kTile), items = batch * tiles;
  // enough blocks to fill the chip: split each channel's (batch, tile) pairs into chunks (shape-dependent only)
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({items, 65535, ceil_div(4 * sm_count(), channels)}));
  const int64_t per_chunk = ceil_div(items, chunks);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({chunks, channels, taps}, x.options().dtype(acc_dtype));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyops_conv1d_depthwise_weight_cuda", [&] {
    using acc = cuda_acc_t<scalar_t>;
    depthwise_weight_partial_kernel<scalar_t><<<dim3(channels, chunks), kConvThreads,
                                                window_bytes(taps, dilation, sizeof(acc)), stream>>>(
        gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc>(), batch,
        channels, x.size(2), gy.size(2), static_cast<int>(taps), static_cast<int>(dilation), -padding, tiles,
        per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t count = channels * taps;
    sum_chunks_kernel<scalar_t><<<std::min<int64_t>(ceil_div(count, 256), 4096), 256, 0, stream>>>(
        partial.const_data_ptr<acc>(), grad_weight.mutable_data_ptr<scalar_t>(), count, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace pyops
