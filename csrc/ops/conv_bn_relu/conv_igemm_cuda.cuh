// Our CUDA convolution: an implicit GEMM with the bias + residual + activation epilogue fused into its only store.
//
// Per group, out[m][co] = Σ_k A[m][k]·B[k][co] with m = (n, oh, ow), k = (ci, kh, kw), A gathered from the input on
// the fly (im2col never materialized, padding read as 0) and B[k][co] = w[co][k]. A block computes a kBM×kBN tile of
// one group with fp32 FMA (fp64 for fp64; never TF32) through shared memory, kBK reduction steps at a time.
#pragma once

#include <ATen/core/Tensor.h>

#include "ops/conv_bn_relu/conv_bn_relu.h"

namespace pyops {

// x: input in any dense layout (indexed through its strides); w: (Cout, Cin/groups, KH, KW) contiguous;
// b: (Cout,) or undefined; residual: output-shaped (any strides) or undefined; out: preallocated (any strides).
void conv_bias_act_igemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                              const at::Tensor& residual, at::Tensor& out, const ConvGeometry& g);

}  // namespace pyops
