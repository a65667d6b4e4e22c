"""The machine's measured ceilings, for bench/report.py's "% of peak": copy bandwidth and the fp32 GEMM rate.

These cases ("peak: ...") have no pyops side: report.py takes the best bytes/s and flops/s among them as the peaks
and states them in the summary's header. Sizes are large enough to leave the caches and reach the GEMM rate (1024²
on the 2-core CPU gave 68 GFLOP/s, less than its convolutions reach); cases whose data stays in cache can pass
the copy peak.
"""
import torch

SIZES = {"cpu": {"copy_bytes": 64 * 2**20, "gemm_n": 2048}, "cuda": {"copy_bytes": 2**30, "gemm_n": 8192}}


def bench_copy(measure, device):
    src = torch.randn(SIZES[device]["copy_bytes"] // 4, device=device)
    dst = torch.empty_like(src)
    measure("peak: copy", "Tensor.copy_", lambda: dst.copy_(src), bytes=2 * src.nbytes)  # read once, write once


def bench_gemm_fp32(measure, device):
    n = SIZES[device]["gemm_n"]
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    # bench/conftest.py turns TF32 off: this is the true fp32 rate. 2·n³: a multiply and an add per term.
    measure("peak: gemm fp32", "torch.mm", lambda: torch.mm(a, b, out=out), flops=2 * n**3)
