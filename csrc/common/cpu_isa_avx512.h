// Included first by a kernel file's AVX-512 twin (common/cpu_isa.h): everything after it in the translation unit is
// compiled for AVX-512 F/BW/VL/DQ, with at::vec's 512-bit Vectorized. Where setup.py does not build the twins
// (PYOPS_AVX512_KERNELS undefined: no AVX2 base build, or not GCC on x86-64) the twin compiles to nothing.
#pragma once

#if defined(PYOPS_AVX512_KERNELS)
#if defined(__clang__) || !defined(__GNUC__) || !defined(__x86_64__)
#error "PYOPS_AVX512_KERNELS: the AVX-512 twins are built with GCC's target pragma, on x86-64"
#endif
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// (the pragma does not define the macros -mavx512f would; headers such as Sleef's declare their 512-bit functions
// only under them)
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
