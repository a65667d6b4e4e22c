// conv1d on the CPU as matrix products through ATen's BLAS (MKL). Pointwise layers (pointwise_as_product, below) are
// products outright: forward and input gradient a batch of per-sample ones, the weight gradient their sum.
// grad_weight of other layers is one matrix product, the batch and positions its reduction:
//   grad_weight[o, (c, t)] = sum over (n, l) of grad_output[n, o, l] * input[n, c, l*stride + t*dilation - padding],
// per group a (C_out/groups, P) x (P, C_in/groups * K) product, P = N * L_out, from grad_output with the channel
// first and the input's columns (im2col: one row per (channel, tap), zero where the tap reads padding). One deep
// product instead of a batch of per-sample ones: MKL blocks it well whatever the row length (the per-tap batched
// GEMMs it replaced were 2-4x slower on short rows: 64 x 178->106 k5 stride 2 on 8 positions 1.80 vs 0.51 ms).
// Where it runs instead of our kernel or oneDNN's is cpu_weight_gradient_path (bench/NOTES-conv1d.md).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/activation_cpu.h"
#include "common/cpu_vec.h"
#include "common/onednn.h"
#include "ops/conv1d/conv1d.h"
#include "ops/conv1d/conv1d_cpu_util.h"

namespace pyops {
namespace {

// cols (C_in * K, count * L_out): row (c, t) holds, for samples n0 .. n0 + count - 1 in turn, the input value that
// tap t reads at each output position, zero where it reads padding; x contiguous (N, C_in, L).
template <typename T>
void lay_columns(const T* x, const Conv1dGeometry& g, int64_t n0, int64_t count, T* cols) {
  const int64_t k = g.kernel_size, lo = g.out_length;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, count * lo));
  at::parallel_for(0, g.in_channels * k, grain, [&](int64_t begin, int64_t end) {
    for (int64_t ct = begin; ct < end; ++ct) {
      const int64_t c = ct / k, t = ct % k, shift = t * g.dilation - g.padding;
      const TapRange r = tap_range(shift, g.stride, g.in_length, 0, lo);
      const int64_t a = std::min(r.lo, lo), b = std::min(r.hi, lo);  // (a tap reading only padding: a = b)
      for (int64_t n = 0; n < count; ++n) {
        const T* src = x + ((n0 + n) * g.in_channels + c) * g.in_length + shift;
        T* dst = cols + (ct * count + n) * lo;
        // (plain loops: rows may be a few values long, where a call to memmove per row costs more than the copy)
        for (int64_t l = 0; l < a; ++l) dst[l] = T(0);
        if (g.stride == 1) {
          for (int64_t l = a; l < b; ++l) dst[l] = src[l];
        } else {
          for (int64_t l = a; l < b; ++l) dst[l] = src[l * g.stride];
        }
        for (int64_t l = b; l < lo; ++l) dst[l] = T(0);
      }
    }
  });
}

// gyt (C_out, count * L_out) = grad_output[n0 .. n0 + count) with the channel first; gy contiguous. With row_sums,
// also each copied row's sum, row_sums[o * count + n] (the bias gradient's terms, in the same pass over grad_output).
// Without gyt, only the sums.
template <typename T>
void channels_first(const T* gy, const Conv1dGeometry& g, int64_t n0, int64_t count, T* gyt, T* row_sums) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t lo = g.out_length;
  at::parallel_for(0, g.out_channels * count, std::max<int64_t>(1, 4096 / lo), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row / count, n = row % count;
      const T* src = gy + ((n0 + n) * g.out_channels + o) * lo;
      T* dst = gyt == nullptr ? nullptr : gyt + row * lo;
      Vec sum(T(0));
      int64_t l = 0;
      for (; l + V <= lo; l += V) {
        const Vec v = Vec::loadu(src + l);
        if (dst != nullptr) v.store(dst + l);
        sum = sum + v;
      }
      T tail = 0;
      for (; l < lo; ++l) {
        tail += src[l];
        if (dst != nullptr) dst[l] = src[l];
      }
      if (row_sums != nullptr) row_sums[row] = hsum(sum) + tail;
    }
  });
}

// grad_bias[o] += sum over n of sums[o * count + n], in that order (whatever the thread count).
template <typename T>
void add_row_sums(const T* sums, int64_t channels, int64_t count, T* grad_bias) {
  for (int64_t o = 0; o < channels; ++o) {
    for (int64_t n = 0; n < count; ++n) grad_bias[o] += sums[o * count + n];
  }
}

