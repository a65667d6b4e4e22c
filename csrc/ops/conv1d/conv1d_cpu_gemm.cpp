// grad_weight of dense CPU layers as one batched GEMM per tap through ATen's BLAS (MKL), with no im2col buffer:
// grad_weight[:, :, t] = sum_n grad_output[n][:, l] @ input[n][:, l*stride + t*dilation - padding]^T over the
// positions l where tap t reads inside the input. Faster than oneDNN's weight gradient on dense float32 layers
// where both libraries run the same vector width (on AVX-512 only for layers wider than 128 -> 128), slower where
// MKL is held to AVX2 beside an AVX-512 oneDNN (bench/NOTES-conv1d.md); the rule is use_gemm_backward_weight.
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>

#include "ops/conv1d/conv1d.h"
#include "ops/conv1d/conv1d_cpu_util.h"

namespace pyops {
namespace {

// (stride, N, C, ceil(L / stride)): phase r holds input positions r, r + stride, ..., so that a strided tap reads
// a unit-stride slice of one phase, which BLAS takes without a copy (one copy of the input instead of one per tap).
at::Tensor split_phases(const at::Tensor& input, int64_t stride) {
  if (stride == 1) return input.contiguous().unsqueeze(0);
  const int64_t length = input.size(2), phase_length = (length + stride - 1) / stride;
  at::Tensor phases = at::empty({stride, input.size(0), input.size(1), phase_length}, input.options());
  for (int64_t r = 0; r < stride; ++r) {
    const int64_t count = (length - r + stride - 1) / stride;
    phases[r].narrow(2, 0, count).copy_(input.slice(2, r, length, stride));
    // a shorter phase's last column lies past the input's end: taps never read it, zeroed so nothing is undefined
    if (count < phase_length) phases[r].narrow(2, count, phase_length - count).zero_();
  }
  return phases;
}

// Which CPU the rule below is measured on. MKL takes its AVX-512 kernels on Intel CPUs only; oneDNN takes them on
// any CPU that has them. So on an AMD CPU with AVX-512 our GEMMs run at AVX2 speed beside an AVX-512 oneDNN.
enum class BlasIsa { kAvx2, kIntelAvx512, kAmdAvx512, kOther };

BlasIsa blas_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const BlasIsa isa = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) return BlasIsa::kAvx2;
    return __builtin_cpu_is("intel") ? BlasIsa::kIntelAvx512 : BlasIsa::kAmdAvx512;
  }();
  return isa;
#else
  return BlasIsa::kOther;  // not measured off x86: keep oneDNN's weight gradient, the one F.conv1d uses
#endif
}

}  // namespace

// Measured on the 2-vCPU dev VMs, interleaved min-of-rounds vs oneDNN's weight gradient (convolution_backward
// with only the weight output), float32:
//   Zen 3 (AVX2), 2026-11-27: faster on every dense layer tried, 1.04-1.40x (TCN N=4 128->128 L=1024 k=3 3.5 vs
//     4.9 ms; wav2vec2 conv1 512->512 s=2 21.4 vs 25.4 ms; 32..1024 channels, k=1..5, stride 1..2, dilation 1..2);
//     float64 slower, 0.89-0.94x (128->128: 9.2 vs 8.2 ms).
//   Zen 4 (AVX-512, MKL on AVX2), 2026-12-02: slower, 0.83-0.96x (TCN 3.09 vs 2.75 ms), except k=1 1.11x;
//   Zen 5 (AVX-512, full-width), 2026-12-02: slower, 0.55x (TCN 2.15 vs 1.17 ms).
//   Intel Sapphire Rapids (both libraries on AVX-512), stop 29, 1 / 2 threads: faster from C_in * C_out > 128 * 128
//     on (192->192 1.01x / 1.07x, 128->512 1.12x / 1.11x, 256->256 1.12x / 1.02x, 512->512 stride 2 1.08x / 1.08x),
//     slower up to it (TCN 128->128 0.90-0.92x / 0.79-0.91x, 64->64 L=2048 0.85x / 0.89x, 32->32 0.81x / 0.93x):
//     each sample's GEMM of a small layer is too small for MKL's blocking, while oneDNN's reduces over the batch;
//     and slower with >= 9 taps (1.04-1.54x in 6 of 7 sweep layers: one pass over the operands per tap, where
//     oneDNN makes one), as fast or faster with <= 5.
bool use_gemm_backward_weight(const Conv1dGeometry& g, at::ScalarType dtype) {
  switch (conv1d_path()) {
    case Conv1dPath::kGemm:  // (half precision: oneDNN's, which sums in fp32; per-sample GEMMs would round each)
      return g.groups == 1 && (dtype == at::kFloat || dtype == at::kDouble);
    case Conv1dPath::kAuto: {
      // (short rows make per-sample GEMMs of depth < 64: 3.7x slower at L_out = 10; fewer than 256 positions in all
      // leave too little to sum for the per-tap passes: 1.06-1.54x slower in the stop 29 sweep, 512->512 k2 stride
      // 2 on 99 positions 0.92 vs 0.61 ms; where ATen's weight gradient is its im2col GEMM, one product over all
      // taps, the per-tap GEMMs were 1.2-6x slower: stop 28)
      if (g.groups != 1 || g.out_length < 64 || double(g.batch) * g.out_length < 256 || dtype != at::kFloat ||
          !at::globalContext().hasMKL() || aten_takes_im2col(g)) {
        return false;
      }
      switch (blas_isa()) {
        case BlasIsa::kAvx2: return true;
        case BlasIsa::kIntelAvx512: return g.in_channels * g.out_channels > 128 * 128 && g.kernel_size <= 5;
        default: return false;
      }
    }
    default: return false;
  }
}

at::Tensor gemm_conv1d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                       const Conv1dGeometry& g) {
  const at::Tensor gy = grad_output.contiguous();
  const at::Tensor phases = split_phases(input, g.stride);
  // (K, C_out, C_in): each tap's block is contiguous for BLAS; permuted to the weight's layout at the end
  at::Tensor taps = at::zeros({g.kernel_size, g.out_channels, g.in_channels}, input.options());
  // One batched GEMM per tap and batch chunk gives a (chunk, C_out, C_in) product summed over the chunk; chunks of
  // at most 4M elements (16 MB in float32) bound that temporary. The chunking depends on the shape only and the
  // sums run in a fixed order (no atomics), so at a fixed thread count the result is the same on every run.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 22) / (g.out_channels * g.in_channels));
  for (int64_t t = 0; t < g.kernel_size; ++t) {
    const int64_t shift = t * g.dilation - g.padding;
    const TapRange r = tap_range(shift, g.stride, g.in_length, 0, g.out_length);
    if (r.hi == r.lo) continue;  // the tap reads only padding
    const int64_t offset = floor_div(shift, g.stride), phase = shift - offset * g.stride;
    const at::Tensor x = phases.select(0, phase).narrow(2, r.lo + offset, r.hi - r.lo);
    const at::Tensor dy = gy.narrow(2, r.lo, r.hi - r.lo);
    at::Tensor block = taps.select(0, t);
    for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
      const int64_t count = std::min(chunk, g.batch - n0);
      block.add_(at::bmm(dy.narrow(0, n0, count), x.narrow(0, n0, count).transpose(1, 2)).sum(0));
    }
  }
  return taps.permute({1, 2, 0}).contiguous();
}

}  // namespace pyops
