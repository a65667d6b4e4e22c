// The implicit-GEMM convolution kernel (see conv_igemm_cuda.cuh). Kept simple: 64×64 output tiles, 16-deep
// reduction steps, 256 threads each owning a 4×4 micro-tile strided by 16 so that neighbouring threads load and
// store neighbouring output pixels (coalesced in NCHW).
#include "ops/conv_bn_relu/conv_igemm_cuda.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/cuda_utils.cuh"

namespace pyops {

namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256, kMicro = 4;

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct IgemmParams {
  int64_t n, cin, h, w, cout, kh, kw, oh, ow;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t cin_g, cout_g, k_total, m_total;
  Strides4 xs, rs, os;
  int act;
};

template <typename acc>
__device__ __forceinline__ acc activate(acc v, int act) {
  // a NaN passes through (every comparison is false for it), as torch.relu/hardtanh keep it
  if (act == 1) return v < acc(0) ? acc(0) : v;
  if (act == 2) return v < acc(0) ? acc(0) : (v > acc(6) ? acc(6) : v);
  if (act == 3) return v / (acc(1) + exp(-v));  // SiLU (exp: expf or exp by acc's type, not the fast __expf)
  if (act == 4) return v * fmin(fmax(v + acc(3), acc(0)), acc(6)) / acc(6);  // Hardswish
  if (act == 5) {  // Hardsigmoid (comparisons, not fmax: that would turn a NaN into 0)
    const acc t = v + acc(3);
    return (t < acc(0) ? acc(0) : (t > acc(6) ? acc(6) : t)) / acc(6);
  }
  if (act == 6) return acc(1) / (acc(1) + exp(-v));  // Sigmoid
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) igemm_kernel(const scalar_t* __restrict__ x,
                                                         const scalar_t* __restrict__ w,
                                                         const scalar_t* __restrict__ bias,
                                                         const scalar_t* __restrict__ residual,
                                                         scalar_t* __restrict__ out, IgemmParams p) {
  using acc = cuda_acc_t<scalar_t>;
  __shared__ acc As[kBK][kBM];
  __shared__ acc Bs[kBK][kBN + 1];  // +1: the transposing store into Bs would hit one bank otherwise
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t co0 = static_cast<int64_t>(blockIdx.y) * kBN;  // within the group
  const int64_t grp = blockIdx.z;

  acc c[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) c[i][j] = acc(0);

  for (int64_t k0 = 0; k0 < p.k_total; k0 += kBK) {
    // A tile: kBK×kBM gathered input values, m fastest across threads.
#pragma unroll
    for (int l = 0; l < (kBK * kBM) / kThreads; ++l) {
      const int e = tid + l * kThreads;
      const int mm = e % kBM, kk = e / kBM;
      const int64_t m = m0 + mm, k = k0 + kk;
      acc v = acc(0);
      if (m < p.m_total && k < p.k_total) {
        const int64_t ow = m % p.ow, t = m / p.ow, oh = t % p.oh, n = t / p.oh;
        const int64_t kw = k % p.kw, t2 = k / p.kw, kh = t2 % p.kh, ci = t2 / p.kh;
        const int64_t ih = oh * p.sh - p.ph + kh * p.dh, iw = ow * p.sw - p.pw + kw * p.dw;
        if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w) {
          const int64_t cg = grp * p.cin_g + ci;
          v = static_cast<acc>(x[n * p.xs.n + cg * p.xs.c + ih * p.xs.h + iw * p.xs.w]);
        }
      }
      As[kk][mm] = v;
    }
    // B tile: kBK×kBN weights, k fastest across threads (w rows are contiguous in k).
#pragma unroll
    for (int l = 0; l < (kBK * kBN) / kThreads; ++l) {
      const int e = tid + l * kThreads;
      const int kk = e % kBK, nn = e / kBK;
      const int64_t k = k0 + kk, co = co0 + nn;
      acc v = acc(0);
      if (k < p.k_total && co < p.cout_g) v = static_cast<acc>(w[(grp * p.cout_g + co) * p.k_total + k]);
      Bs[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      acc a[kMicro], bv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = As[kk][tx + 16 * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) bv[j] = Bs[kk][ty + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) c[i][j] = fma(a[i], bv[j], c[i][j]);
    }
    __syncthreads();
  }

  // Epilogue: + bias + residual, activation, one store of the final value.
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t m = m0 + tx + 16 * i;
    if (m >= p.m_total) continue;
    const int64_t ow = m % p.ow, t = m / p.ow, oh = t % p.oh, n = t / p.oh;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t co_l = co0 + ty + 16 * j;
      if (co_l >= p.cout_g) continue;
      const int64_t co = grp * p.cout_g + co_l;
      acc v = c[i][j];
      if (bias) v += static_cast<acc>(bias[co]);
      if (residual) v += static_cast<acc>(residual[n * p.rs.n + co * p.rs.c + oh * p.rs.h + ow * p.rs.w]);
      out[n * p.os.n + co * p.os.c + oh * p.os.h + ow * p.os.w] = static_cast<scalar_t>(activate(v, p.act));
    }
  }
}

}  // namespace

void conv_bias_act_igemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                              const at::Tensor& residual, at::Tensor& out, const ConvGeometry& g) {
  IgemmParams p{};
  p.n = g.n, p.cin = g.cin, p.h = g.h, p.w = g.w, p.cout = g.cout, p.kh = g.kh, p.kw = g.kw, p.oh = g.oh, p.ow = g.ow;
  p.sh = g.stride[0], p.sw = g.stride[1], p.ph = g.padding[0], p.pw = g.padding[1];
  p.dh = g.dilation[0], p.dw = g.dilation[1];
  p.cin_g = g.cin / g.groups, p.cout_g = g.cout / g.groups;
  p.k_total = p.cin_g * g.kh * g.kw, p.m_total = g.n * g.oh * g.ow;
  p.xs = strides_of(x), p.os = strides_of(out), p.rs = residual.defined() ? strides_of(residual) : p.os;
  p.act = static_cast<int>(g.act);
  const int64_t m_blocks = ceil_div(p.m_total, kBM), n_blocks = ceil_div(p.cout_g, kBN);
  TORCH_CHECK(m_blocks <= 0x7fffffffLL && n_blocks <= 65535 && g.groups <= 65535,
              "pyops.conv2d_bias_act (CUDA): problem too large for one launch grid");
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(n_blocks), static_cast<unsigned>(g.groups));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_bias_act_igemm_cuda", [&] {
    igemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace pyops
