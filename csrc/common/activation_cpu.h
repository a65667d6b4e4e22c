// A fused convolution's activation on CPU results, a vector or one value, shared by the kernels' epilogues and the
// passes after a library call: NaN stays NaN (at::vec::maximum/minimum propagate it; the scalar form's comparisons
// are false for it), as torch.relu and F.relu6 keep it. CPU only (at::vec), apart from common/activation.h, which
// CUDA sources include too.
#pragma once

#include "common/activation.h"
#include "common/cpu_vec.h"

namespace pyops {

template <typename acc>
inline Vectorized<acc> activate(Vectorized<acc> v, Activation act) {
  if (act == Activation::kNone) return v;
  v = at::vec::maximum(v, Vectorized<acc>(acc(0)));
  return act == Activation::kRelu6 ? at::vec::minimum(v, Vectorized<acc>(acc(6))) : v;
}

template <typename T>
inline T activate(T v, Activation act) {
  if (act == Activation::kNone) return v;
  v = v < T(0) ? T(0) : v;
  return act == Activation::kRelu6 && v > T(6) ? T(6) : v;
}

}  // namespace pyops
