"""`python -m pyops` (`make demo`): the homework's checks, each with its measured number, then short timings of
every op against the PyTorch path it replaces. The sections live in pyops/demo/, one module per capability."""
import sys
import time

import torch

import pyops
from pyops.demo import SECTIONS


def main():
    start = time.perf_counter()
    info = pyops.build_info()
    print("pyops", pyops.__version__, "| torch", torch.__version__, "| built against torch", info["torch_version"])
    print(f"  CUDA kernels compiled: {info['cuda']} (arch {info['cuda_arch_list'] or '-'}); "
          f"CUDA device present: {torch.cuda.is_available()}; CPU kernels run: {pyops._C.cpu_kernel_isa()} "
          f"(built: {info['cpu_vector']}{', avx512' if info['cpu_avx512_kernels'] else ''}); "
          f"CPU threads: {torch.get_num_threads()}")
    failures = 0
    for section in SECTIONS:
        print(f"\n== {section.TITLE}")
        failures += not section.checks()
    print("\n== Timings (each the fastest of a few alternating calls; bench/ has the full side-by-side benchmarks)")
    for section in SECTIONS:
        section.timings()
    print(f"\n{'all checks passed' if not failures else f'{failures} section(s) FAILED'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
