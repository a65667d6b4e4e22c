// CPU kernels of linear_bias_act, and the product that conv2d_bias_act's 1×1 layers on 1×1 maps share with it:
// small batches by our weight-streaming kernel (small_batch_product_cpu.cpp), others by the library's product, the
// bias, residual and activation applied in one pass after it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/activation_cpu.h"
#include "common/onednn.h"
#include "ops/conv_bn_relu/conv_bn_relu.h"
#include "ops/conv_bn_relu/linear.h"

namespace pyops {

namespace {

// oneDNN's inner product (what inductor's CPU fusion calls for a Linear), reached through the dispatcher as ATen
// declares no C++ function for it; null on builds without oneDNN.
const c10::OperatorHandle* onednn_linear() {
  static const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op.has_value() ? &*op : nullptr;
}

// x·Wᵀ + bias by oneDNN's inner product (bias inside it), or undefined where there is none.
at::Tensor onednn_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const c10::OperatorHandle* op = onednn_linear();
  if (op == nullptr || !onednn_computes(x.scalar_type())) return at::Tensor();
  const c10::IValue b = bias.defined() ? c10::IValue(bias.contiguous()) : c10::IValue();
  torch::jit::Stack stack{x.contiguous(), w.contiguous(), b, std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), std::string("")};
  op->callBoxed(&stack);
  return stack.back().toTensor().contiguous();
}

// Where our kernel beats the library's product on an (m, k)·(k, n) product. µs, 2 threads, Zen 5 VM (stop 42;
// bench/NOTES-conv_bn_relu.md), ours / oneDNN's inner product / eager (MKL's addmm + ReLU): 25088→4096 (vgg's first
// classifier layer) at batch 1 9494 / 10724 / 14392, batch 8 14366 / 15121 / 30892, but batch 12 19157 / 16607;
// 16384→1024 at batch 8 2184 / 2653 / 4499, batch 12 3073 / 2931; 4096→4096 at batch 16 2913 / 3283 / 5937, batch 32
// 4552 / 3881. Small products at larger batches, where oneDNN's call costs ~12-20 µs whatever the size: 960→240 at
// batch 32 46 / 61 / 92, 512→1000 at batch 16 61 / 74 / 129, but at 32 121 / 116.
// Each output's dot product ends in a horizontal sum of its vector accumulators, a fixed cost per output that a short
// reduction does not amortize: with few inputs a library's GEMM (vectorized along the outputs) wins as soon as there
// are more than ~1024 outputs, and ours is ahead where the outputs are few for the reduction's length. Stop 43, 294
// shapes of 1-256 rows, 16-4096 inputs and 32-2048 outputs, µs as above: 16→512 at batch 8 12.6 / 14.1 / 5.0,
// 64→2048 at batch 8 28.6 / 23.9 / 24.2 but at batch 4 16.8 / 20.6 / 23.2, 64→64 at batch 100 14.9 / 19.8 / 10.6,
// 128→512 at batch 64 60.9 / 37.6 / 47.4, 256→128 at batch 128 39.7 / 35.0 / 44.0, but 256→128 at batch 64 21.8 /
// 24.6 / 24.9 and 1024→10 at batch 100 (the homework's last layer) 12.5 / 31.4 / 28.0. With the library's choice
// below, auto took 1.04x the fastest of the three (geomean, measured; on the three's timings the rule's choices cost
// 1.016x, stop 42's rule 1.19x, worst 8x), at worst 1.77x: 12-16 rows times weights of 1-8 MB, which the repeated
// calls kept in the L3 cache, where ours streams them faster (512→2048 at batch 12: 96 vs 165 µs); stop 42's fit, on
// weights read from memory, had oneDNN ahead there, and it decides.
bool small_batch_product_is_faster(int64_t m, int64_t n, int64_t k) {
  const double outputs = static_cast<double>(m) * n;
  if (outputs <= 1024) return true;
  if (k < std::max<int64_t>(64, 16 * std::min<int64_t>(m, 8))) return false;
  return m <= 8 || (outputs * k <= double(1 << 23) && outputs <= 64.0 * k);
}