bool product_dtype(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kDouble; }

// Columns of at most 2^22 values a chunk (16 MB in float32).
constexpr int64_t kColumnBudget = int64_t{1} << 22;

// Pointwise weight gradients from rows of at least this many positions sum per-sample products of grad_output and
// the input as they lie (no copies); shorter rows make one product of copies (lay_columns, channels_first).
constexpr int64_t kPerSampleRow = 64;

bool is_pointwise(const Conv1dGeometry& g) { return g.kernel_size == 1 && g.padding == 0 && g.groups == 1; }

// Whether a weight gradient sums per-sample products (per_sample_weight_gradient): what auto takes for such layers
// and how the product path computes them, whoever chose it.
bool sums_per_sample_products(const Conv1dGeometry& g) { return is_pointwise(g) && g.out_length >= kPerSampleRow; }

// x[:, :, ::stride] (the positions a pointwise layer reads), as bmm takes it: x itself at stride 1
at::Tensor read_positions(const at::Tensor& x, const Conv1dGeometry& g) {
  return g.stride == 1 ? x : x.slice(2, 0, x.size(2), g.stride).contiguous();
}

// Pointwise layers (kernel 1, one group, no padding) into at most 4/3 as many outputs as inputs, from >= 1000
// positions (batch x output length), under 2^23 input values and from 4M multiply-adds, where MKL runs narrower than
// oneDNN (AMD AVX-512, where no per-sample products take them): oneDNN's weight gradient, which reads the input as
// it lies, beats our tiled product, whose transposed input (a pass over the input for cout multiply-adds an
// element) costs more than that. Stop 39, Zen 5, 2 threads, µs ours vs oneDNN: 96->32 on 32 x 1000 2069 vs 958,
// 512->128 on 32 x 200 3518 vs 2211, QuartzNet's 256->256 on 8 x 400 1307 vs 1164; but with many outputs a value
// ours (32->320 on 32 x 2000 7451 vs 29526), on larger inputs (1024->64 on 16 x 1000 13496 vs 25822) and where
// oneDNN's ~50 µs call is most of it (32->32 on 64 x 20 38 vs 67). 120 random pointwise layers (16-1024 channels
// each way, batch 1-32, 50-2000 positions), the chosen path's time over the faster of the two, geomean: ours
// everywhere 1.11, this rule 1.02 (worst 1.58); 120 more, held out, strides 1 and 2: 1.11 and 1.03.
bool pointwise_weight_gradient_is_onednns(const Conv1dGeometry& g, at::ScalarType dtype) {
  const int64_t positions = g.batch * g.out_length;
  return dtype == at::kFloat && is_pointwise(g) && !blas_runs_full_width() && 4 * g.in_channels >= 3 * g.out_channels &&
         positions >= 1000 && g.batch * g.in_channels * g.in_length < (int64_t{1} << 23) &&
         positions * g.in_channels * g.out_channels >= (int64_t{1} << 22);
}

}  // namespace

// Stop 37 (bench/NOTES-conv1d.md): our tiled product (dense_weight_cpu) for float32 and float64 layers of 1-4 groups
// (the sweeps' range: 8 groups of 128->64 k5 on 2 positions 254 vs oneDNN 159 us) of >= 8 input and >= 8 output
// channels a group with >= 12 outputs x taps: fewer, and the transposed input costs more than the
// products it feeds (40->8 k1 on 8 x 2323: 169 vs 72 us with correlate_weight_cpu). 160 random such layers on the
// Zen 5 VM (1-4 groups, 8-512 channels, k 1-9, strides 1-3, dilation 1-2, 1M-300M multiply-adds): the tiled product
// fastest on most, the rule's choice 1.02 geomean over the fastest of it, correlate_weight_cpu and oneDNN's
// (oneDNN's alone 1.56, correlate_weight_cpu's 2.81; the dense TCN's 128->128 k3 on 4 x 1024 0.91 vs oneDNN 1.05 ms).
// In AVX2 builds against oneDNN capped at AVX2 and MKL (AVX2 here) on 120 more: 1.02 (oneDNN 1.50, MKL 1.51).
// (and padding no wider than the input: the transposed input holds the padded positions, at most 3x its rows)
bool dense_weight_gradient(const Conv1dGeometry& g, at::ScalarType dtype) {
  const int64_t in = g.in_per_group(), out = g.out_per_group();
  return product_dtype(dtype) && g.groups <= 4 && in >= 8 && out >= 8 &&
         out * g.kernel_size >= 12 && g.padding <= g.in_length;
}

