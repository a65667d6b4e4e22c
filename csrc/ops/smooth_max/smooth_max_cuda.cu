// CUDA kernels of smooth_max. Forward: one read of x; each thread folds its elements into an online (m, S)
// state, warps and blocks merge states. Backward: one elementwise pass.
//   dim with inner == 1 (rows contiguous): one block per row, 16-byte loads where the row is aligned.
//   inner > 1: threadIdx.x runs along inner (coalesced), threadIdx.y splits the reduced dim, shared memory merges.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "ops/smooth_max/smooth_max.h"

namespace pyops {
namespace {

template <typename acc>
struct State {
  acc m, s;
};

template <typename acc>
__device__ __forceinline__ acc dev_exp(acc v) {
  return exp(v);
}
template <>
__device__ __forceinline__ float dev_exp<float>(float v) {
  return expf(v);  // full-precision expf: no --use_fast_math, results stay within fp32 tolerance
}

// s += y with Kahan compensation c: a thread folds up to n / blockDim values into one fp32 sum, which drifted like
// the CPU's uncompensated sum did (~1e-6 relative over 2M rows). nvcc reassociates nothing without fast-math, and
// these are plain adds; the products that rescale s and c before an add (fold) are rounded products (mul_rn),
// which nvcc's default -fmad never contracts with that add into an FMA: the compensation would then take the
// product's rounding error for the add's and correct the sum by it.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename acc>
__device__ __forceinline__ void kahan_add(acc& s, acc& c, acc y) {
  const acc yc = y - c;
  const acc t = s + yc;
  c = (t - s) - yc;
  s = t;
}

// Folds one value (already multiplied by sign) into the state, c being the compensation of st.s. Ties with m count
// exactly 1, which keeps +-inf inputs and b = inf away from inf - inf and 0 * inf; a NaN value makes s NaN, which
// propagates.
template <typename acc>
__device__ __forceinline__ void fold(State<acc>& st, acc& c, acc v, acc b) {
  if (v > st.m) {
    const acc f = dev_exp(b * (st.m - v));
    st.s = mul_rn(st.s, f), c = mul_rn(c, f);
    st.m = v;
    kahan_add(st.s, c, acc(1));
  } else {
    kahan_add(st.s, c, v == st.m ? acc(1) : dev_exp(b * (v - st.m)));
  }
}

template <typename acc>
__device__ __forceinline__ acc rescale(acc s, acc m_from, acc m_to, acc b) {
  return m_from == m_to ? s : s * dev_exp(b * (m_from - m_to));
}

template <typename acc>
__device__ __forceinline__ State<acc> merge(State<acc> a, State<acc> c, acc b) {
  const acc m = a.m > c.m ? a.m : c.m;  // neither m is NaN: NaN inputs only ever reach s
  return {m, rescale(a.s, a.m, m, b) + rescale(c.s, c.m, m, b)};
}

template <typename acc>
__device__ __forceinline__ State<acc> warp_merge(State<acc> st, acc b) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    State<acc> other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset)};
    st = merge(st, other, b);
  }
  return st;
}

// A row of -inf alone (in sign·x) is -inf: log(n)/β would add +inf where it overflows (tiny β), giving NaN.
template <typename acc>
__device__ __forceinline__ acc finish(State<acc> st, acc sign, acc b) {
  const bool all_minus_inf = st.m == -INFINITY && !isnan(st.s);  // (a NaN row keeps its NaN)
  return sign * (all_minus_inf ? st.m : st.m + log(st.s) / b);
}

template <typename acc>
__device__ __forceinline__ State<acc> empty_state() {
  return {-INFINITY, acc(0)};
}

