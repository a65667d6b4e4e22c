// conv1d: forward, grad_input (transposed convolution) and grad_weight (correlation) as ops of their own.
//
// Shapes: input (N, C_in, L_in), weight (C_out, C_in / groups, K), bias (C_out), output (N, C_out, L_out) with
//   L_out = (L_in + 2*padding - dilation*(K-1) - 1) / stride + 1,
//   out[n, o, l] = bias[o] + sum_{c, k} weight[o, c, k] * input[n, g*C_in/groups + c, l*stride + k*dilation - padding]
// (g = o / (C_out / groups); input is zero outside [0, L_in)).
//
// Every CPU kernel is one "correlation" with a general offset, which covers all three ops:
//   out[n, o, l] = bias[o] + sum_{c, k} w[o, c, k] * in[n, g*Cg + c, l*stride + k*dilation + offset]
//   forward:    in = input, w = weight,                          offset = -padding
//   grad_input: in = grad_output, w = weight transposed per group and flipped, stride 1,
//               offset = padding - dilation*(K-1), output length = L_in (at a stride above 1, one such
//               correlation per phase of the input, into its phase slab: conv1d_cpu.cpp, PhaseSlabs below)
// and grad_weight[o, c, k] = sum_{n, j} gy[n, o, j] * input[n, g*Cg + c, j*stride + k*dilation - padding] (at a
// stride above 1, every tap a stride-1 correlation with one phase of the input, read from its phase slab).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/activation.h"
#include "common/cpu_isa.h"

namespace pyops {

struct Conv1dGeometry {
  int64_t batch, in_channels, in_length, out_channels, kernel_size, out_length;
  int64_t stride, padding, dilation, groups;
  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
};

// Each validates its arguments (the message names the one at fault) and returns the geometry.
Conv1dGeometry check_conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t stride, int64_t padding, int64_t dilation, int64_t groups);
// conv1d_bias_act's residual, if given: (N, C_out, L_out) of the geometry g, input's dtype and device.
void check_conv1d_residual(const std::optional<at::Tensor>& residual, const at::Tensor& input,
                           const Conv1dGeometry& g);
Conv1dGeometry check_conv1d_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                           int64_t input_length, int64_t stride, int64_t padding, int64_t dilation,
                                           int64_t groups);
Conv1dGeometry check_conv1d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                            int64_t kernel_size, int64_t stride, int64_t padding, int64_t dilation,
                                            int64_t groups);

// PYOPS_CONV1D_PATH, read per call so that tests can force each path: auto (the default), direct (our kernels),
// library (ATen's convolution, as F.conv1d), gemm (library, but the CPU weight gradient and every op of a pointwise
// layer through the matrix products below, whatever the CPU and layer). A ValueError names any other value.
enum class Conv1dPath { kAuto, kDirect, kLibrary, kGemm };
Conv1dPath conv1d_path();

// Whether the library convolution (ATen: oneDNN or its im2col GEMM on CPU, cuDNN on CUDA) runs op instead of our
// kernels: as forced by conv1d_path(), or under auto where bench/ shows it faster (bench/NOTES-conv1d.md):
//   CPU:  where op's product is wide on both sides: >= 16 output channels per group (the input gradient's are the
//         layer's input channels) from a reduction of >= 128 channels x taps (the input gradient's over the
//         layer's output channels), with >= 1M multiply-adds where oneDNN runs; the weight gradient of few
//         positions (N * L_out <= 128) into many outputs; and on single small images (aten_takes_im2col) the
//         backward ops from lower bars (conv1d.cpp);
//   CUDA: groups == 1 with >= 32 channels in or out, every op (depthwise and small-channel layers stay ours).
enum class Conv1dOp { kForward, kBackwardInput, kBackwardWeight };
// Whether ATen runs a float32 CPU convolution of this geometry as its im2col GEMM rather than oneDNN's: one image
// of at most 20480 input values, groups 1 (ATen's use_mkldnn, as F.conv1d reaches it).
bool aten_takes_im2col(const Conv1dGeometry& g);
bool conv1d_use_library(const Conv1dGeometry& g, Conv1dOp op, bool cuda);
// The three ops through the library (bias may be undefined); the CPU weight gradient chooses among its paths with
// cpu_weight_gradient_path (below) instead of conv1d_use_library. They follow torch's flags as F.conv1d does: TF32
// (torch.backends.cudnn.allow_tf32) and determinism (torch.backends.cudnn.deterministic or
// torch.use_deterministic_algorithms; cuDNN's default algorithms may add in a run-dependent order). Our own
// kernels are deterministic whatever the flags.
at::Tensor library_conv1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          const Conv1dGeometry& g);
// conv1d_bias_act's epilogue in place on a finished output, out = act(out + residual) (residual may be undefined),
// where the kernel that computed it could not apply it as it stored (a library call; the CUDA kernels): by ATen on
// any device, in one vectorized pass on the CPU (float32/float64). NaN stays NaN.
void add_residual_activate(at::Tensor& out, const at::Tensor& residual, Activation act);
at::Tensor library_conv1d_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                         const Conv1dGeometry& g);
// grad_weight, and grad_bias in the same call when with_bias (oneDNN sums it in its weight pass; a separate sum
// re-read grad_output: 2-4 % of a dense CPU layer's fwd+bwd); grad_bias is undefined otherwise.
std::tuple<at::Tensor, at::Tensor> library_conv1d_backward_weight(const at::Tensor& grad_output,
                                                                  const at::Tensor& input, const Conv1dGeometry& g,
                                                                  bool with_bias);