// Stop 30 (bench/NOTES-conv1d.md): 1500 random layers (batch 1-64, 4-256 channels, k 1-11, stride 1-3, dilation
// 1-2, groups 1-4, 1 and 2 threads, Intel Sapphire Rapids) timed on each path, half to fit the rule, half held out.
// The product was the fastest of four paths (ours, oneDNN's, it, the per-tap GEMMs it replaced) on 747 layers,
// ours on 432, oneDNN's on 126. It takes two regions from the others:
// - from our kernel, rows of < 128 positions into >= 4 outputs from >= 8 columns (channels x taps) a group: ours
//   reduces along each row in vectors and pays each row's edges and tail (training batches of short clips; the
//   keyword-spotting CNN's 40->64 k3 on 32 x 101 positions: 0.31 vs ours 0.83 ms); longer rows, and fewer outputs
//   or columns (depthwise, single-channel layers), stay ours;
// - from oneDNN's (where conv1d_use_library sends the weight gradient), all but few outputs from long reductions
//   (< 48 outputs from >= 384 columns: there the columns cost more than the product they feed; 7 outputs from 2214
//   columns 5.1 vs oneDNN 2.1 ms), on rows of < 512 positions or into >= 2^19 weights a group: on longer rows
//   oneDNN's was as fast or faster below (the TCN's 128->128 k3 on 4 x 1024: 1.85 vs 1.74 ms; 256->256 0.98x;
//   64->64 0.85x) and slower above (512->512 k3 on 4 x 1024: 21.4 vs 24.3 ms; wav2vec2's 512->512 k3 stride 2 on 8
//   clips: 68 vs 84 ms).
// Not on one small image (ATen's own im2col GEMM, which oneDNN's place holds there, was as fast or faster) nor with
// more than 4 groups (not swept: 8 groups of 128->64 on 2 positions 0.49 vs oneDNN 0.28 ms). On 900 more layers
// with the final build, the chosen path's time over the fastest of the three: geomean 1.08 (the previous rule 1.36),
// total 1.15 (1.29). Applied where MKL runs as wide as oneDNN: AVX2 CPUs (Zen 3, 2026-11: the per-tap GEMMs beat
// oneDNN's on every dense layer tried, 1.04-1.40x) and Intel AVX-512 ones; not on AMD AVX-512 ones, where MKL stays
// on AVX2 (Zen 4 0.83-0.96x, Zen 5 0.55x oneDNN's speed with the per-tap GEMMs). float64 too (where ATen's library
// path is its own im2col convolution, oneDNN having none): 240 random float64 layers, this rule fitted on float32
// scored 1.11 geomean / 1.13 total over the fastest path, stop 29's 1.50 / 1.38 (the product fastest on 152).
// Stop 37: the tiled product (dense_weight_cpu) came after; in its region it replaces all three.
WeightGradientPath cpu_weight_gradient_path(const Conv1dGeometry& g, at::ScalarType dtype) {
  const bool gemm_dtype = product_dtype(dtype);  // (half: computed in float32 or oneDNN's)
  const bool dense = dense_weight_gradient(g, dtype);
  switch (conv1d_path()) {
    case Conv1dPath::kDirect: return dense ? WeightGradientPath::kDense : WeightGradientPath::kDirect;
    case Conv1dPath::kLibrary: return WeightGradientPath::kLibrary;
    case Conv1dPath::kGemm: return gemm_dtype ? WeightGradientPath::kGemm : WeightGradientPath::kLibrary;
    case Conv1dPath::kAuto: break;
  }
  // (except pointwise layers' per-sample products where MKL runs as wide as oneDNN: fitted on Intel, stop 31, where
  // the tiled product is unmeasured)
  const bool per_sample = gemm_dtype && blas_runs_full_width() && sums_per_sample_products(g);
  if (pointwise_weight_gradient_is_onednns(g, dtype)) return WeightGradientPath::kLibrary;
  if (dense && !per_sample) return WeightGradientPath::kDense;
  const bool library = conv1d_use_library(g, Conv1dOp::kBackwardWeight, /*cuda=*/false);
  const WeightGradientPath otherwise = library ? WeightGradientPath::kLibrary : WeightGradientPath::kDirect;
  const double outputs = g.out_per_group(), columns = double(g.in_per_group()) * g.kernel_size;
  // (the region the product takes from our kernel, below)
  const bool short_rows = !library && !aten_takes_im2col(g) && g.groups <= 4 && g.out_length < 128 &&
                          outputs >= 4 && columns >= 8;
  if (!gemm_dtype || !blas_runs_full_width()) {
    // Without the product (MKL narrower than oneDNN: AMD AVX-512 CPUs), oneDNN's weight gradient takes that region's
    // larger float32 layers: >= 8 outputs from >= 64 columns, >= 2^20 multiply-adds. Stop 34, Zen 5, 450 random
    // layers of the region (1-4 groups, 4-127 positions, strides 1-3), the chosen path's time over the faster of the
    // two: geomean 1.03, worst 2.7x (ours everywhere, the rule before: 1.09, worst 5.4x; the keyword-spotting CNN's
    // 40->64 k3 on 32 x 101 positions: ours 0.59 ms, oneDNN's 0.23 ms).
    const bool larger = dtype == at::kFloat && outputs >= 8 && columns >= 64 &&
                        double(g.batch) * g.out_channels * columns * g.out_length >= double(1 << 20);
    return short_rows && larger ? WeightGradientPath::kLibrary : otherwise;
  }
  if (sums_per_sample_products(g)) return WeightGradientPath::kGemm;  // (see pointwise_as_product)
  if (aten_takes_im2col(g) || g.groups > 4 ||
      double(g.in_channels) * g.kernel_size * g.out_length > kColumnBudget) {
    return otherwise;
  }
  const bool gemm = library ? (outputs >= 48 || columns < 384) && (g.out_length < 512 || outputs * columns >= 524288)
                            : short_rows;
  return gemm ? WeightGradientPath::kGemm : otherwise;
}

