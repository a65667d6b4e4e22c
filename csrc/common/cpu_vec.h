// The vector type the CPU kernels compute in. setup.py compiles with AVX2+FMA and CPU_CAPABILITY_AVX2 where the
// build host has them, which makes at::vec::Vectorized 256 bits wide and its exp() Sleef's (the same code ATen's
// own AVX2 kernels run); elsewhere Vectorized falls back to portable loops and the results stay the same.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace pyops {

using at::vec::Vectorized;

// Accumulation type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// Horizontal reductions of one vector (at most a few per chunk, so a store and a scalar loop is fine).
template <typename T>
inline T hmax(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) m = lanes[i] > m || lanes[i] != lanes[i] ? lanes[i] : m;
  return m;
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) s += lanes[i];
  return s;
}

}  // namespace pyops
