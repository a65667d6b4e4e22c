// Small CUDA helpers shared by the kernels: launch checks, warp reductions, accumulation types.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace pyops {

template <typename T> struct cuda_acc { using type = float; };
template <> struct cuda_acc<double> { using type = double; };
template <typename T> using cuda_acc_t = typename cuda_acc<T>::type;

constexpr int kWarpSize = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The number of SMs of the current device: grids are sized against it so small problems still fill the chip.
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace pyops
