import os
import platform
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

# References are exact fp32: no TF32 anywhere in the test session (pyops' own kernels never use it unless asked).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

HAS_CUDA = torch.cuda.is_available()

# The fused ops' activations as torch.nn.functional computes them: the tests' references, one per name in
# pyops.activations.ACTIVATIONS (tests/test_activations.py checks that: an activation added there needs one here).
ACTIVATION_REFERENCES = {"none": lambda y: y, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
                         "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "sigmoid": F.sigmoid}


def gradgradcheck_like_torch(fn, inputs, activation):
    """torch.autograd.gradgradcheck(fn, inputs) for a fused op with `activation`; for Hardsigmoid, whose backward
    PyTorch cannot differentiate (aten::hardsigmoid_backward has no derivative: F.hardsigmoid has no double
    backward), the same error as PyTorch's."""
    if activation != "hardsigmoid":
        assert torch.autograd.gradgradcheck(fn, inputs)
        return
    with pytest.raises(RuntimeError, match="derivative for aten::hardsigmoid_backward is not implemented"):
        torch.autograd.gradgradcheck(lambda *t: F.hardsigmoid(t[0].sum() * t[0]), inputs[:1])
    with pytest.raises(RuntimeError, match="derivative for aten::hardsigmoid_backward is not implemented"):
        torch.autograd.gradgradcheck(fn, inputs)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests (and the cuda half of the `device` fixture) are skipped, not failed, without a GPU."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return request.param


def autocast_compute_dtype(device, region_dtype):
    """The dtype the convolution ops compute in inside a torch.autocast region: the region's on CUDA and on a CPU
    whose oneDNN computes it natively (bfloat16 with AVX-512 BF16 / AMX), else float32 (csrc/common/autocast.h)."""
    native = region_dtype is torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return region_dtype if device == "cuda" or native else torch.float32


def blas_runs_full_width():
    """Whether MKL's matrix products run as wide as oneDNN's convolutions on this CPU (common/onednn.h: x86 without
    AVX-512, or Intel's), where auto prefers a product to oneDNN's call in more places (conv1d's weight gradients,
    conv_bn_relu's 1×1 layers)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    x86 = platform.machine() in ("x86_64", "AMD64")
    return x86 and torch.backends.mkl.is_available() and ("avx512f" not in flags or "GenuineIntel" in flags)


def deterministic_cudnn(deterministic=True):
    """cuDNN enabled, its algorithms fixed (no benchmarking) and, where `deterministic`, reproducible (its default
    backward algorithms may sum with atomics: two calls need not agree bit for bit), exact fp32 kept:
    torch.backends.cudnn.flags() would otherwise turn TF32 on (its allow_tf32 defaults to True)."""
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=deterministic, allow_tf32=False,
                                      fp32_precision=None)


def tolerances(dtype):
    """(rtol, atol) for comparing against a float64 reference."""
    return {
        torch.float64: (1e-10, 1e-12),
        torch.float32: (1e-5, 1e-6),
        torch.float16: (1e-2, 1e-3),
        torch.bfloat16: (1e-2, 1e-2),
    }[dtype]


def run_in_threads(work, count=4):
    """Runs work(index) in `count` threads at once, switching between them as often as Python allows (so that their
    calls interleave between any two steps), and returns the exceptions they raised."""
    errors = []

    def guarded(index):
        try:
            work(index)
        except Exception as error:  # noqa: BLE001 - returned to the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return errors
