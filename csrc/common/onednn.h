// Which dtypes the ops hand to oneDNN's convolution on this CPU as they are (conv2d_bias_act, dense conv1d): float32
// always; bfloat16 where the CPU has its instructions (AVX-512 BF16 / AMX), as mkldnn::_is_mkldnn_bf16_supported
// reports: the test ATen's own convolution makes before taking oneDNN's bf16 path. oneDNN accumulates it in fp32 and
// rounds the output once, as our kernels do. Not float16: on the Sapphire Rapids VMs (AVX-512 FP16, no AMX-FP16)
// oneDNN's fp16 convolutions ran slower than float32 ones with the conversions (64→64 3×3 on 56×56, batch 8: 7.8 vs
// 5.4 ms), and its fp16 conv1d weight gradient 170x slower: the ops compute float16 in float32 and round once.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace pyops {

inline bool onednn_computes(at::ScalarType dtype) {
  const auto supported = [](const char* query) {
    const auto op = c10::Dispatcher::singleton().findSchema({query, ""});
    if (!op.has_value()) return false;  // a build without oneDNN
    // (not recorded: a torch.jit.trace that makes the first call cannot record a bool output and raised)
    c10::impl::ExcludeDispatchKeyGuard no_tracer(c10::DispatchKey::Tracer);
    torch::jit::Stack stack;
    op->callBoxed(&stack);
    return stack.back().toBool();
  };
  static const bool bf16 = supported("mkldnn::_is_mkldnn_bf16_supported");
  return dtype == at::kFloat || (dtype == at::kBFloat16 && bf16);
}

}  // namespace pyops
