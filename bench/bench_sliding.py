"""Sliding-window classification with the homework's Net1 (random weights): pyops (SlidingClassifier, converted
once) vs the per-crop loop a user would write, the same crops in one batched call, and the hand-written Net2 (the
converted model as plain nn.Conv2d layers). The head op alone vs the same head as torch convolutions. The 18×18
layer by FFT (pyops.fft_conv, opt-in; issue 5's stretch) vs the direct convolution, with its error recorded.

flops: the fewest operations of the case, i.e. the FCN's (FlopCounterMode on Net2; the 18×18 layer dominates with
82,944·4,096 multiply-adds per output position). The loops do more work (every crop's features from scratch).
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pyops
from pyops import reference
from pyops.fft_conv import FFTConv2d


def homework_models(request, small):
    """(net1, net2, SlidingClassifier) on the bench device (net2 on net1's device)."""
    dev = request.config.getoption("--device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda without a CUDA device")
    net1 = reference.homework_net1(small=small).to(dev)
    return net1, reference.homework_net2(net1), pyops.nn.SlidingClassifier(net1, 32)


@pytest.fixture(scope="module")
def models(request):
    """The homework's Net1, built once: each of the three holds 1.36 GB in its 18×18 layer."""
    return homework_models(request, small=False)


def fcn_flops(net2, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net2(x)
    return counter.get_total_flops()


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def image(shape, device):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)


CPU_IMPLS = ["pyops", "torch Net2", "crops batched", "per-crop loop"]


def run_case(measure, models, x, impl, case):
    net1, net2, clf = models
    fns = {"pyops": lambda: clf(x), "torch Net2": lambda: net2(x),
           "crops batched": lambda: reference.crop_batch(net1, x, 32),
           "per-crop loop": lambda: reference.crop_loop(net1, x, 32)}
    # Net1's calls take seconds on the CPU (the per-crop loop ~90 s): one warm-up call, none for the loop itself,
    # whose 289 small calls are their own warm-up.
    with torch.no_grad():
        measure(case, impl, fns[impl], flops=fcn_flops(net2, x), warmup=0 if impl == "per-crop loop" else 1)


@pytest.mark.benchmark(min_rounds=1)  # the loop takes tens of seconds on the CPU
@pytest.mark.parametrize("impl", CPU_IMPLS)
def bench_net1_48x48_cpu(measure, models, device, impl):
    if device != "cpu":
        pytest.skip("the CPU case (the CUDA cases are bench_net1_64x64_cuda / bench_net1_128x128_cuda)")
    run_case(measure, models, image((1, 3, 48, 48), device), impl, "Net1 48x48 B=1 fp32 (289 crops)")


@pytest.fixture(scope="module")
def small_models(request):
    """The scaled-down Net1 (its head 16x18x18 -> 64 -> 64 -> 10)."""
    return homework_models(request, small=True)


@pytest.mark.parametrize("impl", ["pyops", "torch Net2"])
def bench_small_net1_96x96(measure, small_models, device, impl):
    """A head of few feature channels on a large map (82x82 features, 4225 crops): on the CPU its first layer is
    oneDNN's direct convolution inside the op, the im2col route having cost 3x Net2 here (bench/NOTES-sliding.md)."""
    _, net2, clf = small_models
    x = image((1, 3, 96, 96), device)
    fns = {"pyops": lambda: clf(x), "torch Net2": lambda: net2(x)}
    with torch.no_grad():
        measure("small Net1 96x96 B=1 fp32 (4225 crops)", impl, fns[impl], flops=fcn_flops(net2, x))


@pytest.mark.parametrize("impl", ["pyops", "torch conv head"])
def bench_head_only(measure, models, device, impl):
    """The 18×18 + 1×1 + 1×1 head on Net1's 34×34 feature map (a 48×48 image): the op vs torch convolutions."""
    _, _, clf = models
    convs = [m for m in clf.fcn.head if isinstance(m, torch.nn.Conv2d)]
    weights, biases, relu = [c.weight for c in convs], [c.bias for c in convs], [True, True, False]
    f = image((1, 256, 34, 34), device)
    fns = {"pyops": lambda: pyops.sliding_head(f, weights, biases, relu),
           "torch conv head": lambda: reference.sliding_head(f, weights, biases, relu)}
    with torch.no_grad():
        flops = 2 * 17 * 17 * sum(w.numel() for w in weights)
        measure("Net1 head on 34x34 features fp32", impl, fns[impl], flops=flops)


@pytest.fixture(scope="module")
def fft_layer(models):
    """Net1's 18×18 layer (256 → 4096) as pyops.fft_conv.FFTConv2d: its spectra (5.3 GiB in fp32, T = 36) made once
    (~35 s on the 2-core CPU)."""
    conv = next(m for m in models[2].fcn.head if isinstance(m, torch.nn.Conv2d))
    return conv, FFTConv2d(conv.weight.detach(), conv.bias.detach())


@pytest.mark.parametrize("impl", ["pyops", "torch conv2d"])
def bench_large_kernel_layer_fft(measure, fft_layer, device, impl):
    """Issue 5's stretch: the 18×18 layer by FFT (fewer operations; not the default) vs the direct convolution
    (oneDNN / cuDNN), on the 34×34 feature map of 48×48 images. The FFT's relative error to the float64 result is
    recorded next to the direct fp32 convolution's (extra_info rel_err)."""
    conv, layer, batch = *fft_layer, 1
    f = image((batch, 256, 34, 34), device)
    fns = {"pyops": lambda: layer(f), "torch conv2d": lambda: torch.nn.functional.conv2d(f, conv.weight, conv.bias)}
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(f.double(), conv.weight.double(), conv.bias.double())
        measure(f"Net1 18x18 layer 256->4096 on 34x34 features B={batch} fp32 (FFT, T={layer.fft_size})", impl,
                fns[impl], flops=2 * batch * 17 * 17 * conv.weight.numel(), rel_err=rel_err(fns[impl](), ref))


@pytest.mark.benchmark(min_rounds=3)  # the loop takes ~1 s a call on an H200
@pytest.mark.parametrize("algorithm", ["direct", "fft"])
@pytest.mark.parametrize("impl", ["pyops", "torch Net2", "per-crop loop"])
def bench_net1_64x64_cuda(measure, benchmark, models, device, impl, algorithm):
    """Exact fp32 at 64x64, batch 4: the direct head (the default) and the FFT head (algorithm="fft") against the
    per-crop loop (timed once, with the direct case) and Net2; pyops' relative difference to the fp32 Net2 is
    recorded (the FFT layer's own error to float64 is bench_large_kernel_layer_fft's)."""
    if device != "cuda":
        pytest.skip("CUDA case")
    if impl == "per-crop loop" and algorithm == "fft":
        pytest.skip("the loop is timed once, in the direct case")
    net1, net2, clf = models
    x = image((4, 3, 64, 64), device)
    case = "Net1 64x64 B=4 fp32 (1089 crops)" + (", FFT head" if algorithm == "fft" else "")
    if impl == "pyops":
        with torch.no_grad():
            benchmark.extra_info["rel_diff_vs_net2"] = rel_err(clf(x, algorithm=algorithm), net2(x))
    fns = {"pyops": lambda: clf(x, algorithm=algorithm), "torch Net2": lambda: net2(x),
           "per-crop loop": lambda: reference.crop_loop(net1, x, 32)}
    with torch.no_grad():
        measure(case, impl, fns[impl], flops=fcn_flops(net2, x), warmup=0 if impl == "per-crop loop" else 1)


@pytest.mark.benchmark(min_rounds=3)  # the fp32 Net2 takes ~180 ms a call
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp32 FFT"])
@pytest.mark.parametrize("impl", ["pyops", "torch Net2 fp32", "torch Net2 same precision"])
def bench_net1_128x128_cuda(measure, benchmark, models, device, precision, impl):
    if device != "cuda":
        pytest.skip("CUDA case")
    if precision == "fp32 FFT" and impl == "torch Net2 same precision":
        pytest.skip("the same precision is fp32: the 'torch Net2 fp32' row")
    _, net2, clf = models
    x = image((1, 3, 128, 128), device)
    with torch.no_grad():
        ref = net2(x)

    def net2_reduced():
        if precision == "tf32":
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
                return net2(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net2(x)

    ours = (lambda: clf(x, algorithm="fft")) if precision == "fp32 FFT" else (lambda: clf(x, precision=precision))
    fns = {"pyops": ours, "torch Net2 fp32": lambda: net2(x), "torch Net2 same precision": net2_reduced}
    with torch.no_grad():
        benchmark.extra_info["rel_err"] = rel_err(fns[impl](), ref)
        measure(f"Net1 128x128 B=1 pyops {precision} vs fp32 Net2", impl, fns[impl], flops=fcn_flops(net2, x))
