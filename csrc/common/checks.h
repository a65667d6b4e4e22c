// Argument checks whose messages name the argument, shared by every op.
// TORCH_CHECK_VALUE surfaces in Python as ValueError, TORCH_CHECK_TYPE as TypeError, TORCH_CHECK_INDEX as
// IndexError, TORCH_CHECK as RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <string>

namespace pyops {

// float16 or bfloat16 (the ops compute them in float32, or hand them to oneDNN where it computes them).
inline bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "pyops: argument '", name,
                   "' must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t ndim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == ndim, "pyops: argument '", name, "' must have ", ndim, " dimensions, got shape ",
                    t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "pyops: argument '", name, "' is on ", t.device(), " but '",
                    ref_name, "' is on ", ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "pyops: argument '", name, "' has dtype ", t.scalar_type(),
                   " but '", ref_name, "' has dtype ", ref.scalar_type());
}

// A convolution's extent along one spatial dimension of `size`: refuses a padding or dilation whose padded size or
// dilated kernel span overflows int64 (as F.conv2d refuses them), then returns the stride to compute with. A stride
// past the padded size gives one output position, as that size does: the kernels take it (their index arithmetic,
// stride + length, and the libraries' 32-bit strides stay in range: 2**63 - 1 wrapped, 2**31 failed in oneDNN).
inline int64_t checked_conv_stride(int64_t size, int64_t kernel_size, int64_t stride, int64_t padding,
                                   int64_t dilation, const char* op) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(padding <= (kMax - size) / 2, op, ": argument 'padding' = ", padding, " is too large");
  TORCH_CHECK_VALUE(kernel_size <= 1 || dilation <= (kMax - 1) / (kernel_size - 1), op, ": argument 'dilation' = ",
                    dilation, " is too large for kernel size ", kernel_size);
  return std::min(stride, std::max<int64_t>(size + 2 * padding, 1));
}

// Wraps a possibly negative dimension index into [0, ndim); a 0-d tensor accepts dim 0 and -1.
inline int64_t wrap_dim(int64_t dim, int64_t ndim, const char* name) {
  const int64_t n = ndim == 0 ? 1 : ndim;
  TORCH_CHECK_INDEX(dim >= -n && dim < n, "pyops: argument '", name, "' = ", dim, " is out of range for a tensor of ",
                    ndim, " dimensions (expected in [", -n, ", ", n - 1, "])");
  return dim < 0 ? dim + n : dim;
}

}  // namespace pyops
