// CPU halves of sliding_head: im2col of a tile of positions and the fused bias+ReLU epilogues. All are parallel
// over rows (positions / channels) and stream contiguous runs (std::copy, at::vec along the channels).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_vec.h"
#include "common/onednn.h"
#include "ops/sliding_head/sliding_head.h"

namespace pyops {
namespace {

// cols[j, k] = f[b, c, y + ky, x + kx] for p0 + j = (b, y, x) and k = (c, ky, kx): each row of cols is the patch
// of one position, C * kh runs of kw contiguous elements.
template <typename scalar_t>
void im2col_kernel(const scalar_t* f, scalar_t* cols, const HeadGeometry& g, int64_t p0, int64_t count) {
  const int64_t patch = g.patch();
  at::parallel_for(0, count, std::max<int64_t>(1, 32768 / patch), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t p = p0 + j;
      const int64_t b = p / g.out_hw(), y = (p % g.out_hw()) / g.out_w, x = p % g.out_w;
      scalar_t* row = cols + j * patch;
      for (int64_t c = 0; c < g.channels; ++c) {
        const scalar_t* plane = f + ((b * g.channels + c) * g.in_h + y) * g.in_w + x;
        for (int64_t ky = 0; ky < g.kh; ++ky, row += g.kw) std::copy(plane + ky * g.in_w, plane + ky * g.in_w + g.kw, row);
      }
    }
  });
}

template <typename scalar_t>
inline Vectorized<scalar_t> bias_act_vec(const Vectorized<scalar_t>& v, const Vectorized<scalar_t>& b, bool relu) {
  const Vectorized<scalar_t> s = v + b;
  return relu ? at::vec::maximum(s, Vectorized<scalar_t>(scalar_t(0))) : s;
}

// act[j, n] = act(act[j, n] + bias[n]) in place: rows in parallel, vectorized along the channels.
template <typename scalar_t>
void bias_act_kernel(scalar_t* act, const scalar_t* bias, bool relu, int64_t count, int64_t channels) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  at::parallel_for(0, count, std::max<int64_t>(1, 32768 / channels), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      scalar_t* row = act + j * channels;
      int64_t n = 0;
      for (; n + V <= channels; n += V) bias_act_vec(Vec::loadu(row + n), Vec::loadu(bias + n), relu).store(row + n);
      if (n < channels) {
        const int64_t rest = channels - n;
        bias_act_vec(Vec::loadu(row + n, rest), Vec::loadu(bias + n, rest), relu).store(row + n, rest);
      }
    }
  });
}

// out[b, n, yx] = act(acc[j, n] + bias[n]) with p0 + j = b * out_hw + yx: the (positions, channels) tile transposed
// into NCHW. Parallel over channels; each writes runs of consecutive positions (one run per image in the tile).
template <typename scalar_t>
void bias_act_nchw_kernel(const scalar_t* acc_tile, const scalar_t* bias, bool relu, scalar_t* out, int64_t count,
                          int64_t channels, int64_t p0, int64_t out_hw) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, channels, std::max<int64_t>(1, 32768 / count), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc bn = static_cast<acc>(bias[n]);
      for (int64_t j = 0; j < count;) {
        const int64_t b = (p0 + j) / out_hw, yx = (p0 + j) % out_hw;
        const int64_t run = std::min(count - j, out_hw - yx);
        scalar_t* dst = out + (b * channels + n) * out_hw + yx;
        for (int64_t i = 0; i < run; ++i) {
          const acc v = static_cast<acc>(acc_tile[(j + i) * channels + n]) + bn;
          dst[i] = static_cast<scalar_t>(relu && v < acc(0) ? acc(0) : v);
        }
        j += run;
      }
    }
  });
}

void im2col_cpu(const at::Tensor& features, at::Tensor& cols, const HeadGeometry& g, int64_t p0, int64_t count) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "sliding_head_im2col_cpu", [&] {
    im2col_kernel(features.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), g, p0, count);
  });
}

void bias_act_cpu(at::Tensor& act, const at::Tensor& bias, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "sliding_head_bias_act_cpu", [&] {
    bias_act_kernel(act.mutable_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), relu, act.size(0),
                    act.size(1));
  });
}

void bias_act_nchw_cpu(const at::Tensor& acc, const at::Tensor& bias, bool relu, at::Tensor& out, int64_t p0) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "sliding_head_bias_act_nchw_cpu", [&] {
    bias_act_nchw_kernel(acc.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), relu,
                         out.mutable_data_ptr<scalar_t>(), acc.size(0), acc.size(1), p0, out.size(2) * out.size(3));
  });
}

// The CPU's im2col tile: small enough that the GEMM reads it back from the last-level cache rather than from DRAM,
// and that it is not a fresh mapping each call (glibc mmaps blocks above 32 MiB and unmaps them when freed, so a
// 90 MB tile costs ~20k page faults per call). Measured (bench/NOTES-sliding.md): a 16x50x50 map into an 18x18
// kernel, 64 outputs, batch 4: 87 ms with one 90 MB tile, 30 ms with 4 MB tiles.
constexpr int64_t kCpuColsBytes = 4 << 20;

// Layer 0 as oneDNN's direct convolution for short patches into few outputs: there the im2col (kh*kw copies of
// every feature element, amortized over the N0 outputs) costs about as much as the GEMM, and the direct convolution
// beats both together by 1.2-2.2x. Its efficiency falls with the patch length: at C*kh*kw >= 20k the GEMM is as fast
// or 2-5x faster (bench/NOTES-sliding.md, stop 13). fp32 only: oneDNN has no fp64 convolution, and its bf16/fp16
// ones depend on the CPU's instruction set. Not with torch.backends.mkldnn disabled: ATen's fallback convolution
// makes an im2col of the whole map, outside the workspace bound. At any patch length where MKL's GEMM runs narrower
// than oneDNN (common/onednn.h: AMD AVX-512 CPUs): Net1's 18×18 layer (256-channel patches into 4096 outputs on a
// 34×34 map) took 1055 ms as the GEMM, 807 ms as oneDNN's convolution (stop 34, Zen 5; the head 1037 → 858 ms).
constexpr int64_t kCpuDirectMaxPatch = 8192, kCpuDirectMaxOutputs = 256;
bool direct_first_layer_cpu(const HeadGeometry& g, const at::Tensor& w0) {
  return w0.scalar_type() == at::kFloat &&
         ((g.patch() <= kCpuDirectMaxPatch && w0.size(0) <= kCpuDirectMaxOutputs) || !blas_runs_full_width()) &&
         at::globalContext().userEnabledMkldnn();
}

// allow_tf32 has no meaning on the CPU: its fp32 GEMMs are always exact fp32.
at::Tensor sliding_head_cpu(const at::Tensor& features, at::TensorList weights, at::TensorList biases,
                            at::IntArrayRef relu, bool /*allow_tf32*/, int64_t workspace_bytes) {
  return sliding_head_run(features, weights, biases, relu, workspace_bytes,
                          HeadKernels{&im2col_cpu, &bias_act_cpu, &bias_act_nchw_cpu, kCpuColsBytes,
                                      &direct_first_layer_cpu});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { m.impl("sliding_head", &sliding_head_cpu); }

}  // namespace pyops
