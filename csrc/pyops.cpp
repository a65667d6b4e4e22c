// The Python module pyops._C. Importing it loads this library, whose static initializers register every op
// (each csrc/ops/<op>/<op>.cpp declares its schemas with TORCH_LIBRARY_FRAGMENT(pyops, ...) and each backend file
// registers its kernels). pybind11 adds build_info(), conv_path(), cpu_computes_bf16(), one_by_one_runs_as_gemm()
// and the CPU kernels' instruction set (cpu_kernel_isa(), cpu_kernel_isas(), set_cpu_kernel_isa()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/version.h>

#include "common/cpu_isa.h"
#include "common/onednn.h"
#include "ops/conv_bn_relu/conv_bn_relu.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef PYOPS_TORCH_VERSION
  info["torch_version"] = PYOPS_TORCH_VERSION;
#else
  info["torch_version"] = TORCH_VERSION;
#endif
#ifdef PYOPS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_arch_list"] = PYOPS_CUDA_ARCH_LIST;
#else
  info["cuda"] = false;
  info["cuda_arch_list"] = "";
#endif
#if defined(CPU_CAPABILITY_AVX2)
  info["cpu_vector"] = "avx2";
#else
  info["cpu_vector"] = "default";
#endif
#if defined(PYOPS_AVX512_KERNELS)
  info["cpu_avx512_kernels"] = true;
#else
  info["cpu_avx512_kernels"] = false;
#endif
  return info;
}

// PYOPS_CONV_PATH as the ops read it (validated: a bad value raises the ops' ValueError). For ConvBNReLU2d's forward,
// which must send a call where the op would go: os.environ.get costs ~2 us a call, this ~0.2 us.
const char* conv_path() {
  switch (pyops::requested_conv_path()) {
    case pyops::ConvPath::kDirect: return "direct";
    case pyops::ConvPath::kLibrary: return "library";
    default: return "auto";
  }
}

// For ConvBNReLU2d's packing rule: a layer the op runs as a GEMM gains nothing from a packed oneDNN weight.
bool one_by_one_runs_as_gemm(int64_t n, int64_t cin, int64_t cout, int64_t h, int64_t w, bool channels_last,
                             std::optional<bool> full_width_blas) {
  return pyops::one_by_one_runs_as_gemm(n, cin, cout, h, w,
                                        channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous,
                                        full_width_blas);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyops compiled ops (registered under torch.ops.pyops)";
  m.def("build_info", &build_info,
        "What this build contains: torch_version built against, cuda (bool), cuda_arch_list, cpu_vector (the base "
        "build's vectors), cpu_avx512_kernels (whether the kernels also have AVX-512 twins)");
  m.def("cpu_kernel_isa", &pyops::cpu_kernel_isa,
        "The instruction set the CPU kernels run in now: 'avx512', or the base build's 'avx2' / 'default'");
  m.def("cpu_kernel_isas", &pyops::cpu_kernel_isas,
        "The instruction sets this build and CPU can run the CPU kernels in, comma-separated, base build first");
  m.def("set_cpu_kernel_isa", &pyops::set_cpu_kernel_isa, py::arg("isa"),
        "Runs the CPU kernels in one of cpu_kernel_isas() from now on (as PYOPS_CPU_ISA does at start); ValueError "
        "for another");
  m.def("conv_path", &conv_path,
        "PYOPS_CONV_PATH, read now: 'auto', 'direct' (also set as 'ours') or 'library' (also 'cudnn'); ValueError "
        "if it holds anything else");
  m.def("cpu_computes_bf16", [] { return pyops::onednn_computes(at::kBFloat16); },
        "Whether the ops hand bfloat16 to oneDNN's convolution on this CPU (it has AVX-512 BF16 / AMX), "
        "common/onednn.h: the CPU autocast policy and the half-precision paths follow it");
  m.def("one_by_one_runs_as_gemm", &one_by_one_runs_as_gemm, py::arg("n"), py::arg("cin"), py::arg("cout"),
        py::arg("h"), py::arg("w"), py::arg("channels_last"), py::arg("full_width_blas") = py::none(),
        "Whether a float32 1x1 layer (stride 1, no padding, one group) from cin to cout channels on an (n, cin, h, w) "
        "CPU input runs as a GEMM (no oneDNN call, so no packed weight to gain from); full_width_blas: the rule for "
        "a CPU where MKL runs as wide as oneDNN (True) or narrower (False, AMD AVX-512), None: this CPU's");
}
