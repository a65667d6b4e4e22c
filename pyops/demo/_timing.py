"""The demo's small timer: fastest of a few alternating calls, after a warm-up (bench/ does this properly)."""
import time

import torch


def _timed_ms(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def compare(label, ours, baseline, baseline_name, repeat=7):
    """Prints one timing line: pyops vs baseline, each its fastest of `repeat` calls after a warm-up. The two calls
    alternate, so a shared machine's drifting speed (seconds long on small VMs) hits both alike instead of whichever
    ran second."""
    ours(), baseline()
    t_ours = t_base = float("inf")
    for _ in range(repeat):
        t_ours = min(t_ours, _timed_ms(ours))
        t_base = min(t_base, _timed_ms(baseline))
    print(f"  {label:<52} pyops {t_ours:8.2f} ms | {baseline_name} {t_base:8.2f} ms | {t_base / t_ours:5.2f}x")


def check(label, value, ok, fmt="{:.3g}"):
    """Prints one check line with its measured value; returns ok."""
    print(f"  [{'ok' if ok else 'FAIL'}] {label}: {fmt.format(value)}")
    return bool(ok)
