"""The demo's small timer: median wall time of a few calls, after a warm-up (bench/ does this properly)."""
import statistics
import time

import torch


def median_ms(fn, repeat=7):
    fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compare(label, ours, baseline, baseline_name, repeat=7):
    """Prints one timing line: pyops vs baseline."""
    t_ours, t_base = median_ms(ours, repeat), median_ms(baseline, repeat)
    print(f"  {label:<52} pyops {t_ours:8.2f} ms | {baseline_name} {t_base:8.2f} ms | {t_base / t_ours:5.2f}x")


def check(label, value, ok, fmt="{:.3g}"):
    """Prints one check line with its measured value; returns ok."""
    print(f"  [{'ok' if ok else 'FAIL'}] {label}: {fmt.format(value)}")
    return bool(ok)
