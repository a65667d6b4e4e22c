// The fused convolutions' activation on a vector of CPU results, shared by the direct kernel's epilogue and the
// GEMM paths' pass after MKL: NaN stays NaN (at::vec::maximum/minimum propagate it), as torch.relu and F.relu6 keep
// it. CPU only (at::vec), so apart from conv_bn_relu.h, which the CUDA sources include too.
#pragma once

#include "common/cpu_vec.h"
#include "ops/conv_bn_relu/conv_bn_relu.h"

namespace pyops {

template <typename acc>
inline Vectorized<acc> activate(Vectorized<acc> v, Activation act) {
  if (act == Activation::kNone) return v;
  v = at::vec::maximum(v, Vectorized<acc>(acc(0)));
  return act == Activation::kRelu6 ? at::vec::minimum(v, Vectorized<acc>(acc(6))) : v;
}

}  // namespace pyops
