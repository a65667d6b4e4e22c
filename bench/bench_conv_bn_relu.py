"""pyops.conv2d_bn_relu (BN folded on the fly, one pass over the output) vs eager nn.Sequential(conv, bn, relu).eval()
and vs torch.compile of that Sequential, on ResNet-50 layer shapes (CPU: batch 8 fp32 NCHW; CUDA: batch 32 in fp32,
fp16 channels_last and bf16 channels_last), plus a residual block (add + relu) and the homework's small layers.
torch.compile runs with inductor's freezing on the CPU (weights folded and prepacked: the strongest CPU peer, as in
shared/anchors/cpu-compile-2026-11-27.txt) and in its default mode on CUDA.

"[module]" cases time pyops.nn.ConvBNReLU2d (BN folded once, the default path: what fuse() builds): on the CPU
against eager and torch.compile (the module packs its weight once; see ConvBNReLU2d._packed_weight), on CUDA against
the cuDNN-fused baseline (torch.cudnn_convolution_relu on the same folded weights). "[ours]" cases (CUDA) time our
implicit GEMM (PYOPS_CONV_PATH=ours) against that baseline.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyops
from conftest import skip_unless_compile_timed

# (Cin, Cout, k, stride, H): ResNet-50's layers; padding k // 2
RESNET_SHAPES = [(3, 64, 7, 2, 112), (64, 64, 1, 1, 56), (64, 64, 3, 1, 56), (128, 128, 3, 1, 28),
                 (256, 256, 3, 1, 14), (1024, 256, 1, 1, 14)]
HOMEWORK_SHAPES = [(3, 16, 3, 1, 32), (16, 16, 3, 1, 32)]
# (Cin, Cout, k, stride, H, groups, batch): CPU routing rows. A depth multiplier of 2 (one input channel per group),
# RegNet-400MF's last stage (16 channels per group on 7×7): each took the slower of the two CPU paths before stop 24
# (0.45x, 0.57x); small single images (a late stage at batch 1), which took oneDNN's ~40 µs call before stop 27
# (0.38x and 0.80x eager, 1 thread)
ROUTING_SHAPES = [(16, 32, 3, 1, 28, 16, 8), (400, 400, 3, 1, 7, 25, 8), (16, 16, 3, 1, 8, 1, 1),
                  (32, 32, 3, 1, 14, 1, 1)]
RESIDUAL_SHAPE = (64, 64, 3, 1, 56)
VARIANTS = {"cpu": [("fp32", torch.float32, torch.contiguous_format)],
            "cuda": [("fp32", torch.float32, torch.contiguous_format), ("fp16-CL", torch.float16, torch.channels_last),
                     ("bf16-CL", torch.bfloat16, torch.channels_last)]}
BATCH = {"cpu": 8, "cuda": 32}
_compiled = {}  # one torch.compile per module (compiling takes seconds to a minute on this CPU)


def make_block(shape, device, dtype, fmt, batch=None):
    cin, cout, k, stride, h, groups = (*shape, 1)[:6]
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False, groups=groups)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
    block = nn.Sequential(conv, bn, nn.ReLU()).eval().to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(batch or BATCH[device], cin, h, h, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return block, x


def counts(shape, batch, itemsize, residual=False):
    cin, cout, k, stride, h, groups = (*shape, 1)[:6]
    oh = (h + 2 * (k // 2) - k) // stride + 1
    out = batch * cout * oh * oh
    flops = 2 * out * cin // groups * k * k
    moved = (batch * cin * h * h + cout * cin // groups * k * k + out * (2 if residual else 1)) * itemsize
    return flops, moved


def pyops_fn(block, x, residual=None):
    conv, bn = block[0], block[1]
    return lambda: pyops.conv2d_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                        bn.running_var, bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups,
                                        residual=residual)


def compiled_fn(block, x, key, residual=None):
    if key not in _compiled:
        f = (lambda t, r: F.relu(block[1](block[0](t)) + r)) if residual is not None else block
        _compiled[key] = torch.compile(f, options={"freezing": True}) if x.device.type == "cpu" else torch.compile(f)
    c = _compiled[key]
    return (lambda: c(x, residual)) if residual is not None else (lambda: c(x))


def cudnn_fused_fn(block, x):
    conv, bn = block[0], block[1]
    w, b, _ = torch.ops.pyops.conv_bn_fold(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                           bn.running_var, bn.eps)
    w = w.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else w
    return lambda: torch.cudnn_convolution_relu(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


IMPLS = ["pyops", "eager", "torch.compile"]


@pytest.mark.parametrize("variant", range(3), ids=["v0", "v1", "v2"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", RESNET_SHAPES + HOMEWORK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def bench_conv_bn_relu(measure, device, shape, impl, variant):
    if variant >= len(VARIANTS[device]):
        pytest.skip(f"{device} has {len(VARIANTS[device])} dtype variants")
    name, dtype, fmt = VARIANTS[device][variant]
    skip_unless_compile_timed(impl)
    block, x = make_block(shape, device, dtype, fmt)
    fn = {"pyops": lambda: pyops_fn(block, x), "eager": lambda: block,
          "torch.compile": lambda: compiled_fn(block, x, (shape, name))}[impl]()
    run = (lambda: fn(x)) if impl == "eager" else fn
    flops, moved = counts(shape, x.shape[0], x.element_size())
    cin, cout, k, stride, h = shape
    with torch.no_grad():
        measure(f"conv-bn-relu {cin}->{cout} k{k} s{stride} {h}x{h} b{x.shape[0]} {name}", impl, run, flops=flops,
                bytes=moved)


@pytest.mark.parametrize("impl", IMPLS)
def bench_conv_bn_add_relu(measure, device, impl):
    name, dtype, fmt = VARIANTS[device][0]
    block, x = make_block(RESIDUAL_SHAPE, device, dtype, fmt)
    r = torch.randn(x.shape[0], 64, 56, 56, device=device, dtype=dtype)
    skip_unless_compile_timed(impl)
    fn = {"pyops": lambda: pyops_fn(block, x, r), "eager": lambda: (lambda: F.relu(block[1](block[0](x)) + r)),
          "torch.compile": lambda: compiled_fn(block, x, ("residual", name), r)}[impl]()
    flops, moved = counts(RESIDUAL_SHAPE, x.shape[0], x.element_size(), residual=True)
    with torch.no_grad():
        measure(f"conv-bn-add-relu 64->64 k3 s1 56x56 b{x.shape[0]} {name}", impl, fn, flops=flops, bytes=moved)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", range(3), ids=["v0", "v1", "v2"])
@pytest.mark.parametrize("impl", ["pyops", "cudnn-fused"])
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def bench_ours_vs_cudnn(measure, device, shape, impl, variant, monkeypatch):
    """Our implicit GEMM (forced) against cuDNN's runtime fusion on the same folded weights (CUDA only)."""
    if device != "cuda":
        pytest.skip("our kernel vs cuDNN is a CUDA comparison")
    name, dtype, fmt = VARIANTS[device][variant]
    block, x = make_block(shape, device, dtype, fmt)
    monkeypatch.setenv("PYOPS_CONV_PATH", "ours")
    fn = pyops_fn(block, x) if impl == "pyops" else cudnn_fused_fn(block, x)
    flops, moved = counts(shape, x.shape[0], x.element_size())
    cin, cout, k, stride, h = shape
    with torch.no_grad():
        measure(f"[ours] conv-bn-relu {cin}->{cout} k{k} s{stride} {h}x{h} b{x.shape[0]} {name}", impl, fn,
                flops=flops, bytes=moved)


