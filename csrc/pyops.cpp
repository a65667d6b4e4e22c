// The Python module pyops._C. Importing it loads this library, whose static initializers register every op
// (each csrc/ops/<op>/<op>.cpp declares its schemas with TORCH_LIBRARY_FRAGMENT(pyops, ...) and each backend file
// registers its kernels). pybind11 adds only build_info().
#include <pybind11/pybind11.h>
#include <torch/version.h>

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
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyops compiled ops (registered under torch.ops.pyops)";
  m.def("build_info", &build_info,
        "What this build contains: torch_version built against, cuda (bool), cuda_arch_list, cpu_vector");
}
