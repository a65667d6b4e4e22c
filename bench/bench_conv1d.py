"""conv1d forward and forward+backward (all three gradients) vs torch.nn.functional.conv1d with autograd (oneDNN on
CPU, cuDNN on CUDA), same run, same inputs. CPU cases run with --device cpu, CUDA cases with --device cuda."""
import pytest
import torch
import torch.nn.functional as F

import pyops

# name: (devices, N, C_in, C_out, L, K, stride, padding, groups, dtypes)
CASES = {
    "depthwise causal": (("cpu",), 2, 512, 512, 1024, 4, 1, 3, 512, ("fp32",)),
    "single channel": (("cpu", "cuda"), 64, 1, 1, 4096, 9, 1, 4, 1, ("fp32",)),
    "dense TCN": (("cpu",), 4, 128, 128, 1024, 3, 1, 1, 1, ("fp32",)),
    # our kernels' other regimes on the CPU: a strided small-channel layer (staged in phases), many short rows
    "strided small": (("cpu",), 8, 16, 16, 2000, 4, 2, 1, 1, ("fp32",)),
    "short rows": (("cpu",), 4096, 8, 8, 4, 3, 1, 1, 1, ("fp32",)),
    # wav2vec2's first two layers on one second of audio (one clip): the CPU routes each op by its own product
    "wav2vec2 conv0 1 clip": (("cpu",), 1, 1, 512, 16000, 10, 5, 0, 1, ("fp32",)),
    "wav2vec2 conv1 1 clip": (("cpu",), 1, 512, 512, 3199, 3, 2, 0, 1, ("fp32",)),
    # a training batch of short clips (a keyword-spotting CNN's first layer on 32 x 1 s of 40 MFCCs): short rows,
    # whose weight gradient the CPU runs as one matrix product over the batch
    "keyword spotting b32": (("cpu",), 32, 40, 64, 101, 3, 1, 1, 1, ("fp32",)),
    # a pointwise layer of a separable conv1d network (QuartzNet's 256-channel blocks on 8 x 4 s of audio): on the CPU
    # every op a matrix product (F.conv1d's oneDNN converts the input and output to its blocked layout and back)
    "pointwise b8": (("cpu",), 8, 256, 256, 400, 1, 1, 0, 1, ("fp32",)),
    "depthwise causal large": (("cuda",), 8, 2048, 2048, 2048, 4, 1, 3, 2048, ("fp32", "bf16")),
    "wav2vec2 conv0": (("cuda",), 8, 1, 512, 16000, 10, 5, 0, 1, ("fp32", "bf16")),
    "wav2vec2 conv1": (("cuda",), 8, 512, 512, 3199, 3, 2, 0, 1, ("fp32", "bf16")),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = {"pyops": pyops.conv1d, "F.conv1d": F.conv1d}
PARAMS = [(name, dt) for name, case in CASES.items() for dt in case[-1]]


def setup(name, dtype_name, device):
    devices, n, cin, cout, length, k, stride, padding, groups, _ = CASES[name]
    if device not in devices:
        pytest.skip(f"{name} is a {'/'.join(devices)} case")
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, length, generator=g).to(device, dtype)
    w = (torch.randn(cout, cin // groups, k, generator=g) / (cin // groups * k) ** 0.5).to(device, dtype)
    b = torch.randn(cout, generator=g).to(device, dtype)
    lout = (length + 2 * padding - (k - 1) - 1) // stride + 1
    macs = n * cout * lout * (cin // groups) * k
    io = (x.numel() + n * cout * lout) * x.element_size()  # input read + output written
    label = f"{name} N={n} C={cin}->{cout} L={length} k={k} s={stride} p={padding} g={groups} {dtype_name}"
    return x, w, b, (stride, padding, 1, groups), label, macs, io


def fwd_bwd_step(f, x, w, b, args, grad):
    """One forward and all three gradients of conv f (x, w, b requiring grad), as the fwd+bwd cases time it."""
    return lambda: torch.autograd.grad(f(x, w, b, *args), (x, w, b), grad)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name,dtype_name", PARAMS)
def bench_forward(measure, device, impl, name, dtype_name):
    x, w, b, args, label, macs, io = setup(name, dtype_name, device)
    f = IMPLS[impl]
    with torch.no_grad():
        measure(f"conv1d fwd {label}", impl, lambda: f(x, w, b, *args), bytes=io, flops=2 * macs)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name,dtype_name", PARAMS)
def bench_forward_backward(measure, device, impl, name, dtype_name):
    x, w, b, args, label, macs, io = setup(name, dtype_name, device)
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    f = IMPLS[impl]
    grad = torch.randn_like(f(x, w, b, *args))
    step = fwd_bwd_step(f, x, w, b, args, grad)
    # fewest bytes: the forward reads x and writes y; grad_input reads gy and writes gx; grad_weight reads gy and x
    measure(f"conv1d fwd+bwd {label}", impl, step, bytes=3 * io, flops=6 * macs)
