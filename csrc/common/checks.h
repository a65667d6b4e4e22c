// Argument checks whose messages name the argument, shared by every op.
// TORCH_CHECK_VALUE surfaces in Python as ValueError, TORCH_CHECK_TYPE as TypeError, TORCH_CHECK_INDEX as
// IndexError, TORCH_CHECK as RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace pyops {

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

// Wraps a possibly negative dimension index into [0, ndim); a 0-d tensor accepts dim 0 and -1.
inline int64_t wrap_dim(int64_t dim, int64_t ndim, const char* name) {
  const int64_t n = ndim == 0 ? 1 : ndim;
  TORCH_CHECK_INDEX(dim >= -n && dim < n, "pyops: argument '", name, "' = ", dim, " is out of range for a tensor of ",
                    ndim, " dimensions (expected in [", -n, ", ", n - 1, "])");
  return dim < 0 ? dim + n : dim;
}

}  // namespace pyops
