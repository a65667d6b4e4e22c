"""Interleaved A/B timing on the CPU: the implementations of a case alternate within every round, so the VM's speed
drift (bench/NOTES.md, "CPU timing") hits them alike, and each keeps its fastest call. For decisions, and for rows
whose pytest-benchmark ratios disagree between runs; the README table stays pytest-benchmark's. Same cases and
inputs as the suites (their set-up functions are reused). Run it with the allocator settings `make bench` uses:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        .venv/bin/python bench/interleaved.py [conv-bn-relu] [resnet18] [conv1d] [--rounds 15]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_conv1d  # noqa: E402
import bench_conv_bn_relu  # noqa: E402
import bench_fuse  # noqa: E402
import pyops  # noqa: E402


def interleaved(fns, rounds=15, calls=3):
    """{name: fastest seconds}: every round runs each fn `calls` times in turn, after one untimed call each.
    The first entry of fns is the baseline the printed ratios divide."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def conv_bn_relu_cases():
    for shape in bench_conv_bn_relu.RESNET_SHAPES:
        block, x = bench_conv_bn_relu.make_block(shape, "cpu", torch.float32, torch.contiguous_format)
        module = pyops.nn.ConvBNReLU2d.from_modules(block[0], block[1])
        cin, cout, k, stride, h = shape
        yield (f"conv-bn-relu {cin}->{cout} k{k} s{stride} {h}x{h} b{x.shape[0]}",
               {"eager": lambda b=block, x=x: b(x), "functional": bench_conv_bn_relu.pyops_fn(block, x),
                "module": lambda m=module, x=x: m(x)})


def resnet18_cases():
    model = bench_fuse.torchvision_model("resnet18", "cpu")
    fused = pyops.fuse(model)
    for batch in (1, 8):
        x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        yield f"resnet18 batch {batch}", {"eager": lambda x=x: model(x), "fuse(m)": lambda x=x: fused(x)}


def conv1d_cases():
    for name in (name for name, case in bench_conv1d.CASES.items() if "cpu" in case[0]):
        x, w, b, args, label, _, _ = bench_conv1d.setup(name, "fp32", "cpu")
        x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
        grad = torch.randn_like(pyops.conv1d(x, w, b, *args))
        yield (f"conv1d fwd+bwd {label}",
               {impl: bench_conv1d.fwd_bwd_step(f, x, w, b, args, grad)
                for impl, f in sorted(bench_conv1d.IMPLS.items(), key=lambda item: item[0] == "pyops")})


SUITES = {"conv-bn-relu": conv_bn_relu_cases, "resnet18": resnet18_cases, "conv1d": conv1d_cases}
NO_GRAD = {"conv-bn-relu", "resnet18"}  # inference suites; conv1d times its backward


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    for suite in args.suites or SUITES:
        with torch.set_grad_enabled(suite not in NO_GRAD):
            for case, fns in SUITES[suite]():
                best = interleaved(fns, args.rounds)
                base = next(iter(best.values()))  # the first entry is the baseline
                cells = [f"{name} {t * 1e3:.3f} ms" + ("" if i == 0 else f" ({base / t:.2f}x)")
                         for i, (name, t) in enumerate(best.items())]
                print(f"{case}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
