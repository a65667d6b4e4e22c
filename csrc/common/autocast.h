// Autocast kernels for our ops: inside a torch.autocast region an op's floating tensor arguments may arrive in
// different dtypes (a float32 weight meets the float16 output of a layer autocast already ran), which the kernels,
// like ATen's, refuse. The kernel below casts them to one dtype first, as autocast does for F.conv2d, then
// redispatches below autocast (autograd records the casts). The dtype, by policy:
//   kConvolution (conv1d, conv2d_*, sliding_head): the region's dtype (torch.get_autocast_dtype), as for F.conv2d,
//     on CUDA (every CUDA kernel of ours takes fp16 and bf16) and on a CPU where oneDNN computes that dtype natively
//     (bfloat16 with AVX-512 BF16 / AMX: common/onednn.h; a fused resnet18 in a bf16 region ran 0.84x eager in
//     float32); elsewhere on the CPU float32, the dtype our CPU paths compute half precision in anyway: the result
//     is float32, as for autocast's own "float32 ops".
//   kFloat32 (smooth_max): float32 on both, as autocast runs torch.logsumexp, which smooth_max scales.
// float64 is never cast (autocast's rule), so a float64 call stays exact. BatchNorm statistics and affine parameters
// (arguments named running_* and bn_*) keep their dtype: conv_bn_fold reads any floating dtype and folds in float64,
// and rounding them to half precision first would only lose digits.
// One boxed kernel serves every op (it walks the schema), registered per op beside its other kernels:
//   TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) { m.impl("conv1d", autocast_kernel<c10::DeviceType::CPU>()); }
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string_view>
#include <vector>

#include "common/onednn.h"

namespace pyops {

inline bool autocast_keeps_dtype(const c10::Argument& arg) {
  const std::string_view name = arg.name();
  return name.substr(0, 8) == "running_" || name.substr(0, 3) == "bn_";
}

enum class AutocastPolicy { kConvolution, kFloat32 };

template <c10::DeviceType kDevice, AutocastPolicy kPolicy>
void autocast_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const at::ScalarType region = at::autocast::get_autocast_dtype(kDevice);
  const at::ScalarType target =
      kPolicy == AutocastPolicy::kConvolution && (kDevice != c10::DeviceType::CPU || onednn_computes(region))
          ? region
          : at::kFloat;
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    if (autocast_keeps_dtype(args[i])) continue;
    c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      if (value.toTensor().is_mkldnn()) continue;  // an opaque packed weight (conv2d_bias_act_packed) has its dtype
      value = at::autocast::cached_cast(target, value.toTensor(), kDevice);
    } else if (value.isTensorList()) {
      std::vector<at::Tensor> list = value.toTensorVector();
      for (at::Tensor& t : list) t = at::autocast::cached_cast(target, t, kDevice);
      value = c10::IValue(list);
    }  // None (an absent Tensor?) and non-tensor arguments pass as they are
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  op.callBoxed(stack);
}

template <c10::DeviceType kDevice, AutocastPolicy kPolicy = AutocastPolicy::kConvolution>
torch::CppFunction autocast_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&autocast_boxed<kDevice, kPolicy>>();
}

}  // namespace pyops
