"""Whole-model fusion: pyops.fuse(m) vs the eager model m and torch.compile(m), inference (eval, no_grad, 3×224×224).

Targets (issue 3): torchvision resnet18, fp32, batch 1 and 8: fuse(m) ≥ 1.1× eager (CPU and CUDA);
torchvision resnet50, batch 32 (CUDA only): ≥ 1.2× eager in fp32 and ≥ 2.0× in fp16 channels_last, with
torch.compile (2.36× eager on an H100) as the peer to report against. torch.compile (inductor) is the strongest
peer; it compiles in the warm-up, outside the timer, in about 100 s per batch size on this 2-core CPU (first run;
inductor's cache makes reruns faster). PYOPS_BENCH_COMPILE=0 leaves it out.
"""

import pytest
import torch
import torchvision

import pyops
from conftest import skip_unless_compile_timed
from pyops.demo.conv_bn_relu import homework_setup, randomize_batchnorms_

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# per 3×224×224 image: torchvision's GMACs × 2
FLOPS = {"resnet18": 2 * 1.814e9, "resnet50": 2 * 4.089e9, "efficientnet_b0": 2 * 0.386e9,
         "mobilenet_v3_large": 2 * 0.217e9, "vgg11": 2 * 7.609e9, "squeezenet1_1": 2 * 0.349e9}


def torchvision_model(name, device, dtype=torch.float32, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    model = randomize_batchnorms_(getattr(torchvision.models, name)(weights=None), torch.Generator().manual_seed(0))
    return model.eval().to(device, dtype, memory_format=memory_format)


IMPLS = {
    "pyops": pyops.fuse,
    "eager": lambda m: m,
    "torch.compile": lambda m: torch.compile(m, dynamic=False),
}


def run_case(measure, device, name, batch, impl, dtype=torch.float32, memory_format=torch.contiguous_format,
             autocast=None):
    """autocast: a dtype to run the float32 model in a torch.autocast region of (the model and input stay fp32)."""
    skip_unless_compile_timed(impl)
    model = IMPLS[impl](torchvision_model(name, device, dtype, memory_format))
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x = x.to(device, dtype, memory_format=memory_format)
    layout = "-CL" if memory_format == torch.channels_last else ""
    precision = DTYPE_NAMES[dtype] if autocast is None else f"{DTYPE_NAMES[autocast]}-autocast"

    def forward():
        if autocast is None:
            return model(x)
        with torch.autocast(device, dtype=autocast):
            return model(x)

    with torch.no_grad():
        measure(f"{name} fwd batch {batch} 3x224x224 {precision}{layout}", impl, forward, flops=FLOPS[name] * batch)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", [1, 8])
def bench_resnet18(measure, device, impl, batch):
    run_case(measure, device, "resnet18", batch, impl)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_large"])
def bench_swish_models(measure, device, impl, name):
    """Models whose Conv → BN blocks end in SiLU (EfficientNet) or Hardswish (MobileNetV3), fused into the layers'
    epilogues, batch 1 fp32."""
    run_case(measure, device, name, 1, impl)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", ["vgg11", "squeezenet1_1"])
def bench_models_without_batchnorm(measure, device, impl, name):
    """Models whose Conv2d → ReLU layers have no BatchNorm, fused with the ReLU in the epilogue, batch 1 fp32."""
    run_case(measure, device, name, 1, impl)


@pytest.mark.parametrize("impl", ["pyops", "eager"])
@pytest.mark.parametrize("mode", ["bf16", "bf16-autocast", "fp16"])
def bench_resnet18_half(measure, device, impl, mode):
    """Half-precision inference on the CPU: a bfloat16 model, a float32 one in a bfloat16 autocast region (oneDNN
    computes bf16 where the CPU has AVX-512 BF16 / AMX; elsewhere both sides compute in float32), a float16 model
    (computed in float32 by both). The fused layers run oneDNN with their epilogue, channels_last from the stem on,
    with their weights converted once (ConvBNReLU2d._converted_weights)."""
    if device != "cpu":
        pytest.skip("a CPU row (CUDA's half-precision rows are resnet50's)")
    if mode == "bf16-autocast":
        run_case(measure, device, "resnet18", 1, impl, autocast=torch.bfloat16)
    else:
        run_case(measure, device, "resnet18", 1, impl, {"bf16": torch.bfloat16, "fp16": torch.float16}[mode])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype,memory_format,autocast", [(torch.float32, torch.contiguous_format, None),
                                                          (torch.float16, torch.channels_last, None),
                                                          (torch.float32, torch.channels_last, torch.float16)],
                         ids=["fp32", "fp16-CL", "fp16-autocast-CL"])
def bench_resnet50_batch32(measure, device, impl, dtype, memory_format, autocast):
    """fp16-autocast-CL: how most users run fp16 inference; fused layers then take the op (its autocast kernel casts)
    instead of ConvBNReLU2d's direct cuDNN call."""
    if device != "cuda":
        pytest.skip("resnet50 batch 32 is a CUDA target (seconds per forward on this 2-core CPU)")
    run_case(measure, device, "resnet50", 32, impl, dtype, memory_format, autocast)


