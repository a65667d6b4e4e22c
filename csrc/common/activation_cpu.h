// A fused convolution's activation on CPU results, a vector or one value, shared by the kernels' epilogues and the
// passes after a library call: ReLU and ReLU6 (the other activations run as a pass after the convolution, see
// identity_or_clamp in common/activation.h); NaN stays NaN and -0 stays -0 (below; the scalar form's comparisons are
// false for both), as torch.relu and F.relu6 keep them. CPU only (at::vec), apart from common/activation.h, which
// CUDA sources include too.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common/activation.h"
#include "common/cpu_vec.h"

namespace pyops {

// The activation known at compile time (a kernel's tiles compiled per activation). clamp_min(v, 0) is max(0, v)
// with v as the instruction's second operand, which x86 returns where either is NaN (and for -0, as torch.relu
// gives): one instruction per vector, where at::vec::maximum adds a NaN test and a blend (a depthwise k4
// conv1d_bias_act's ReLU cost 25 % of the layer with those).
template <Activation Act, typename acc>
inline Vectorized<acc> activate(Vectorized<acc> v) {
  static_assert(Act == Activation::kNone || Act == Activation::kRelu || Act == Activation::kRelu6);
  if constexpr (Act == Activation::kNone) return v;
  v = at::vec::clamp_min(v, Vectorized<acc>(acc(0)));
  if constexpr (Act == Activation::kRelu6) v = at::vec::clamp_max(v, Vectorized<acc>(acc(6)));
  return v;
}

// The same, chosen at run time (passes over a whole output, where the test per vector costs nothing).
template <typename acc>
inline Vectorized<acc> activate(Vectorized<acc> v, Activation act) {
  if (act == Activation::kNone) return v;
  return act == Activation::kRelu6 ? activate<Activation::kRelu6>(v) : activate<Activation::kRelu>(v);
}

template <typename T>
inline T activate(T v, Activation act) {
  if (act == Activation::kNone) return v;
  v = v < T(0) ? T(0) : v;
  return act == Activation::kRelu6 && v > T(6) ? T(6) : v;
}

// (A pass's rows, compiled per kind of bias, residual and activation: with those tested per vector the pass ran at
// a third of ATen's relu_ speed, 34 vs 13 µs after a 256×2048 product, stop 43.)
enum class BiasKind { kNone, kPerRow, kPerColumn };

template <typename T, BiasKind Bias, bool Residual, Activation Act>
void bias_residual_activate_rows(T* out, const T* bias, const T* residual, int64_t begin, int64_t end, int64_t cols,
                                 int64_t channels) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  for (int64_t r = begin; r < end; ++r) {
    T* row = out + r * cols;
    const T* res = Residual ? residual + r * cols : nullptr;
    const Vec row_bias(Bias == BiasKind::kPerRow ? bias[r % channels] : T(0));
    const auto step = [&](int64_t i, int64_t n) {
      Vec sum = Vec::loadu(row + i, n);
      // (no + 0 where there is no bias: -0 + 0 is +0)
      if constexpr (Bias == BiasKind::kPerRow) sum = sum + row_bias;
      if constexpr (Bias == BiasKind::kPerColumn) sum = sum + Vec::loadu(bias + i, n);
      if constexpr (Residual) sum = sum + Vec::loadu(res + i, n);
      activate<Act>(sum).store(row + i, n);
    };
    int64_t i = 0;
    for (; i + V <= cols; i += V) step(i, V);
    if (i < cols) step(i, cols - i);
  }
}

// out = act(out + bias [+ residual]) on a convolution's result of `rows` rows of `cols` values, in place and in one
// pass (each ATen op a pass of its own: the bias add and ReLU after 64→64 on 56×56 at batch 8 took 240 of the call's
// 784 µs). bias_per_row: a row is one channel of one sample (row r is channel r % channels), else a row holds one
// position's channels (channels_last). bias, residual: null or their values; residual the same rows in the same
// order. Adds in the order ((out + bias) + residual), the order of a convolution's output plus a residual added
// after it. Shared by the fused 2-D paths after MKL or oneDNN and conv1d_bias_act's passes.
template <typename T>
void bias_residual_activate(T* out, const T* bias, const T* residual, int64_t rows, int64_t cols, bool bias_per_row,
                            int64_t channels, Activation act) {
  if (!bias && !residual && act == Activation::kNone) return;  // (a pass over a cold output costs ~1/3 of the GEMM)
  TORCH_INTERNAL_ASSERT(identity_or_clamp(act), "bias_residual_activate: the other activations are ATen's passes");
  const BiasKind kind = !bias ? BiasKind::kNone : bias_per_row ? BiasKind::kPerRow : BiasKind::kPerColumn;
  const auto with_bias = [&](auto bias_kind, auto has_residual) {
    constexpr BiasKind B = decltype(bias_kind)::value;
    constexpr bool R = decltype(has_residual)::value;
    return act == Activation::kNone    ? bias_residual_activate_rows<T, B, R, Activation::kNone>
           : act == Activation::kRelu6 ? bias_residual_activate_rows<T, B, R, Activation::kRelu6>
                                       : bias_residual_activate_rows<T, B, R, Activation::kRelu>;
  };
  const auto with_residual = [&](auto bias_kind) {
    return residual ? with_bias(bias_kind, std::true_type()) : with_bias(bias_kind, std::false_type());
  };
  using None = std::integral_constant<BiasKind, BiasKind::kNone>;
  using PerRow = std::integral_constant<BiasKind, BiasKind::kPerRow>;
  using PerColumn = std::integral_constant<BiasKind, BiasKind::kPerColumn>;
  const auto rows_fn = kind == BiasKind::kNone     ? with_residual(None())
                       : kind == BiasKind::kPerRow ? with_residual(PerRow())
                                                   : with_residual(PerColumn());
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    rows_fn(out, bias, residual, begin, end, cols, channels);
  });
}

}  // namespace pyops
