"""Where conv1d's forward+backward time goes on a GPU: each piece alone, timed with CUDA events (median of 50 back-to-
back calls after a warm-up), next to the whole autograd step of pyops and of F.conv1d. Bytes are the fewest each piece
must move; the copy rate is measured in the same run. A diagnostic for bench/NOTES-conv1d.md, not a benchmark of
record (those are bench_conv1d.py's). The depthwise and single-channel pieces are timed under both
PYOPS_CONV1D_DEPTHWISE layouts (elementwise, the default, and runs), which matter only on the depthwise path. The
wav2vec2 layers (cuDNN path) add ATen's own pieces, the calls F.conv1d's backward makes: convolution_backward with
each output mask, and conv_transpose1d (our grad_input), to find where our fwd+bwd loses to F.conv1d's there.

    python bench/profile_conv1d.py            # on a machine with CUDA
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's pyops
import pyops  # noqa: E402
from bench_conv1d import CASES, DTYPES, fwd_bwd_step  # noqa: E402

ops = torch.ops.pyops


def median_ms(fn, calls=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[calls // 2]


def copy_rate():
    a = torch.empty(1 << 28, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / median_ms(lambda: b.copy_(a), 20) / 1e6  # GB/s


def aten_pieces(x, w, gy, stride, padding, groups, length):
    """The cuDNN calls behind F.conv1d's backward, and the transposed convolution behind our library grad_input."""
    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]], [stride], [padding], [1], False,
                                                           [0], groups, mask)
    natural = (gy.shape[2] - 1) * stride - 2 * padding + (w.shape[2] - 1) + 1
    moved = (x.numel() + gy.numel()) * x.element_size()
    return {"aten convolution_backward input": (backward([True, False, False]), moved),
            "aten convolution_backward weight+bias": (backward([False, True, True]), moved),
            "aten convolution_backward all": (backward([True, True, True]), 2 * moved),
            "aten conv_transpose1d": (lambda: F.conv_transpose1d(gy, w, None, stride, padding, length - natural,
                                                                  groups), moved)}


def main():
    peak = copy_rate()
    print(f"{torch.cuda.get_device_name()}, copy {peak:.0f} GB/s")
    print("| case | piece | layout | time | GB/s (% of copy) |\n|---|---|---|---|---|")
    for name in ("depthwise causal large", "single channel", "wav2vec2 conv0", "wav2vec2 conv1"):
        _, n, cin, cout, length, k, stride, padding, groups, dtypes = CASES[name]
        library = name.startswith("wav2vec2")
        for dt in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, cin, length, generator=g).to("cuda", DTYPES[dt])
            w = torch.randn(cout, cin // groups, k, generator=g).to("cuda", DTYPES[dt])
            b = torch.randn(cout, generator=g).to("cuda", DTYPES[dt])
            y = ops.conv1d(x, w, b, stride, padding, 1, groups)
            gy = torch.randn_like(y)
            size = x.element_size()
            pieces = {
                "forward": (lambda: ops.conv1d(x, w, b, stride, padding, 1, groups), (x.numel() + y.numel()) * size),
                "grad_input": (lambda: ops.conv1d_backward_input(gy, w, length, stride, padding, 1, groups),
                               (x.numel() + y.numel()) * size),
                "grad_weight": (lambda: ops.conv1d_backward_weight(gy, x, k, stride, padding, 1, groups),
                                (x.numel() + y.numel()) * size),
                "grad_bias (sum)": (lambda: gy.sum((0, 2)), y.numel() * size),
                "grad_weight + grad_bias": (lambda: ops.conv1d_backward_weight_bias(gy, x, k, stride, padding, 1,
                                                                                    groups),
                                            (x.numel() + y.numel()) * size),
            }
            if library:
                pieces.update(aten_pieces(x, w, gy, stride, padding, groups, length))
            xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            whole = 3 * (x.numel() + y.numel()) * size
            pieces["pyops fwd+bwd (autograd)"] = (fwd_bwd_step(pyops.conv1d, xr, wr, br, (stride, padding, 1, groups),
                                                               gy), whole)
            pieces["F.conv1d fwd+bwd"] = (fwd_bwd_step(F.conv1d, xr, wr, br, (stride, padding, 1, groups), gy), whole)
            for piece, (fn, moved) in pieces.items():
                for layout in ("elementwise",) if library else ("elementwise", "runs"):
                    os.environ["PYOPS_CONV1D_DEPTHWISE"] = layout  # read by the kernels' launchers on every call
                    ms = median_ms(fn)
                    rate = moved / ms / 1e6
                    print(f"| {name} {dt} | {piece} | {layout} | {ms * 1e3:.1f} µs | {rate:.0f} "
                          f"({100 * rate / peak:.0f} %) |")
                os.environ.pop("PYOPS_CONV1D_DEPTHWISE")


if __name__ == "__main__":
    main()