// One block per row of a contiguous (rows, n) matrix. VEC elements per load (16 bytes when VEC > 1).
template <typename scalar_t, int VEC>
__global__ void forward_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows,
                                    int64_t n, cuda_acc_t<scalar_t> sign, cuda_acc_t<scalar_t> b) {
  using acc = cuda_acc_t<scalar_t>;
  struct alignas(sizeof(scalar_t) * VEC) Pack {
    scalar_t v[VEC];
  };
  __shared__ State<acc> partial[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* xr = x + row * n;
    State<acc> st = empty_state<acc>();
    acc c = 0;
    const int64_t packs = n / VEC;
    const Pack* xp = reinterpret_cast<const Pack*>(xr);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const Pack pk = xp[p];
      acc vals[VEC];
      acc vmax = -INFINITY;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        vals[k] = sign * static_cast<acc>(pk.v[k]);
        vmax = vals[k] > vmax ? vals[k] : vmax;
      }
      // One rescale per pack at most, then one exponential per element.
      if (vmax > st.m) {
        const acc f = dev_exp(b * (st.m - vmax));
        st.s = mul_rn(st.s, f), c = mul_rn(c, f);
        st.m = vmax;
      }
      acc pack_sum = 0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) pack_sum += vals[k] == st.m ? acc(1) : dev_exp(b * (vals[k] - st.m));
      kahan_add(st.s, c, pack_sum);
    }
    for (int64_t i = packs * VEC + threadIdx.x; i < n; i += blockDim.x) fold(st, c, sign * static_cast<acc>(xr[i]), b);
    st.s -= c;

    st = warp_merge(st, b);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      const int warps = blockDim.x / kWarpSize;
      st = lane < warps ? partial[lane] : empty_state<acc>();
      st = warp_merge(st, b);
      if (lane == 0) out[row] = static_cast<scalar_t>(finish(st, sign, b));
    }
    __syncthreads();  // partial[] is reused by the next row
  }
}

// inner > 1: block (32, Y) covers 32 consecutive inner positions of one outer index; the Y threads of a column
// split the reduced dim and merge through shared memory.
template <typename scalar_t>
__global__ void forward_strided_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t outer,
                                       int64_t n, int64_t inner, cuda_acc_t<scalar_t> sign, cuda_acc_t<scalar_t> b) {
  using acc = cuda_acc_t<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  State<acc>* partial = reinterpret_cast<State<acc>*>(smem_raw);  // [blockDim.y][blockDim.x]
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    State<acc> st = empty_state<acc>();
    if (j < inner) {
      const scalar_t* xc = x + o * n * inner + j;
      acc c = 0;
      for (int64_t i = threadIdx.y; i < n; i += blockDim.y) fold(st, c, sign * static_cast<acc>(xc[i * inner]), b);
      st.s -= c;
    }
    partial[threadIdx.y * blockDim.x + threadIdx.x] = st;
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
      if (threadIdx.y < stride) {
        State<acc>& mine = partial[threadIdx.y * blockDim.x + threadIdx.x];
        mine = merge(mine, partial[(threadIdx.y + stride) * blockDim.x + threadIdx.x], b);
      }
      __syncthreads();
    }
    if (threadIdx.y == 0 && j < inner) out[o * inner + j] = static_cast<scalar_t>(finish(partial[threadIdx.x], sign, b));
    __syncthreads();
  }
}

// grad_x = grad * exp(beta * (x - result)), grad and result broadcast along the reduced dim.
template <typename scalar_t>
__global__ void backward_finite_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ r, scalar_t* __restrict__ gx, int64_t total,
                                       int64_t n, int64_t inner, cuda_acc_t<scalar_t> beta) {
  using acc = cuda_acc_t<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = idx / (n * inner), jj = idx % inner;
    const int64_t k = o * inner + jj;
    gx[idx] = static_cast<scalar_t>(static_cast<acc>(g[k]) *
                                    dev_exp(beta * (static_cast<acc>(x[idx]) - static_cast<acc>(r[k]))));
  }
}

// beta = +-inf: one-hot at the arg-extreme, ties sharing equally. One thread per output; rare path.
template <typename scalar_t>
__global__ void backward_infinite_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ r, scalar_t* __restrict__ gx, int64_t outputs,
                                         int64_t n, int64_t inner) {
  using acc = cuda_acc_t<scalar_t>;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < outputs;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = k / inner, j = k % inner;
    const scalar_t* xk = x + o * n * inner + j;
    scalar_t* gk = gx + o * n * inner + j;
    const acc res = static_cast<acc>(r[k]);
    int64_t ties = 0;
    for (int64_t i = 0; i < n; ++i) ties += static_cast<acc>(xk[i * inner]) == res;
    // a NaN result (x held a NaN) gets a NaN gradient everywhere, as torch.amax's
    const acc share = res != res ? res : ties > 0 ? static_cast<acc>(g[k]) / static_cast<acc>(ties) : acc(0);
    for (int64_t i = 0; i < n; ++i) {
      gk[i * inner] = static_cast<scalar_t>(res != res || static_cast<acc>(xk[i * inner]) == res ? share : acc(0));
    }
  }
}

