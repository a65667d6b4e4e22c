// Which dtypes oneDNN convolves on this CPU, for the ops that route dense convolutions to it (conv2d_bias_act,
// conv1d): float32 always; bfloat16 and float16 where the CPU has their instructions (AVX-512 BF16 / AMX, AVX-512
// FP16), as mkldnn::_is_mkldnn_{bf16,fp16}_supported report: the test ATen's own convolution makes before taking
// oneDNN's reduced-precision path. oneDNN accumulates them in fp32 and rounds the output once, as our kernels do.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>

namespace pyops {

inline bool onednn_computes(at::ScalarType dtype) {
  const auto supported = [](const char* query) {
    const auto op = c10::Dispatcher::singleton().findSchema({query, ""});
    if (!op.has_value()) return false;  // a build without oneDNN
    torch::jit::Stack stack;
    op->callBoxed(&stack);
    return stack.back().toBool();
  };
  static const bool bf16 = supported("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = supported("mkldnn::_is_mkldnn_fp16_supported");
  return dtype == at::kFloat || (dtype == at::kBFloat16 && bf16) || (dtype == at::kHalf && fp16);
}

}  // namespace pyops
