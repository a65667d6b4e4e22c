"""Shared harness of the benchmark suites: one device per run (--device), pyops and its baseline timed side by side
in the same run, on the same inputs, with what bench/report.py needs recorded in extra_info."""
import os
import platform
import time

import pytest
import torch

torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 on both sides unless a case says otherwise
torch.backends.cudnn.allow_tf32 = False


def skip_unless_compile_timed(impl):
    """PYOPS_BENCH_COMPILE=0 leaves torch.compile out (gpu_check.sh: its GPU numbers are in shared/anchors)."""
    if impl == "torch.compile" and os.environ.get("PYOPS_BENCH_COMPILE", "1") == "0":
        pytest.skip("PYOPS_BENCH_COMPILE=0: torch.compile not timed")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="where the benchmarks run")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["processor"] = platform.processor() or platform.machine()
    if config.getoption("--device") == "cuda" and torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()


@pytest.fixture
def device(request):
    dev = request.config.getoption("--device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda without a CUDA device")
    return dev


def cuda_timer():
    """perf_counter after the GPU has finished what was queued: a round of back-to-back calls is timed from an idle
    GPU to the completion of its last kernel, so host work overlaps GPU work as it does in a model, and what is
    timed is the throughput of whichever side is slower."""
    torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory(fn, device):
    """Bytes of device memory fn allocates at its peak beyond what was allocated before (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def measure(benchmark, device):
    """measure(case, impl, fn, bytes=..., flops=...): times fn under pytest-benchmark.

    case: what is computed (shape, dtype, pass), shared by pyops and its baselines so the report can pair them.
    impl: "pyops" for ours, anything else names the baseline (e.g. "torch.logsumexp").
    bytes / flops: the fewest bytes moved / floating-point operations of the case, for achieved rates.
    warmup: untimed calls first (fewer for cases that take seconds a call).
    extra: more facts for extra_info (e.g. rel_err of an inexact algorithm).
    """
    if device == "cuda":  # pytest-benchmark's own knobs, set here so no CUDA run can time launches alone
        benchmark._timer = cuda_timer
        benchmark._min_time = max(benchmark._min_time, 1e-3)  # rounds of >= 1 ms: many calls per round

    def run(case, impl, fn, *, bytes=None, flops=None, warmup=3, **extra):
        for _ in range(warmup):  # outside the timer: allocator, first touch, cuDNN/cuBLAS heuristics
            fn()
        benchmark.group = case
        benchmark.extra_info.update(case=case, impl=impl, device=device, bytes=bytes, flops=flops,
                                    peak_mem=peak_memory(fn, device), **extra)
        return benchmark(fn)

    return run
