// Index arithmetic shared by the CPU conv1d kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pyops {

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }  // b > 0
inline int64_t ceil_div_signed(int64_t a, int64_t b) { return -floor_div(-a, b); }

// The positions l in [la, lb) at which a tap reads inside the input: 0 <= l*stride + shift < length.
struct TapRange {
  int64_t lo, hi;
};
inline TapRange tap_range(int64_t shift, int64_t stride, int64_t length, int64_t la, int64_t lb) {
  const int64_t lo = std::max(la, ceil_div_signed(-shift, stride));
  const int64_t hi = std::min(lb, floor_div(length - 1 - shift, stride) + 1);
  return {lo, std::max(lo, hi)};
}

// Stride-1 positions [lo, hi) of [0, count) where every tap (shifts offset .. offset + span) reads inside
// [0, length): there no bounds checks are needed.
struct Interior {
  int64_t lo, hi;
};
inline Interior interior(int64_t offset, int64_t span, int64_t length, int64_t count) {
  const int64_t lo = std::min(count, std::max<int64_t>(0, -offset));
  const int64_t hi = std::max(lo, std::min(count, length - span - offset));
  return {lo, hi};
}

}  // namespace pyops
