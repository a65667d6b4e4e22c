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

// CPU kernels (conv_direct_cpu.cpp, conv_bn_relu_cpu.cpp).
// out: allocated in output_memory_format(input); x, w contiguous NCHW; b (Cout,) contiguous or undefined;
// residual NCHW-contiguous or undefined.
// A CPU kernel (common/cpu_isa.h), called as PYOPS_CPU_KERNEL_IF(direct_rows_fill_avx512_tiles(g), ...)(...).
// Its register tiles hold 2 vectors of columns (4 with under 4 output channels per group): 32 (64) columns in the
// AVX-512 build, 16 (32) in the AVX2 one. The AVX-512 build runs where a row fills more than half of its tile: on
// narrower rows it was 0.82-0.9x the AVX2 build (dense 14×14 and 16×16 maps, depthwise 20×20 to 28×28), on wider
// ones 1.06-1.45x (stop 35, bench/NOTES-conv_bn_relu.md).
inline bool direct_rows_fill_avx512_tiles(const ConvGeometry& g) { return g.ow > (g.cout / g.groups < 4 ? 32 : 16); }
// Whether the direct kernel reads its strips from a zero-padded copy of the input rather than gathering them per task:
// at column stride 1, where each strip row is a slice of an input row, and only where the copy is at most about twice
// the input (a padding far wider than the image is gathered, as zeros).
inline bool direct_reads_padded_copy(const ConvGeometry& g) {
  const double hp = g.h + 2.0 * g.padding[0], wp = g.w + 2.0 * g.padding[1];
  return g.stride[1] == 1 && hp * wp <= 2.0 * g.h * g.w + 4 * (hp + wp);
}
PYOPS_DECLARE_CPU_KERNEL(void conv_bias_act_direct_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                       const at::Tensor& residual, at::Tensor& out,
                                                       const ConvGeometry& g))

}  // namespace pyops