// The correlation above on contiguous CPU tensors (float32/float64); bias may be undefined. It sums only the
// (position, tap) pairs that read inside the input: an infinite weight beside the padding makes no NaN (F.conv1d's
// input gradient does the same; its forward multiplies the padding on some backends and not on others).
// act: applied to each sum as it is stored, after adding the residual if correlate_cpu is given one
// (conv1d_bias_act's forward; the gradients' correlations take neither).
struct CorrelationShape {
  int64_t batch, in_channels, in_length, out_channels, kernel_size, out_length;
  int64_t stride, dilation, offset, groups;
  Activation act = Activation::kNone;
};
// end_to_end: whether short rows may be laid end to end (below); not for the per-phase calls of a strided layer's
// gradients, each of which would lay the whole grad_output again.
// residual: undefined, or contiguous and shaped as out.
// This and the weight-gradient kernels below are CPU kernels built per instruction set (common/cpu_isa.h), called
// through PYOPS_CPU_KERNEL or PYOPS_CPU_KERNEL_IF (conv1d_cpu.cpp).
PYOPS_DECLARE_CPU_KERNEL(void correlate_cpu(const at::Tensor& in, const at::Tensor& w, const at::Tensor& bias,
                                            const at::Tensor& residual, at::Tensor& out, const CorrelationShape& s,
                                            bool end_to_end))
// grad_weight[o, c, k] = sum_{n, j} gy[n, o, j] * x[n, g*Cg + c, j*stride + k*dilation + offset], and where
// grad_bias is defined grad_bias[o] = sum_{n, j} gy[n, o, j] from the same reads of gy; reduced over the batch in a
// fixed order whatever the thread count. x (N, C, L) contiguous. Short rows are laid end to end (below) at stride 1.
PYOPS_DECLARE_CPU_KERNEL(void correlate_weight_cpu(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight,
                                                   at::Tensor& grad_bias, int64_t stride, int64_t dilation,
                                                   int64_t offset, int64_t groups))
// The same weight sums for layers with many channels a group, as register-tiled products of grad_output by the
// transposed input (conv1d_cpu_weight_dense.cpp); gy (N, C_out, L_out) and x (N, C_in, L) contiguous, neither empty.
// A tap that reads padding multiplies its zeros by grad_output: where that holds an inf or NaN the sums can be NaN
// where those of the existing pairs are not (the caller checks). Its grad_bias: bias_gradient_cpu below.
PYOPS_DECLARE_CPU_KERNEL(void dense_weight_cpu(const at::Tensor& gy, const at::Tensor& x, at::Tensor& grad_weight,
                                               int64_t stride, int64_t padding, int64_t dilation, int64_t groups))

// Short rows on the CPU: rows much shorter than the kernels' vectors spend their time in per-row edges and loop
// overhead (N=1024 rows of 16: 3-7x slower than oneDNN), so below kShortRow positions the kernels lay the samples
// end to end, each padded with zeros so that no tap of one sample reaches another's values: a few long rows. Only
// where a sample's segment is at most about twice its outputs (worth_laying_end_to_end): a wide filter over a short
// output (one output of a 12-tap, dilation-12 filter) would compute and store a segment's worth per output.
// lay_end_to_end: t (N, C, L), contiguous, as (blocks, C, M * length) rows, M = ceil(N / blocks), sample b*M + m at
// [m*length + lead, m*length + lead + L) of row (b, c) and zeros elsewhere (and for the samples past N);
// take_end_to_end: out (N, C, count) = positions [m*length, m*length + count) of those rows. end_to_end_blocks:
// the number of such blocks (parallel work; a function of the batch only, so the sums' order is fixed).
constexpr int64_t kShortRow = 48;
at::Tensor lay_end_to_end(const at::Tensor& t, int64_t lead, int64_t length, int64_t blocks);
void take_end_to_end(const at::Tensor& rows, int64_t length, at::Tensor& out);
int64_t end_to_end_blocks(int64_t batch);
// (segment in 128 bits: computed from strides, paddings and dilations that may be near 2^62)
inline bool worth_laying_end_to_end(__int128 segment, int64_t outputs) { return segment <= 2 * outputs + 4; }
// Whether every element of t (contiguous) is finite: one pass (at::isfinite makes four).
bool all_finite(const at::Tensor& t);

