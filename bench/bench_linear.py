"""pyops.nn.LinearBNReLU (what fuse() makes of Linear [→ BatchNorm1d] → activation; pyops.linear_bias_act) vs the
eager nn.Sequential of those layers and torch.compile of it (inductor's freezing on the CPU, as
bench_conv_bn_relu.py), on the fully connected layers of the models in bench_fuse.py: VGG's classifier at batch 1
and 8, MobileNetV3's classifier and squeeze-excitation layers at batch 1, and the homework's Linear(16384→1024) →
BatchNorm1d → ReLU at its batch of 100, and a small MLP layer at a batch of 256 (a short reduction: the library's
product). Small batches run our weight-streaming kernel, large ones the library's
product (pyops/linear.py); "fp32" rows also report the weight's bytes read per second ("GB/s": the kernel's bound).
"""

import pytest
import torch
import torch.nn as nn

import pyops
from conftest import skip_unless_compile_timed

# (name, in_features, out_features, BatchNorm1d?, activation module, batch)
CASES = [
    ("vgg fc6", 25088, 4096, False, nn.ReLU, 1),
    ("vgg fc6", 25088, 4096, False, nn.ReLU, 8),
    ("vgg fc7", 4096, 4096, False, nn.ReLU, 1),
    ("mobilenet_v3 classifier", 960, 1280, False, nn.Hardswish, 1),
    ("mobilenet_v3 squeeze-excitation", 960, 240, False, nn.ReLU, 1),
    ("homework fc1 + BN1d", 16384, 1024, True, nn.ReLU, 100),
    ("MLP hidden", 64, 64, False, nn.ReLU, 256),
]
IMPLS = ["pyops", "eager", "torch.compile"]


def make_layers(in_features, out_features, batchnorm, activation, device):
    torch.manual_seed(0)
    layers = [nn.Linear(in_features, out_features)]
    if batchnorm:
        bn = nn.BatchNorm1d(out_features)
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
        layers.append(bn)
    return nn.Sequential(*layers, activation()).eval().to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[5]}".replace(" ", "_"))
def bench_linear_act(measure, device, case, impl):
    name, cin, cout, batchnorm, activation, batch = case
    skip_unless_compile_timed(impl)
    block = make_layers(cin, cout, batchnorm, activation, device)
    if impl == "pyops":
        block = pyops.fuse(block)
        assert any(isinstance(m, pyops.nn.LinearBNReLU) for m in block.modules())
    elif impl == "torch.compile":
        block = torch.compile(block, options={"freezing": True}) if device == "cpu" else torch.compile(block)
    x = torch.randn(batch, cin, generator=torch.Generator().manual_seed(1)).to(device)
    act = activation.__name__.lower()
    bn = " + bn1d" if batchnorm else ""
    with torch.no_grad():
        measure(f"linear{bn} + {act} {name} {cin}->{cout} b{batch} fp32", impl, lambda: block(x),
                flops=2 * batch * cin * cout, bytes=4 * (cin * cout + batch * (cin + cout)))
