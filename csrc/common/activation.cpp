// activation_aten (common/activation.h): the fused activations as ATen ops, for the composites autograd
// differentiates and the passes after library convolutions that cannot fuse them.
#include "common/activation.h"

#include <ATen/ATen.h>

namespace pyops {

at::Tensor activation_aten(const at::Tensor& y, Activation act, bool in_place) {
  at::Tensor out = y;  // (a handle: the in-place ops below write y's storage)
  switch (act) {
    case Activation::kNone: return y;
    case Activation::kRelu: return in_place ? out.relu_() : at::relu(y);
    // (clamp_ keeps NaN, as F.relu6's hardtanh does)
    case Activation::kRelu6: return in_place ? out.clamp_(0, 6) : at::hardtanh(y, 0, 6);
    case Activation::kSilu: return in_place ? at::silu_(out) : at::silu(y);
    case Activation::kHardswish: return in_place ? at::hardswish_(out) : at::hardswish(y);
    case Activation::kHardsigmoid: return in_place ? at::hardsigmoid_(out) : at::hardsigmoid(y);
    case Activation::kSigmoid: return in_place ? out.sigmoid_() : at::sigmoid(y);
  }
  TORCH_CHECK(false, "activation_aten: unknown activation ", static_cast<int64_t>(act));
}

}  // namespace pyops
