// CUDA halves of sliding_head: im2col of a tile of positions and the fused bias+ReLU epilogues (the GEMMs between
// them are cuBLAS through at::mm_out in the shared driver). All are grid-stride loops over the elements they write,
// consecutive threads on consecutive output addresses (coalesced writes).
// Precision: allow_tf32=false forces exact fp32 GEMMs whatever the global flags say; true allows TF32 for them.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "common/cuda_utils.cuh"
#include "ops/sliding_head/sliding_head.h"

namespace pyops {
namespace {

constexpr int kThreads = 256;

// The geometry as plain fields: HeadGeometry's helpers are host-only.
struct DeviceGeometry {
  int64_t channels, in_h, in_w, kh, kw, out_w, out_hw;
};

// cols[j, k] = f[b, c, y + ky, x + kx] for p0 + j = (b, y, x) and k = (c, ky, kx). grid.y walks the positions
// (one division per position for (b, y, x)), the x-threads walk one position's patch: consecutive threads write
// consecutive k (coalesced) and read runs of kw consecutive features; k is split with 32-bit divisions. The
// previous version, one thread per element with ten 64-bit divisions each, took ~20 ms of the 100 ms of a
// 64x64 B=4 Net1 image on an H200 (bench/NOTES-sliding.md).
template <typename scalar_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ f, scalar_t* __restrict__ cols, DeviceGeometry g,
                              int64_t p0, int patch, int64_t count) {
  const int khw = static_cast<int>(g.kh * g.kw), kw = static_cast<int>(g.kw);
  const int64_t in_hw = g.in_h * g.in_w;
  for (int64_t j = blockIdx.y; j < count; j += gridDim.y) {
    const int64_t p = p0 + j, b = p / g.out_hw, yx = p - b * g.out_hw, y = yx / g.out_w, x = yx - y * g.out_w;
    const scalar_t* __restrict__ corner = f + b * g.channels * in_hw + y * g.in_w + x;  // f[b, 0, y, x]
    scalar_t* __restrict__ dst = cols + j * patch;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < patch; k += gridDim.x * blockDim.x) {
      const int c = k / khw, r = k - c * khw, ky = r / kw, kx = r - ky * kw;
      dst[k] = corner[c * in_hw + ky * g.in_w + kx];
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t v, bool relu) {
  return relu && v < acc_t(0) ? acc_t(0) : v;
}

// act[j, n] = act(act[j, n] + bias[n]) in place over the (count, channels) tile.
template <typename scalar_t>
__global__ void bias_act_kernel(scalar_t* __restrict__ act, const scalar_t* __restrict__ bias, bool relu,
                                int64_t channels, int64_t total) {
  using acc_t = cuda_acc_t<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    act[idx] = static_cast<scalar_t>(
        activate(static_cast<acc_t>(act[idx]) + static_cast<acc_t>(bias[idx % channels]), relu));
  }
}

// out[b, n, yx] = act(acc[j, n] + bias[n]) with p0 + j = b * out_hw + yx: one thread per output element, threads
// along positions so the NCHW writes are coalesced (the last layer has few channels: its reads are cache-served).
template <typename scalar_t>
__global__ void bias_act_nchw_kernel(const scalar_t* __restrict__ acc, const scalar_t* __restrict__ bias, bool relu,
                                     scalar_t* __restrict__ out, int64_t count, int64_t channels, int64_t p0,
                                     int64_t out_hw, int64_t total) {
  using acc_t = cuda_acc_t<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / count, j = idx % count, p = p0 + j;
    const acc_t v = static_cast<acc_t>(acc[j * channels + n]) + static_cast<acc_t>(bias[n]);
    out[((p / out_hw) * channels + n) * out_hw + p % out_hw] = static_cast<scalar_t>(activate(v, relu));
  }
}

int blocks_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), static_cast<int64_t>(sm_count()) * 16));
}

void im2col_cuda(const at::Tensor& features, at::Tensor& cols, const HeadGeometry& g, int64_t p0, int64_t count) {
  if (g.patch() * count == 0) return;
  TORCH_CHECK(g.patch() <= std::numeric_limits<int>::max(), "pyops.sliding_head: a patch of ", g.patch(),
              " features is too large for the CUDA im2col");
  const DeviceGeometry dg{g.channels, g.in_h, g.in_w, g.kh, g.kw, g.out_w, g.out_hw()};
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(g.patch(), kThreads), 1024)),
                  static_cast<unsigned>(std::min<int64_t>(count, 65535)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "sliding_head_im2col_cuda", [&] {
    im2col_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(features.const_data_ptr<scalar_t>(),
                                                           cols.mutable_data_ptr<scalar_t>(), dg, p0,
                                                           static_cast<int>(g.patch()), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bias_act_cuda(at::Tensor& act, const at::Tensor& bias, bool relu) {
  const int64_t total = act.numel();
  if (total == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "sliding_head_bias_act_cuda", [&] {
    bias_act_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        act.mutable_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), relu, act.size(1), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bias_act_nchw_cuda(const at::Tensor& acc, const at::Tensor& bias, bool relu, at::Tensor& out, int64_t p0) {
  const int64_t total = acc.numel();
  if (total == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "sliding_head_bias_act_nchw_cuda", [&] {
    bias_act_nchw_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        acc.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), relu, out.mutable_data_ptr<scalar_t>(),
        acc.size(0), acc.size(1), p0, out.size(2) * out.size(3), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Sets cuBLAS' TF32 permission for the op's GEMMs and restores the caller's setting on exit. With TF32 off the
// thread-local NoTF32Guard also holds, so no path inside at::mm can pick TF32.
class Tf32Scope {
 public:
  explicit Tf32Scope(bool allow) : saved_(at::globalContext().allowTF32CuBLAS()) {
    at::globalContext().setAllowTF32CuBLAS(allow);
    if (!allow) no_tf32_.emplace();
  }
  ~Tf32Scope() { at::globalContext().setAllowTF32CuBLAS(saved_); }
  Tf32Scope(const Tf32Scope&) = delete;
  Tf32Scope& operator=(const Tf32Scope&) = delete;

 private:
  bool saved_;
  std::optional<at::NoTF32Guard> no_tf32_;
};

at::Tensor sliding_head_cuda(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                             at::IntArrayRef relu, bool allow_tf32, int64_t workspace_bytes) {
  c10::cuda::CUDAGuard guard(features.device());
  Tf32Scope precision(allow_tf32);
  return sliding_head_run(features, weights, biases, relu, workspace_bytes,
                          HeadKernels{&im2col_cuda, &bias_act_cuda, &bias_act_nchw_cuda, /*preferred_cols_bytes=*/0,
                                      /*direct_first_layer=*/nullptr});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("sliding_head", &sliding_head_cuda); }

}  // namespace pyops