namespace {

// A pointwise layer's weight gradient as the sum of the per-sample products gy[n] (C_out, L_out) x[n]^T (L_out,
// C_in), in batch order; the bias gradient from one pass of row sums over grad_output.
std::tuple<at::Tensor, at::Tensor> per_sample_weight_gradient(const at::Tensor& gy, const at::Tensor& input,
                                                              const Conv1dGeometry& g, bool with_bias) {
  const at::Tensor x = read_positions(input, g);
  at::Tensor grad = at::zeros({g.out_channels, g.in_channels}, gy.options());
  for (int64_t n = 0; n < g.batch; ++n) grad.addmm_(gy[n], x[n].t());
  return {grad.view({g.out_channels, g.in_channels, 1}), with_bias ? bias_gradient_cpu(gy, g) : at::Tensor()};
}

}  // namespace

at::Tensor bias_gradient_cpu(const at::Tensor& gy, const Conv1dGeometry& g) {
  at::Tensor grad_bias = at::zeros({g.out_channels}, gy.options());
  const at::Tensor sums = at::empty({g.out_channels * g.batch}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "pyops_conv1d_bias_gradient", [&] {
    // (the rows in channel-first order, as channels_first numbers them)
    channels_first(gy.const_data_ptr<scalar_t>(), g, 0, g.batch, static_cast<scalar_t*>(nullptr),
                   sums.mutable_data_ptr<scalar_t>());
    add_row_sums(sums.const_data_ptr<scalar_t>(), g.out_channels, g.batch, grad_bias.mutable_data_ptr<scalar_t>());
  });
  return grad_bias;
}