MODULE_BASELINES = {"cpu": ["eager", "torch.compile"], "cuda": ["cudnn-fused"]}


@pytest.mark.parametrize("variant", range(3), ids=["v0", "v1", "v2"])
@pytest.mark.parametrize("impl", ["pyops", "eager", "torch.compile", "cudnn-fused"])
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def bench_module(measure, device, shape, impl, variant):
    """pyops.nn.ConvBNReLU2d, what fuse() builds (BN folded once; on the CPU the weight packed once), against the
    unfused Sequential and torch.compile (CPU), or cuDNN's runtime fusion on the same folded weights (CUDA: the
    dispatcher's promise is never to be slower)."""
    if variant >= len(VARIANTS[device]):
        pytest.skip(f"{device} has {len(VARIANTS[device])} dtype variants")
    if impl != "pyops" and impl not in MODULE_BASELINES[device]:
        pytest.skip(f"{impl} is not a {device} baseline of the module")
    skip_unless_compile_timed(impl)
    name, dtype, fmt = VARIANTS[device][variant]
    block, x = make_block(shape, device, dtype, fmt)
    module = pyops.nn.ConvBNReLU2d.from_modules(block[0], block[1])
    fn = {"pyops": lambda: (lambda: module(x)), "eager": lambda: (lambda: block(x)),
          "torch.compile": lambda: compiled_fn(block, x, (shape, name)),
          "cudnn-fused": lambda: cudnn_fused_fn(block, x)}[impl]()
    flops, moved = counts(shape, x.shape[0], x.element_size())
    cin, cout, k, stride, h = shape
    with torch.no_grad():
        measure(f"[module] conv-bn-relu {cin}->{cout} k{k} s{stride} {h}x{h} b{x.shape[0]} {name}", impl, fn,
                flops=flops, bytes=moved)


@pytest.mark.parametrize("impl", ["pyops", "eager"])
@pytest.mark.parametrize("shape", ROUTING_SHAPES, ids=lambda s: "x".join(map(str, s)))
def bench_module_routing(measure, device, shape, impl):
    """Layers on the CPU where the rule picking a main loop (our direct kernel, an unfolded GEMM, oneDNN) matters most
    (bench/NOTES-conv_bn_relu.md, stops 24 and 27): pyops.nn.ConvBNReLU2d against the unfused Sequential, fp32 NCHW."""
    if device != "cpu":
        pytest.skip("a CPU routing row")
    block, x = make_block(shape[:6], device, torch.float32, torch.contiguous_format, batch=shape[6])
    module = pyops.nn.ConvBNReLU2d.from_modules(block[0], block[1])
    fn = (lambda: module(x)) if impl == "pyops" else (lambda: block(x))
    flops, moved = counts(shape[:6], x.shape[0], x.element_size())
    cin, cout, k, stride, h, groups, _ = shape
    grouped = f" g{groups}" if groups > 1 else ""
    with torch.no_grad():
        measure(f"[module] conv-bn-relu {cin}->{cout} k{k} s{stride}{grouped} {h}x{h} b{x.shape[0]} fp32", impl, fn,
                flops=flops, bytes=moved)