template <typename scalar_t>
void launch_forward(const at::Tensor& x, at::Tensor& out, const ReductionView& v, double beta) {
  using acc = cuda_acc_t<scalar_t>;
  const acc sign = beta > 0 ? acc(1) : acc(-1), b = static_cast<acc>(std::abs(beta));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (v.inner == 1) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int threads = v.n >= 4096 ? 512 : (v.n >= 1024 ? 256 : 128);
    const int64_t blocks = std::min<int64_t>(v.outer, 65535LL * 32);
    const bool aligned = reinterpret_cast<uintptr_t>(xp) % 16 == 0 && v.n % kVec == 0;
    if (aligned) {
      forward_rows_kernel<scalar_t, kVec><<<blocks, threads, 0, stream>>>(xp, op, v.outer, v.n, sign, b);
    } else {
      forward_rows_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(xp, op, v.outer, v.n, sign, b);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Enough blocks to fill the chip: split the reduced dim over up to 32 threads when the outputs are few.
  const int64_t columns = ceil_div(v.inner, kWarpSize) * v.outer;
  int y = 1;
  while (y < 32 && columns * y * kWarpSize < 8LL * sm_count() * 1024 && y * 2 <= v.n) y *= 2;
  const dim3 block(kWarpSize, y);
  const dim3 grid(static_cast<unsigned>(ceil_div(v.inner, kWarpSize)), static_cast<unsigned>(std::min<int64_t>(v.outer, 65535)));
  const size_t smem = sizeof(State<acc>) * kWarpSize * y;
  forward_strided_kernel<scalar_t><<<grid, block, smem, stream>>>(xp, op, v.outer, v.n, v.inner, sign, b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor smooth_max_cuda(const at::Tensor& x, double beta, int64_t dim, bool keepdim) {
  const int64_t d = check_smooth_max_args(x, beta, dim);
  if (beta_below_float(x, beta)) return smooth_max_cuda(x.to(at::kDouble), beta, dim, keepdim).to(x.scalar_type());
  beta = kernel_beta(x, beta);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(keepdim_shape(x, d), x.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "smooth_max_cuda", [&] {
      launch_forward<scalar_t>(xc, out, reduction_view(xc, d), beta);
    });
  }
  return (keepdim || x.dim() == 0) ? out : out.squeeze(d);
}

at::Tensor smooth_max_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& result,
                                    double beta, int64_t dim, bool keepdim) {
  const int64_t d = check_smooth_max_backward_args(grad, x, result, beta, dim, keepdim);
  if (beta_below_float(x, beta)) {
    return smooth_max_backward_cuda(grad.to(at::kDouble), x.to(at::kDouble), result.to(at::kDouble), beta, dim,
                                    keepdim).to(x.scalar_type());
  }
  beta = kernel_beta(x, beta);
  c10::cuda::CUDAGuard guard(x.device());
  const auto shape = keepdim_shape(x, d);
  const at::Tensor g = grad.reshape(shape).contiguous();
  const at::Tensor r = result.reshape(shape).contiguous();
  const at::Tensor xc = x.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_x.numel() == 0) return grad_x;
  const ReductionView v = reduction_view(xc, d);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "smooth_max_backward_cuda", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = grad_x.mutable_data_ptr<scalar_t>();
    const int threads = 256;
    if (std::isinf(beta)) {
      const int64_t outputs = v.outer * v.inner;
      const int64_t blocks = std::min<int64_t>(ceil_div(outputs, threads), 65535LL * 32);
      backward_infinite_kernel<scalar_t><<<blocks, threads, 0, stream>>>(gp, xp, rp, op, outputs, v.n, v.inner);
    } else {
      const int64_t total = xc.numel();
      const int64_t blocks = std::min<int64_t>(ceil_div(total, threads), 32LL * sm_count() * 8);
      backward_finite_kernel<scalar_t><<<blocks, threads, 0, stream>>>(gp, xp, rp, op, total, v.n, v.inner,
                                                                       static_cast<cuda_acc_t<scalar_t>>(beta));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("smooth_max", &smooth_max_cuda);
  m.impl("smooth_max_backward", &smooth_max_backward_cuda);
}

}  // namespace pyops
