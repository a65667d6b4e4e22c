"""Builds pyops._C from csrc/: C++ always, CUDA sources when a CUDA toolchain is found.

Environment switches (all optional):
  PYOPS_CPU_ONLY=1        build without CUDA even when nvcc is present
  FORCE_CUDA=1            fail unless the CUDA sources can be built (they are built whenever a toolkit is found)
  CUDA_HOME               toolkit folder (holding bin/nvcc and lib64/libcudart.so); detected when unset (CUDA_PATH,
                          then nvcc on PATH)
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0"; default: the visible GPU's arch, else "8.0;9.0"
  MAX_JOBS                parallel compile jobs (ninja)
  DEBUG=1                 -O0 -g host code, -G device code
  PYOPS_NATIVE=0          do not add -mavx2 -mfma for the CPU kernels even where the build host has them (and build
                          no AVX-512 twins of them: csrc/common/cpu_isa.h)

Nothing is downloaded: the extension is built against whatever torch is importable (pip install
--no-build-isolation ...), which is what lets one source tree serve torch 2.14 here and 2.11 on the GPU machine.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _is_toolkit(folder):
    if not folder or not os.path.isfile(os.path.join(folder, "bin", "nvcc")):
        return False
    libs = glob.glob(os.path.join(folder, "lib64", "libcudart.so*"))
    libs += glob.glob(os.path.join(folder, "targets", "*", "lib", "libcudart.so*"))
    return bool(libs)


def _find_cuda_home():
    """The real toolkit folder. A wrapper `nvcc` on PATH (as on our dev machines) makes torch guess the folder
    above the wrapper, which has no lib64, and the link then fails with `cannot find -lcudart`."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a shell wrapper that execs the real nvcc: read the path out of it
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for token in head.decode(errors="ignore").split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


CPU_ONLY = _flag("PYOPS_CPU_ONLY")
CUDA_HOME = None if CPU_ONLY else _find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# CUDA sources are built whenever a toolkit is found (a GPU need not be visible: CI compiles them without one).
WITH_CUDA = CUDA_HOME is not None and torch.version.cuda is not None
if _flag("FORCE_CUDA") and not WITH_CUDA:
    sys.exit("pyops: FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc + libcudart) was found or torch is a CPU build; "
             "set CUDA_HOME to the toolkit folder")


def _arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "8.0;9.0"


def _host_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return all(flag in words for flag in flags)


def _compiler_is_gcc():
    try:
        version = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "Free Software Foundation" in version and "clang" not in version


def _extension():
    debug = _flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is torch's choice (C++17 for 2.11, C++20 for 2.14). at::parallel_for is an OpenMP pragma
    # compiled into *our* code: without -fopenmp it silently runs on one thread (libgomp is torch's own, already loaded).
    cxx += ["-fvisibility=hidden", "-Wno-unknown-pragmas", "-fopenmp"]
    link = ["-fopenmp"]
    # The CPU kernels are written as plain loops for the compiler to vectorize; AVX2+FMA doubles their width.
    # Only where the build host has them: `pip install` from source builds on the machine that runs it.
    native = os.environ.get("PYOPS_NATIVE", "1") != "0" and _host_has("avx2", "fma", "f16c")
    if native:
        # CPU_CAPABILITY_AVX2 selects at::vec's 256-bit Vectorized (and Sleef's exp, exported by libtorch_cpu).
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        # The *_avx512.cpp twins of the kernel files compile as AVX-512 (any build host: the CPU that runs them is
        # asked at run time) through GCC's target pragma.
        if _compiler_is_gcc():
            cxx += ["-DPYOPS_AVX512_KERNELS"]
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # The twins link last, after the CUDA objects too: of an inline function several objects emit, the linker keeps
    # the first object's copy, which must be a base build's (common/cpu_isa.h).
    twins = [path for path in sources if path.endswith("_avx512.cpp")]
    sources = [path for path in sources if path not in twins]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = [("PYOPS_TORCH_VERSION", f'"{torch.__version__}"')]
    if not WITH_CUDA:
        print(f"pyops: building the CPU extension ({len(sources + twins)} C++ files, CUDA off"
              f"{': PYOPS_CPU_ONLY=1' if CPU_ONLY else ': no CUDA toolkit or CPU-only torch'})")
        return CppExtension("pyops._C", sources + twins, include_dirs=include_dirs, define_macros=define_macros,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    arch = _arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    # Some toolkits lack headers that ATen's CUDA headers include (cusparse.h, cublas_v2.h, ...); torch's own
    # CUDA wheels ship them under site-packages/nvidia/cu*/include.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    nvcc = ["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo"]
    nvcc += ["--expt-relaxed-constexpr"]
    define_macros.append(("PYOPS_WITH_CUDA", None))
    define_macros.append(("PYOPS_CUDA_ARCH_LIST", f'"{arch}"'))
    print(f"pyops: building the CUDA extension ({len(sources + twins)} C++ + {len(cuda_sources)} CUDA files) "
          f"for TORCH_CUDA_ARCH_LIST={arch} with CUDA_HOME={CUDA_HOME}, torch {torch.__version__}")
    return CUDAExtension("pyops._C", sources + cuda_sources + twins, include_dirs=include_dirs,
                         define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=link)


class PyopsBuildExt(BuildExtension.with_options(use_ninja=True)):
    """Keeps ninja's object files in build/ between builds. pip's editable builds otherwise compile in a fresh
    temporary folder every time, so `make build` with one file changed would recompile everything."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' if WITH_CUDA else 'cpu'}"
        self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")


setup(
    name="pyops",
    version="0.1.0",
    description="Fused conv+BN+ReLU, conv1d with a direct backward, sliding classifiers and smooth max as torch ops",
    packages=find_packages(include=["pyops", "pyops.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": PyopsBuildExt},
    python_requires=">=3.9",
    # torch is deliberately not listed: the extension must build against the torch already installed.
    install_requires=[],
)
