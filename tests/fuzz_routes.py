"""Randomized differential check of every forced route (`make fuzz`; not part of `make test`).

The unit tests pin each route with hand-picked and small randomized layers; this runs many wider random layers
(channel counts up to 512, every stride, dilation, padding, group count, layout and dtype) through each forced path
(PYOPS_CONV1D_PATH, PYOPS_CONV_PATH) and, on the CPU, each instruction set of our kernels, and compares with float64
PyTorch:
  - pyops.conv1d: output, grad_input, grad_weight, grad_bias;
  - pyops.conv_bn_relu.conv2d_bias_act: output (every activation, bias, residual) and, for half
    the layers, the gradients of x, weight, bias, residual;
  - pyops.nn.ConvBNReLU2d (folded once; the packed-weight path where its rule packs): output under no_grad.
Errors are measured against the same sums taken over magnitudes (|x|*|w| + |b| + |residual|), a bound on rounding
that does not depend on cancellation: fp32 within 3e-5 of it, fp64 within 1e-12.

    python tests/fuzz_routes.py [--cases 300] [--seed 0] [--device cpu|cuda]

Exits 1 after printing each failing layer (its configuration reproduces it with --seed).
"""
import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F

import pyops
from pyops.conv_bn_relu import conv2d_bias_act

TOLERANCE = {torch.float32: 3e-5, torch.float64: 1e-12}
ACT = {"none": lambda z: z, "relu": torch.relu, "relu6": lambda z: z.clamp(0, 6), "silu": F.silu,
       "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid}


def scaled_error(ours, ref, scale):
    """max |ours - ref| / scale over the elements (0 for empty tensors)."""
    if ours.numel() == 0:
        return 0.0
    return ((ours.double() - ref).abs() / (scale + 1e-300)).max().item()


def grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> for the inputs that are not None."""
    inputs = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    wanted = [t for t in inputs if t is not None]
    return out, list(torch.autograd.grad(out, wanted, grad_out))  # (an empty batch too: zero weight gradients)


def conv1d_case(rng, device):
    """A random layer for pyops.conv1d, or None where the draw is too large."""
    groups = rng.choice([1, 1, 1, 2, 3, 4, 6, 8, 16])
    cin_g = rng.choice([1, 2, 3, 5, 8, 9, 16, 17, 24, 31, 32, 40, 64, 100])
    cout_g = rng.choice([1, 2, 3, 5, 8, 9, 12, 16, 17, 24, 33, 64, 96])
    if rng.random() < 0.2:  # depthwise, with a depth multiplier of 1 or 2
        groups, cin_g, cout_g = rng.choice([4, 16, 64, 128]), 1, rng.choice([1, 2])
    k, stride, dilation = rng.choice([1, 1, 2, 3, 3, 4, 5, 7, 9, 16]), rng.choice([1, 1, 1, 2, 3, 4, 5]), \
        rng.choice([1, 1, 1, 2, 3, 5])
    span = (k - 1) * dilation + 1
    padding = rng.choice([0, 0, 1, 2, 3, span - 1, span + 1, 7])
    length = max(1, span - 2 * padding, rng.choice([1, span, span + 1, 17, 31, 64, 100, 129, 257, 600, 1023, 1500]))
    n = rng.choice([0, 1, 1, 2, 3, 4, 8])
    if max(cin_g, cout_g) * groups > 512 or n * max(cin_g, cout_g) * groups * length > 2_000_000:
        return None
    dtype = rng.choice([torch.float32, torch.float32, torch.float64])
    x = torch.randn(n, cin_g * groups, length, dtype=dtype, device=device)
    if rng.random() < 0.2:  # a transposed view
        x = torch.randn(n, length, cin_g * groups, dtype=dtype, device=device).transpose(1, 2)
    w = torch.randn(cout_g * groups, cin_g, k, dtype=dtype, device=device)
    b = torch.randn(cout_g * groups, dtype=dtype, device=device) if rng.random() < 0.5 else None
    return x, w, b, (stride, padding, dilation, groups)


def check_conv1d(case):
    x, w, b, args = case
    fn = lambda x, w, b: pyops.conv1d(x, w, b, *args)
    y = pyops.conv1d(x, w, b, *args)
    grad_out = torch.randn_like(y)
    y, ours = grads(fn, (x, w, b), grad_out)
    ref_fn = lambda x, w, b: F.conv1d(x, w, b, *args)
    x64, w64, g64 = x.double(), w.double(), grad_out.double()
    b64 = None if b is None else b.double()
    ref_y, refs = grads(ref_fn, (x64, w64, b64), g64)
    scale_y, scales = grads(ref_fn, (x64.abs(), w64.abs(), None if b is None else b64.abs()), g64.abs())
    if b is not None:
        scales[2] = g64.abs().sum((0, 2))
    tol = TOLERANCE[x.dtype]
    errors = {"output": scaled_error(y, ref_y, scale_y)}
    errors.update({name: scaled_error(o, r, s) for name, o, r, s in zip(("grad_input", "grad_weight", "grad_bias"),
                                                                         ours, refs, scales)})
    return {name: e for name, e in errors.items() if not e <= tol}


def conv2d_case(rng, device):
    """A random layer for conv2d_bias_act / ConvBNReLU2d, or None where the draw is too large or has no output."""
    groups = rng.choice([1, 1, 1, 1, 2, 3, 4, 8])
    cin_g = rng.choice([1, 2, 3, 4, 8, 13, 16, 24, 32, 48, 64, 70, 96, 128, 256])
    cout_g = rng.choice([1, 2, 3, 4, 8, 12, 16, 17, 24, 32, 48, 64, 96, 128, 256])
    if rng.random() < 0.15:  # depthwise
        groups, cin_g, cout_g = rng.choice([4, 16, 32, 64]), 1, rng.choice([1, 2, 4])
    kh = rng.choice([1, 1, 2, 3, 3, 3, 5, 7])
    kw = kh if rng.random() < 0.8 else rng.choice([1, 3, 5])
    stride = rng.choice([(1, 1)] * 4 + [(2, 2), (2, 1), (3, 3)])
    dilation = rng.choice([(1, 1)] * 5 + [(2, 2), (1, 3)])
    padding = rng.choice([(0, 0), (kh // 2, kw // 2), (kh // 2, kw // 2), (1, 2), (3, 3)])
    h = rng.choice([1, 2, 4, 7, 8, 12, 14, 16, 28, 32, 56])
    w_ = h if rng.random() < 0.7 else rng.choice([3, 9, 20, 33])
    n = rng.choice([0, 1, 1, 2, 3, 8])
    out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1
              for size, p, d, k, s in zip((h, w_), padding, dilation, (kh, kw), stride)]
    cin, cout = cin_g * groups, cout_g * groups
    if (min(out_hw) < 1 or max(cin, cout) > 512 or n * max(cin, cout) * h * w_ > 3_000_000
            or n * cout * cin_g * kh * kw * h * w_ > 3e8):
        return None
    dtype = rng.choice([torch.float32, torch.float32, torch.float64])
    x = torch.randn(n, cin, h, w_, dtype=dtype, device=device)
    if rng.random() < 0.35:
        x = x.contiguous(memory_format=torch.channels_last)
    elif rng.random() < 0.1:  # a strided view
        x = torch.randn(n, cin, h, 2 * w_, dtype=dtype, device=device)[..., ::2]
    weight = torch.randn(cout, cin_g, kh, kw, dtype=dtype, device=device) / (cin_g * kh * kw) ** 0.5
    bias = torch.randn(cout, dtype=dtype, device=device) if rng.random() < 0.7 else None
    residual = torch.randn(n, cout, *out_hw, dtype=dtype, device=device) if rng.random() < 0.3 else None
    if residual is not None and rng.random() < 0.5:
        residual = residual.contiguous(memory_format=torch.channels_last)
    act = rng.choice(["none", "relu", "relu", "relu6", "silu", "hardswish", "hardsigmoid", "sigmoid"])
    return x, weight, bias, residual, (stride, padding, dilation, groups), act, rng.random() < 0.5


def check_conv2d(case):
    x, weight, bias, residual, args, act, with_grads = case
    tol = TOLERANCE[x.dtype]

    def reference(x, w, b, r):
        z = F.conv2d(x, w, b, *args)
        return z if r is None else z + r

    inputs64 = [None if t is None else t.double() for t in (x, weight, bias, residual)]
    scale = reference(*[None if t is None else t.abs() for t in inputs64])
    errors = {}
    if with_grads:
        y = conv2d_bias_act(x, weight, bias, *args, act, residual)
        grad_out = torch.randn_like(y)
        y, ours = grads(lambda *t: conv2d_bias_act(t[0], t[1], t[2], *args, act, t[3]), (x, weight, bias, residual),
                        grad_out)
        # the reference's activation mask is ours (both outputs agree within tol where it matters; a z within
        # rounding of 0 or 6 may fall on either side)
        if act not in ("none", "relu", "relu6"):
            # the slopes at the float64 reference's z. Ours are computed from terms of size ~1 (they cancel where
            # SiLU's slope is 0), at our z, within tol * scale of z64 (a slope differs by |act''| <= 1/2 times that;
            # at Hardswish's kinks ±3 it jumps by 1/2, Hardsigmoid's by 1/6): each gradient's scale counts
            # |grad_out| for those terms
            z64 = reference(*inputs64).requires_grad_()
            g64 = torch.autograd.grad(ACT[act](z64), z64, grad_out.double())[0]
            g_scale = g64.abs() + grad_out.double().abs() * (1 + 0.5 * tol * scale)
        else:
            mask = {"none": torch.ones_like(y, dtype=torch.bool), "relu": y > 0, "relu6": (y > 0) & (y < 6)}[act]
            g64 = (grad_out * mask).double()
            g_scale = g64.abs()
        ref_z, refs = grads(reference, inputs64, g64)
        _, scales = grads(reference, [None if t is None else t.abs() for t in inputs64], g_scale)
        names = [name for name, t in zip(("grad_x", "grad_weight", "grad_bias", "grad_residual"),
                                         (x, weight, bias, residual)) if t is not None]
        if bias is not None:
            scales[2] = g_scale.sum((0, 2, 3))
        errors.update({name: scaled_error(o, r, s) for name, o, r, s in zip(names, ours, refs, scales)})
    else:
        with torch.no_grad():
            y = conv2d_bias_act(x, weight, bias, *args, act, residual)
        ref_z = reference(*inputs64)
    errors["output"] = scaled_error(y, ACT[act](ref_z), scale)
    # the module: conv + BN folded once at construction (packed oneDNN weights where its rule packs)
    if act != "relu6" and residual is None:
        stride, padding, dilation, groups = args
        conv = torch.nn.Conv2d(x.shape[1], weight.shape[0], weight.shape[2:], stride, padding, dilation, groups,
                               bias is not None).to(x.device, x.dtype)
        bn = torch.nn.BatchNorm2d(weight.shape[0]).to(x.device, x.dtype).eval()
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
            module = pyops.nn.ConvBNReLU2d.from_modules(conv, bn, relu=act).eval()
            y = module(x)
            ref = bn.double()(conv.double()(x.double()))
            bn_scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            mag = F.conv2d(x.double().abs(), (weight.double() * bn_scale.double()[:, None, None, None]).abs(), None,
                           *args)
            mag = mag + ((0 if bias is None else bias.double()) - bn.running_mean.double()).mul(bn_scale).abs()[
                :, None, None] + bn.bias.double().abs()[:, None, None]
            errors["module"] = scaled_error(y, ACT[act](ref), mag)
    return {name: e for name, e in errors.items() if not e <= tol}


def describe(case):
    return "; ".join(f"{tuple(t.shape)} {t.dtype} stride {t.stride()}" if isinstance(t, torch.Tensor)
                     else repr(t) for t in case)


def run(name, make_case, check, env_var, paths, isas, cases, seed, device, verbose):
    failures = checked = 0
    for path in paths:
        os.environ[env_var] = path
        for isa in isas:
            if isa is not None:
                pyops._C.set_cpu_kernel_isa(isa)
            rng = random.Random(seed)
            torch.manual_seed(seed)
            for i in range(cases):
                case = make_case(rng, device)
                if case is None:
                    continue
                checked += 1
                if verbose:  # (before the call: a crash's last line names its layer)
                    print(f"{name} {env_var}={path} isa={isa} case {i}: {describe(case)}", flush=True)
                try:
                    bad = check(case)
                except Exception as error:  # a route that raises on a valid layer is a failure too
                    bad = {"exception": f"{type(error).__name__}: {error}"}
                if bad:
                    failures += 1
                    print(f"FAIL {name} {env_var}={path} isa={isa} case {i}: {bad}\n    {describe(case)}", flush=True)
        print(f"{name} {env_var}={path}: {checked} layers checked so far, {failures} failures", flush=True)
    return failures


def routes(device):
    """(name, make_case, check, environment variable, its forced values) per op, for device."""
    cpu = device == "cpu"
    return [("conv1d", conv1d_case, check_conv1d, "PYOPS_CONV1D_PATH",
             ["auto", "direct", "gemm", "library"] if cpu else ["auto", "direct", "library"]),
            ("conv2d", conv2d_case, check_conv2d, "PYOPS_CONV_PATH",
             ["auto", "direct", "library"] if cpu else ["auto", "ours", "cudnn"])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300, help="random draws per route and instruction set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--verbose", action="store_true", help="print each layer before checking it")
    parser.add_argument("--ops", default="conv1d,conv2d", help="which of conv1d, conv2d to check")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("fuzz_routes: --device cuda without a CUDA device")
    isas = pyops._C.cpu_kernel_isas().split(",") if args.device == "cpu" else [None]
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 on every path (cuDNN takes TF32 by default)
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = 0
    for name, make_case, check, env_var, paths in routes(args.device):
        if name in args.ops.split(","):
            failures += run(name, make_case, check, env_var, paths, isas, args.cases, args.seed, args.device,
                            args.verbose)
    print("fuzz_routes:", "FAILED," if failures else "passed,", failures, "failing layers")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
