#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace pyops {
namespace {

const char* base_isa() {
#if defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

bool cpu_runs_avx512() {
#if defined(PYOPS_AVX512_KERNELS)
  static const bool runs = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return runs;
#else
  return false;
#endif
}

// Whether isa names the AVX-512 build; throws unless it is one of cpu_kernel_isas().
bool is_avx512(const std::string& isa) {
  const bool avx512 = isa == "avx512" && cpu_runs_avx512();
  TORCH_CHECK_VALUE(avx512 || isa == base_isa(), "PYOPS_CPU_ISA / set_cpu_kernel_isa: '", isa,
                    "' is not an instruction set this build and CPU run pyops' kernels in; choose one of: ",
                    cpu_kernel_isas());
  return avx512;
}

std::atomic<bool>& avx512_chosen() {
  // (an invalid PYOPS_CPU_ISA raises from the first kernel call, and again from each until it is fixed)
  static std::atomic<bool> chosen = [] {
    const char* env = std::getenv("PYOPS_CPU_ISA");
    return env == nullptr || *env == '\0' ? cpu_runs_avx512() : is_avx512(env);
  }();
  return chosen;
}

}  // namespace

bool cpu_avx512_selected() { return avx512_chosen().load(std::memory_order_relaxed); }

std::string cpu_kernel_isa() { return cpu_avx512_selected() ? "avx512" : base_isa(); }

std::string cpu_kernel_isas() { return cpu_runs_avx512() ? std::string(base_isa()) + ",avx512" : base_isa(); }

void set_cpu_kernel_isa(const std::string& isa) { avx512_chosen().store(is_avx512(isa), std::memory_order_relaxed); }

}  // namespace pyops
