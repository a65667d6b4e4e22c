// conv2d_bias_act(x, w, b, residual) = act(conv2d(x, w) + b + residual), and conv2d_bn_relu = the same after folding
// an eval-mode BatchNorm into (w, b):  scale = γ/√(σ²+ε),  w' = w·scale,  b' = (b − μ)·scale + β  (per out channel).
//
// Shapes: x (N, Cin, H, W), w (Cout, Cin/groups, KH, KW), b (Cout,), residual and output (N, Cout, OH, OW).
// The output keeps x's memory format (channels_last iff x is channels_last-contiguous and not NCHW-contiguous).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/activation.h"
#include "common/cpu_isa.h"

namespace pyops {

// Everything a kernel needs to know about one convolution besides the tensors.
struct ConvGeometry {
  int64_t n, cin, h, w;       // input
  int64_t cout, kh, kw;       // weight (Cin/groups input channels per group)
  int64_t oh, ow;             // output
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
  Activation act;
};

// Argument checks (messages name the argument) and the output geometry; shared by every backend.
ConvGeometry check_conv2d_bias_act_args(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        int64_t activation, const std::optional<at::Tensor>& residual);
void check_bn_args(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                   const at::Tensor& running_mean, const at::Tensor& running_var, double eps);
// conv_act_backward's arguments: grad and output alike (N, C, H, W), scale (C,) if given; returns the activation.
Activation check_conv_act_backward_args(const at::Tensor& grad, const at::Tensor& output,
                                        const std::optional<at::Tensor>& scale, int64_t activation);
// conv_act_backward's two results, uninitialized, in output's memory format: the scaled gradient, and the unscaled
// one where it is computed (scale given and unscaled_too), else an empty tensor.
std::tuple<at::Tensor, at::Tensor> conv_act_backward_outputs(const at::Tensor& output, bool has_scale,
                                                             bool unscaled_too);

// The memory format the output takes from the input (and that kernels compute in).
at::MemoryFormat output_memory_format(const at::Tensor& input);

// The main-loop choice, from PYOPS_CONV_PATH (auto|direct|library on CPU, auto|ours|cudnn on CUDA).
enum class ConvPath { kAuto, kDirect, kLibrary };
ConvPath requested_conv_path();

// Whether a float32 1×1 layer (stride 1, no padding, one group) from Cin to Cout channels on an N × Cin × H × W CPU
// input in format fmt runs as a GEMM (conv_bn_relu_cpu.cpp), here and in the packed op: ConvBNReLU2d packs no
// weight for such a layer. full_width_blas: the rule of a CPU where MKL runs as wide as oneDNN or not (tests ask
// for either); this CPU's (blas_runs_full_width, common/onednn.h) when not given.
bool one_by_one_runs_as_gemm(int64_t n, int64_t cin, int64_t cout, int64_t h, int64_t w, at::MemoryFormat fmt,
                             std::optional<bool> full_width_blas = std::nullopt);

// Whether the direct kernel reads its strips from a zero-padded copy of the input rather than gathering them per task:
// at column stride 1, where each strip row is a slice of an input row, and only where the copy is at most about twice
// the input (a padding far wider than the image is gathered, as zeros).
inline bool direct_reads_padded_copy(const ConvGeometry& g) {
  const double hp = g.h + 2.0 * g.padding[0], wp = g.w + 2.0 * g.padding[1];
  return g.stride[1] == 1 && hp * wp <= 2.0 * g.h * g.w + 4 * (hp + wp);
}
// Whether its tasks run along the padded copy's rows as one (stride 1 in both dimensions), whatever the row width,
// rather than along one output row each.
inline bool direct_runs_flat(const ConvGeometry& g) { return g.stride[0] == 1 && direct_reads_padded_copy(g); }
// The positions a flat task runs along, per image: every padded row's columns up to the last output's.
inline int64_t direct_flat_positions(const ConvGeometry& g) { return (g.oh - 1) * (g.w + 2 * g.padding[1]) + g.ow; }
// Its register tile: J output channels × TV vectors of columns, chosen in conv_direct_cpu.cpp (reasons and timings
// there) for vectors of 16 floats (wide: 32 registers) or 8 (16 registers).
struct DirectTile {
  int j, tv;
};
inline DirectTile direct_tile(const ConvGeometry& g, bool wide) {
  const int64_t cout_g = g.cout / g.groups;
  if (cout_g < 4) return {1, 4};
  if (wide && (cout_g % 8 == 0 || cout_g >= 32)) return {8, 3};
  return {4, 3};
}
// The fraction of the columns a flat task computes that are outputs, with the AVX-512 build's float32 tiles: the
// padded rows' extra columns and each image's last tile, rounded up to whole tiles (7×7 maps, 3×3 kernels: 49 of 96).
inline double direct_flat_output_fraction(const ConvGeometry& g) {
  const int64_t cols = direct_tile(g, true).tv * 16, positions = direct_flat_positions(g);
  return static_cast<double>(g.oh * g.ow) / static_cast<double>((positions + cols - 1) / cols * cols);
}
// A CPU kernel (common/cpu_isa.h), called as PYOPS_CPU_KERNEL_IF(direct_avx512_pays(g), ...)(...).
// Its register tiles hold 3-4 vectors of columns: 48-64 in the AVX-512 build, 24-32 in the AVX2 one. The AVX-512
// build runs flat tasks (1.1-1.8x the AVX2 build on 15 layers from 8×8 to 56×56, stop 36) and rows wider than 16
// columns, 32 with under 4 output channels a group (stop 35's 32- and 64-column tiles half full: on narrower rows it
// was 0.82-0.9x the AVX2 build, dense 14×14 and 16×16 maps, depthwise 20×20 to 28×28; on wider ones 1.06-1.45x,
// bench/NOTES-conv_bn_relu.md; with stop 36's 48-column tiles, stride-2 rows of 17-24 columns ran 0.92-1.0x the AVX2
// build, of 28 and 56 columns 1.57x and 1.38x).
inline bool direct_avx512_pays(const ConvGeometry& g) {
  return direct_runs_flat(g) || g.ow > (g.cout / g.groups < 4 ? 32 : 16);
}
// CPU kernels (conv_direct_cpu.cpp, conv_bn_relu_cpu.cpp).
// out: allocated in output_memory_format(input); x, w contiguous NCHW; b (Cout,) contiguous or undefined;
// residual NCHW-contiguous or undefined.
PYOPS_DECLARE_CPU_KERNEL(void conv_bias_act_direct_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                       const at::Tensor& residual, at::Tensor& out,
                                                       const ConvGeometry& g))

}  // namespace pyops