// A strided layer's gradients on the CPU are stride-1 correlations on the phases of the input (conv1d_cpu.cpp,
// conv1d_cpu_weight.cpp): phase p of an (N, C, L) tensor is positions p, p + stride, ... of each row. Its phase slabs
// lay them out in one flat buffer of N*C*L values: the slab of phase p (p < phases()) holds t[:, :, p::stride], contiguous
// (N, C, phase_length(p)), after the slabs of the phases before it.
struct PhaseSlabs {
  int64_t batch, channels, length, stride;
  int64_t phases() const { return std::min(stride, length); }
  int64_t phase_length(int64_t p) const { return p < length ? (length - p + stride - 1) / stride : 0; }
  // (the phases before p hold p*(length / stride) positions, plus one each for those below length % stride)
  int64_t slab_offset(int64_t p) const {
    return batch * channels * (p * (length / stride) + std::min(p, length % stride));
  }
  at::Tensor slab(const at::Tensor& slabs, int64_t p) const;  // (N, C, phase_length(p)), a view
};
// t (N, C, L) as its phase slabs (one pass); and the reverse, out (N, C, L) contiguous from slabs (one pass).
at::Tensor split_phases(const at::Tensor& t, int64_t stride);
void merge_phases(const at::Tensor& slabs, int64_t stride, at::Tensor& out);

// How the CPU computes a weight gradient: our kernel, the library's (oneDNN's, or ATen's im2col GEMM on one small
// image), or one matrix product through ATen's BLAS (conv1d_cpu_gemm.cpp): as forced by conv1d_path() (gemm: float32
// and float64; half precision takes the library's), or under auto where each is fastest (cpu_weight_gradient_path).
// Our two kernels: correlate_weight_cpu (kDirect) and, for layers with several channels each way a group,
// dense_weight_cpu (kDense: dense_weight_gradient below, under direct and auto alike).
enum class WeightGradientPath { kDirect, kDense, kLibrary, kGemm };
bool dense_weight_gradient(const Conv1dGeometry& g, at::ScalarType dtype);
WeightGradientPath cpu_weight_gradient_path(const Conv1dGeometry& g, at::ScalarType dtype);
// grad_weight, and grad_bias when with_bias (from the same pass over grad_output; undefined otherwise).
// A pointwise layer's (below) on rows of >= 64 positions sums per-sample products instead of one product of copies.
// grad_bias (C_out) = grad_output summed over batch and positions, in an order fixed by the shape (row sums, then
// the batch in order); gy contiguous float32/float64 (N, C_out, L_out).
at::Tensor bias_gradient_cpu(const at::Tensor& gy, const Conv1dGeometry& g);
std::tuple<at::Tensor, at::Tensor> gemm_conv1d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                                               const Conv1dGeometry& g, bool with_bias);

// Pointwise layers (kernel 1, no padding, one group; any stride) on the CPU: the forward is a batch of matrix
// products out[n] = W (C_out, C_in) x[n][:, ::stride] (C_in, L_out), and the input gradient W^T gy[n] (zero between
// the strided reads), through ATen's BLAS (bmm); their weight gradient runs as above. Whether op runs so: forced by
// conv1d_path() (gemm: float32 and float64 layers), or under auto where bench/ shows it faster
// (pointwise_as_product, conv1d_cpu_gemm.cpp). bias (C_out) contiguous or undefined; weight (C_out, C_in, 1).
bool pointwise_as_product(const Conv1dGeometry& g, at::ScalarType dtype, Conv1dOp op);
// (forward: act(W x[n] + bias + residual); residual contiguous (N, C_out, L_out) or undefined)
at::Tensor gemm_pointwise_conv1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& residual, const Conv1dGeometry& g, Activation act);
// out = act(out + bias + residual) in one pass, out contiguous float32/float64 (N, C, L), bias (C) and residual
// (out's shape, contiguous) each undefined or of out's dtype.
void add_bias_residual_activate_cpu(at::Tensor& out, const at::Tensor& bias, const at::Tensor& residual,
                                    Activation act);
at::Tensor gemm_pointwise_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                         const Conv1dGeometry& g);

}  // namespace pyops