// Where the library's product is oneDNN's inner product rather than MKL's GEMM: where MKL runs narrower (AVX2 code
// on AMD CPUs with AVX-512, common/onednn.h), except on products small enough for oneDNN's fixed ~12 µs a call to
// decide: up to 2^21 multiply-adds and 2^15 outputs MKL was ahead or even on the 294 shapes above (16→2048 at batch
// 16 18.0 vs 27.9 µs, 64→512 at batch 64 35.1 vs 33.8), beyond that behind (16→2048 at batch 32 58.4 vs 35.0).
bool onednn_product_is_faster(int64_t m, int64_t n, int64_t k) {
  const double outputs = static_cast<double>(m) * n;
  return !blas_runs_full_width() && (outputs * k > double(1 << 21) || outputs > double(1 << 15));
}

}  // namespace

at::Tensor linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& residual, Activation act) {
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && x.dim() == 2 && weight.dim() == 2 &&
                        identity_or_clamp(act));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const ConvPath path = requested_conv_path();
  const bool ours = path == ConvPath::kDirect || (path == ConvPath::kAuto && small_batch_product_is_faster(m, n, k));
  at::Tensor out, added_bias = bias;
  if (ours || m == 0 || n == 0 || k == 0) {
    out = at::empty({m, n}, x.options());
    if (out.numel() > 0) {
      const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
      const at::Tensor w = weight.contiguous();
      PYOPS_CPU_KERNEL(small_batch_product_cpu)(rows.const_data_ptr<float>(), rows.stride(0), m,
                                                w.const_data_ptr<float>(), n, k, out.mutable_data_ptr<float>());
    }
  } else {
    // MKL's GEMM runs AVX2 code on AMD CPUs with AVX-512 (common/onednn.h), 2-2.5x slower than oneDNN's inner
    // product there (16384→1024 at batch 100, the homework's Linear: 19295 vs 8501 µs, stop 42).
    out = onednn_product_is_faster(m, n, k) ? onednn_product(x, weight, bias) : at::Tensor();
    if (!out.defined()) {  // (contiguous operands, as oneDNN's: the same bits whatever x's and weight's strides)
      const at::Tensor rows = x.contiguous(), wt = weight.contiguous().t();
      out = bias.defined() ? at::addmm(bias, rows, wt) : at::mm(rows, wt);
    }
    added_bias = at::Tensor();
  }
  const at::Tensor b = added_bias.defined() ? added_bias.contiguous() : at::Tensor();
  const at::Tensor r = residual.defined() ? residual.contiguous() : at::Tensor();
  bias_residual_activate(out.mutable_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                         r.defined() ? r.const_data_ptr<float>() : nullptr, m, n, /*bias_per_row=*/false, n, act);
  return out;
}

namespace {

at::Tensor linear_bias_act_cpu(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t activation) {
  const Activation act = check_linear_bias_act_args(input, weight, bias, activation);
  if (input.scalar_type() != at::kFloat) return linear_bias_act_aten(input, weight, bias, activation);
  // SiLU, Hardswish, Hardsigmoid, Sigmoid: the product, then ATen's activation in place (common/activation.h).
  if (!identity_or_clamp(act)) {
    return activation_aten(linear_bias_act_cpu(input, weight, bias, static_cast<int64_t>(Activation::kNone)), act,
                           /*in_place=*/true);
  }
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end() - 1);
  const int64_t m = c10::multiply_integers(out_shape);
  out_shape.push_back(weight.size(0));
  const at::Tensor rows = input.reshape({m, weight.size(1)});
  return linear_forward_cpu(rows, weight, bias.has_value() ? *bias : at::Tensor(), at::Tensor(), act)
      .view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { m.impl("linear_bias_act", &linear_bias_act_cpu); }

}  // namespace pyops
