// One row split into its phases or merged from them: dst[p][q] = row[q*stride + p]. Shared by the phase slabs of
// a strided layer's gradients (conv1d_cpu_phases.cpp) and the forward's staged windows (conv1d_cpu_correlate.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

namespace pyops {

// row: `length` positions; dst[p]: phase p's values (p < min(stride, length)), written by a split
// (dst[p][q] = row[q*stride + p]), read by a merge (the reverse). S: the stride as a compile-time constant (1-4:
// the compiler then vectorizes the interleaved accesses with shuffles) or 0 (any stride, read from `stride`).
template <typename T, bool Split>
using PhaseRow = std::conditional_t<Split, const T*, T*>;

template <typename T, bool Split, int S>
inline void move_phase_row(PhaseRow<T, Split> __restrict in, T* const* dst, int64_t length, int64_t stride) {
  const int64_t s = S > 0 ? S : stride, whole = length / s;  // (positions q at which every phase has a value)
  if constexpr (S > 0) {
    T* __restrict d[S];
    for (int p = 0; p < S; ++p) d[p] = dst[p];
    for (int64_t q = 0; q < whole; ++q)
      for (int p = 0; p < S; ++p) {
        if constexpr (Split) d[p][q] = in[q * S + p];
        else in[q * S + p] = d[p][q];
      }
  } else {
    for (int64_t p = 0; p < s; ++p) {
      T* __restrict d = dst[p];
      for (int64_t q = 0; q < whole; ++q) {
        if constexpr (Split) d[q] = in[q * s + p];
        else in[q * s + p] = d[q];
      }
    }
  }
  for (int64_t i = whole * s; i < length; ++i) {  // (the last, partial group: phases below length % stride)
    if constexpr (Split) dst[i - whole * s][whole] = in[i];
    else in[i] = dst[i - whole * s][whole];
  }
}

template <typename T, bool Split>
inline void move_phase_row(PhaseRow<T, Split> in, T* const* dst, int64_t length, int64_t stride) {
  switch (stride) {
    case 1: return move_phase_row<T, Split, 1>(in, dst, length, stride);
    case 2: return move_phase_row<T, Split, 2>(in, dst, length, stride);
    case 3: return move_phase_row<T, Split, 3>(in, dst, length, stride);
    case 4: return move_phase_row<T, Split, 4>(in, dst, length, stride);
    default: return move_phase_row<T, Split, 0>(in, dst, length, stride);
  }
}

}  // namespace pyops