std::tuple<at::Tensor, at::Tensor> gemm_conv1d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                                               const Conv1dGeometry& g, bool with_bias) {
  const int64_t cg = g.in_per_group(), og = g.out_per_group(), k = g.kernel_size, lo = g.out_length;
  const at::Tensor gy = grad_output.contiguous();
  if (sums_per_sample_products(g)) return per_sample_weight_gradient(gy, input, g, with_bias);
  const at::Tensor x = input.contiguous();
  at::Tensor grad = at::zeros({g.out_channels, cg * k}, input.options());
  // Chunks of the batch bound the columns; the chunking depends on the shape only and the chunks are summed in
  // order (no atomics), so at a fixed thread count the result is the same on every run (the bias gradient, summed in
  // a fixed order by us, at any thread count).
  const int64_t chunk = std::clamp<int64_t>(kColumnBudget / (g.in_channels * k * lo), 1, g.batch);
  const at::Tensor cols_buffer = at::empty({g.in_channels * k * chunk * lo}, input.options());
  const at::Tensor gyt_buffer = at::empty({g.out_channels * chunk * lo}, input.options());
  const at::Tensor sums_buffer = at::empty({with_bias ? g.out_channels * chunk : 0}, input.options());
  at::Tensor grad_bias = with_bias ? at::zeros({g.out_channels}, input.options()) : at::Tensor();
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t count = std::min(chunk, g.batch - n0);
    // (a shorter last chunk: the buffers' first values as contiguous (rows, count * L_out) matrices)
    const int64_t width = count * lo;
    const at::Tensor rows = cols_buffer.narrow(0, 0, g.in_channels * k * width).view({g.in_channels * k, width});
    const at::Tensor dy = gyt_buffer.narrow(0, 0, g.out_channels * width).view({g.out_channels, width});
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyops_conv1d_gemm_weight", [&] {
      lay_columns(x.const_data_ptr<scalar_t>(), g, n0, count, rows.mutable_data_ptr<scalar_t>());
      scalar_t* sums = with_bias ? sums_buffer.mutable_data_ptr<scalar_t>() : nullptr;
      channels_first(gy.const_data_ptr<scalar_t>(), g, n0, count, dy.mutable_data_ptr<scalar_t>(), sums);
      if (sums != nullptr) add_row_sums(sums, g.out_channels, count, grad_bias.mutable_data_ptr<scalar_t>());
    });
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      grad.narrow(0, grp * og, og).addmm_(dy.narrow(0, grp * og, og), rows.narrow(0, grp * cg * k, cg * k).t());
    }
  }
  return {grad.view({g.out_channels, cg, k}), grad_bias};
}

// Pointwise layers (stop 31, bench/NOTES-conv1d.md): 182 random ones (batch 1-64, 8-1024 channels, 8-5800
// positions, 1 and 2 threads, Intel Sapphire Rapids) timed as products and as they ran before (our kernels, oneDNN,
// the weight gradient's paths above), the chosen time over the fastest: forward 1.41 before, 1.03 now (geomean);
// input gradient 1.93, 1.00; weight gradient 1.24, 1.11. oneDNN converts a pointwise layer's input and output to its
// blocked layout and back, which costs as much as the product itself; the input gradient is the product of the
// transposed weight, fastest on 177 of the 182 layers. The forward's products lose to our kernel only on short
// reductions (< 16 input channels), the weight gradient's per-sample products (no copies) to one product of copies
// on rows of < 64 positions (kPerSampleRow; there cpu_weight_gradient_path's general rule decides). On the final
// build (237 more layers, 73 of them at stride 2), the chosen path over the fastest: 1.03 / 1.03 / 1.08 (before:
// 1.44 / 1.87 / 1.25 on the stride-1 ones).
bool pointwise_as_product(const Conv1dGeometry& g, at::ScalarType dtype, Conv1dOp op) {
  if (!is_pointwise(g) || !product_dtype(dtype) || g.batch * g.out_length == 0) return false;
  switch (conv1d_path()) {
    case Conv1dPath::kGemm: return true;
    case Conv1dPath::kAuto: break;
    default: return false;
  }
  if (!blas_runs_full_width()) return false;
  return op != Conv1dOp::kForward || g.in_channels >= 16;
}

at::Tensor gemm_pointwise_conv1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& residual, const Conv1dGeometry& g, Activation act) {
  // bmm with the weight broadcast over the batch: one product a sample, MKL's batched call spreading them
  const at::Tensor w = weight.reshape({g.out_channels, g.in_channels});
  at::Tensor out = at::bmm(w.expand({g.batch, g.out_channels, g.in_channels}), read_positions(input, g));
  add_bias_residual_activate_cpu(out, bias, residual, act);
  return out;
}

void add_bias_residual_activate_cpu(at::Tensor& out, const at::Tensor& bias, const at::Tensor& residual,
                                    Activation act) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "pyops_conv1d_bias_residual_act", [&] {
    bias_residual_activate(out.mutable_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                           residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
                           out.size(0) * out.size(1), out.size(2), /*bias_per_row=*/true, out.size(1), act);
  });
}

at::Tensor gemm_pointwise_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                         const Conv1dGeometry& g) {
  const at::Tensor wt = weight.reshape({g.out_channels, g.in_channels}).t();
  const at::Tensor products = at::bmm(wt.expand({g.batch, g.in_channels, g.out_channels}), grad_output);
  if (g.stride == 1) return products;
  // (positions between the strided reads get no gradient)
  at::Tensor grad_input = at::zeros({g.batch, g.in_channels, g.in_length}, grad_output.options());
  grad_input.slice(2, 0, g.in_length, g.stride).copy_(products);
  return grad_input;
}

}  // namespace pyops
