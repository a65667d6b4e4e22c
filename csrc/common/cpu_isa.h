// CPU kernels built for two instruction sets in one library, the wider chosen at run time (ATen's CPU_CAPABILITY
// scheme, reduced to what pyops needs). setup.py builds every file for the base set: AVX2+FMA where the build host
// has it (at::vec 256 bits), else portable code. A compute-bound kernel file `x.cpp` also has a twin `x_avx512.cpp`
// that includes common/cpu_isa_avx512.h and then `x.cpp`: the same source compiled as AVX-512 (at::vec 512 bits).
// Each such file defines its entry points in namespace pyops::PYOPS_CPU_ISA (cpu_base or cpu_avx512), declared in
// both by PYOPS_DECLARE_CPU_KERNEL; callers reach them through PYOPS_CPU_KERNEL(name), or PYOPS_CPU_KERNEL_IF(cond,
// name) where the AVX-512 build pays only on some shapes, which take the AVX-512 build on CPUs that run it unless
// PYOPS_CPU_ISA=avx2 (or set_cpu_kernel_isa) asks for the base one. On the Zen 5 VM of stop 35 the AVX-512 build
// ran the compute-bound kernels 1.1-1.8x faster where it runs (bench/NOTES.md).
//
// One thing the twins must keep: an inline function or template instantiation that both builds emit out of line
// (std::vector's, ATen's) is one symbol in the library, and the linker keeps the copy of the first object that has
// it. setup.py therefore links the *_avx512 objects last, so that base code never calls an AVX-512 copy (an illegal
// instruction on a CPU without it); tests/test_cpu_isa.py checks the built library for it.
#pragma once

#include <string>

#if defined(CPU_CAPABILITY_AVX512)
#define PYOPS_CPU_ISA cpu_avx512
#else
#define PYOPS_CPU_ISA cpu_base
#endif

// Declares a kernel entry point in both namespaces (a declaration the build does not define is never called).
#define PYOPS_DECLARE_CPU_KERNEL(...) \
  namespace cpu_base {                \
  __VA_ARGS__;                        \
  }                                   \
  namespace cpu_avx512 {              \
  __VA_ARGS__;                        \
  }

// PYOPS_CPU_KERNEL_IF(wide_enough, name): the AVX-512 build only where the call's shape suits its wider tiles.
#if defined(PYOPS_AVX512_KERNELS)
#define PYOPS_CPU_KERNEL_IF(wide_enough, name) \
  ((wide_enough) && ::pyops::cpu_avx512_selected() ? ::pyops::cpu_avx512::name : ::pyops::cpu_base::name)
#else
#define PYOPS_CPU_KERNEL_IF(wide_enough, name) ((void)(wide_enough), ::pyops::cpu_base::name)
#endif
#define PYOPS_CPU_KERNEL(name) PYOPS_CPU_KERNEL_IF(true, name)

namespace pyops {

// Whether PYOPS_CPU_KERNEL takes the AVX-512 build: built, the CPU has AVX-512 F/BW/VL/DQ, and neither
// PYOPS_CPU_ISA=avx2 (read once) nor set_cpu_kernel_isa chose the base build.
bool cpu_avx512_selected();
// "avx512", or the base build's "avx2" / "default".
std::string cpu_kernel_isa();
// The instruction sets this library and CPU can run its kernels in: the base build's, then "avx512" where it can.
std::string cpu_kernel_isas();
// Selects one of cpu_kernel_isas() for the calls that follow; throws c10::ValueError naming the choices otherwise.
void set_cpu_kernel_isa(const std::string& isa);

}  // namespace pyops
