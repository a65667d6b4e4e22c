// Which dtypes the ops hand to oneDNN's convolution on this CPU as they are (conv2d_bias_act, dense conv1d): float32
// always; bfloat16 where the CPU has its instructions (AVX-512 BF16 / AMX), as mkldnn::_is_mkldnn_bf16_supported
// reports: the test ATen's own convolution makes before taking oneDNN's bf16 path. oneDNN accumulates it in fp32 and
// rounds the output once, as our kernels do. Not float16: on the Sapphire Rapids VMs (AVX-512 FP16, no AMX-FP16)
// oneDNN's fp16 convolutions ran slower than float32 ones with the conversions (64→64 3×3 on 56×56, batch 8: 7.8 vs
// 5.4 ms), and its fp16 conv1d weight gradient 170x slower: the ops compute float16 in float32 and round once.
#pragma once

#include <ATen/Context.h>
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

// Whether oneDNN computes with wider vectors than our CPU kernels' base build: setup.py builds them for AVX2 where the
// build host has it (else portable code), while oneDNN picks its instruction set at run time, AVX-512 where the CPU
// has it. On the AVX-512 Sapphire Rapids VMs that moved the break-even of our direct convolution from 8.4M
// multiply-adds (the AVX2 VMs) to ~1.5M per thread (bench/NOTES-conv_bn_relu.md, stop 26). The kernels' AVX-512
// twins (common/cpu_isa.h) run only where their shape suits them: the rules that follow this ask about those too.
inline bool onednn_vectors_wider() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool wider = [] {
    __builtin_cpu_init();
#if defined(__AVX2__)
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return __builtin_cpu_supports("avx2") != 0;
#endif
  }();
  return wider;
#else
  return false;  // (not measured off x86)
#endif
}

// Whether MKL's matrix products run as wide as oneDNN's convolutions here, where the rules that prefer a product to
// oneDNN's call (conv1d's weight gradients and pointwise layers, conv_bn_relu's 1×1 layers) were measured: x86 CPUs
// without AVX-512, and Intel's with it. MKL takes its AVX-512 kernels on Intel CPUs only, oneDNN on any CPU that has
// them: on an AMD CPU with AVX-512 (Zen 4, Zen 5) the products run AVX2 code beside an AVX-512 oneDNN (0.45-0.66x
// its speed on 1×1 layers of >= 2^22 multiply-adds, stop 34). Off x86 (not measured) oneDNN's, the one ATen uses.
inline bool blas_runs_full_width() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool full = [] {
    __builtin_cpu_init();
    return !__builtin_cpu_supports("avx512f") || __builtin_cpu_is("intel");
  }();
  return full && at::globalContext().hasMKL();
#else
  return false;
#endif
}

}  // namespace pyops