@pytest.mark.parametrize("impl", ["pyops", "eager-frozen-bn", "eager-eval-bn"])
def bench_resnet18_finetune(measure, device, impl):
    """Fine-tuning with frozen BatchNorm statistics (detection backbones): forward and backward of resnet18, batch
    4, every weight trained. pyops: the fused model (its layers' autograd: one pass applies the ReLU mask and the BN
    scale before ATen's convolution backward). The eager peers: torchvision's FrozenBatchNorm2d layers (what
    detection models use), and BatchNorm2d layers in eval mode (one fused batch_norm kernel each way)."""
    model = torchvision_model("resnet18", device)
    if impl == "pyops":
        model = pyops.fuse(model)
    elif impl == "eager-frozen-bn":  # (the same statistics, in torchvision's FrozenBatchNorm2d buffers)
        frozen = torchvision.models.resnet18(weights=None, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
        frozen.load_state_dict(model.state_dict())
        model = frozen.to(device)
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = model(x).square().mean()
        return torch.autograd.grad(loss, parameters)

    # (forward and backward: 3 times the forward's operations)
    measure("resnet18 fwd+bwd batch 4 3x224x224 fp32 (frozen BN)", impl, step, flops=3 * FLOPS["resnet18"] * 4)


def speech_block(device):
    """A QuartzNet block on 8 × 256 × 400 (8 clips of 4 s of 10 ms frames): 5 × (depthwise Conv1d k33 → pointwise
    Conv1d 256→256 → BatchNorm1d → ReLU), random weights and BN statistics, eval mode."""
    torch.manual_seed(0)
    layers = []
    for _ in range(5):
        layers += [torch.nn.Conv1d(256, 256, 33, padding=16, groups=256), torch.nn.Conv1d(256, 256, 1),
                   torch.nn.BatchNorm1d(256), torch.nn.ReLU()]
    model = randomize_batchnorms_(torch.nn.Sequential(*layers), torch.Generator().manual_seed(0))
    return model.eval().to(device)


# (name, channels, squeezed channels, activation, gate, map size): MobileNetV3-Large's last block and
# EfficientNet-B0's 672-channel blocks
SE_BLOCKS = [("mobilenet_v3", 960, 240, torch.nn.ReLU, torch.nn.Hardsigmoid, 7),
             ("efficientnet", 672, 28, torch.nn.SiLU, torch.nn.Sigmoid, 14)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("block", SE_BLOCKS, ids=lambda b: b[0])
def bench_squeeze_excitation(measure, device, impl, block):
    """torchvision's SqueezeExcitation at batch 1: average pool, 1×1 conv → activation, 1×1 conv → gate (both
    convs on a 1×1 map: one ConvBNReLU2d each, run as products over the batch), scale."""
    skip_unless_compile_timed(impl)
    name, channels, squeezed, activation, gate, size = block
    torch.manual_seed(0)
    se = torchvision.ops.SqueezeExcitation(channels, squeezed, activation, gate).eval().to(device)
    model = IMPLS[impl](se)
    x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        measure(f"{name} squeeze-excitation {channels}->{squeezed} {gate.__name__.lower()} b1 {size}x{size} fp32",
                impl, lambda: model(x), flops=2 * 2 * channels * squeezed)


@pytest.mark.parametrize("impl", list(IMPLS))
def bench_homework_network(measure, device, impl):
    """The issue's network (conv 3→16 and 16→16 + BN + ReLU on 32×32, Linear 16384→1024 + BN1d + ReLU, Linear
    1024→10 + ReLU) at its batch of 100: two ConvBNReLU2d and two LinearBNReLU fused."""
    skip_unless_compile_timed(impl)
    model = IMPLS[impl](homework_setup(seed=0, batches=1)[0].to(device))
    x = torch.rand(100, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    flops = 2 * 100 * (32 * 32 * 16 * (3 + 16) * 9 + 16384 * 1024 + 1024 * 10)
    with torch.no_grad():
        measure("homework network fwd batch 100 3x32x32 fp32", impl, lambda: model(x), flops=flops)


@pytest.mark.parametrize("impl", list(IMPLS))
def bench_speech_block(measure, device, impl):
    """1-D inference: pyops.nn.swap_conv1d(pyops.fuse(m)) (the README's recipe: each pointwise → BN → ReLU one
    FoldedConv1d applying the ReLU as its kernel stores, the depthwise layers pyops.conv1d) vs eager and
    torch.compile."""
    skip_unless_compile_timed(impl)
    model = speech_block(device)
    model = pyops.nn.swap_conv1d(pyops.fuse(model)) if impl == "pyops" else IMPLS[impl](model)
    x = torch.randn(8, 256, 400, generator=torch.Generator().manual_seed(1)).to(device)
    flops = 5 * 2 * 8 * 400 * 256 * (33 + 256)  # multiply-adds of the depthwise and pointwise layers, x 2
    with torch.no_grad():
        measure("QuartzNet block fwd batch 8 256x400 fp32", impl, lambda: model(x), flops=flops)


@pytest.mark.parametrize("impl", list(IMPLS))
def bench_tcn_block(measure, device, impl):
    """A dense 1-D block: 3 x (Conv1d 128→128 k3 → BatchNorm1d → ReLU) on 4 x 128 x 1024, each layer one
    FoldedConv1d (pyops' correlation kernels with the ReLU applied as they store) vs eager and torch.compile."""
    skip_unless_compile_timed(impl)
    torch.manual_seed(0)
    layers = [m for _ in range(3) for m in (torch.nn.Conv1d(128, 128, 3, padding=1), torch.nn.BatchNorm1d(128),
                                            torch.nn.ReLU())]
    model = randomize_batchnorms_(torch.nn.Sequential(*layers), torch.Generator().manual_seed(0)).eval().to(device)
    model = IMPLS[impl](model)
    x = torch.randn(4, 128, 1024, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        measure("TCN block fwd batch 4 128x1024 fp32", impl, lambda: model(x), flops=3 * 2 * 4 * 1024 * 128 * 128 * 3)
