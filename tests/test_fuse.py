"""pyops.fold_bn, pyops.fuse and the fused modules of pyops.nn against the unfused PyTorch models they replace."""
import contextlib
import copy
import functools
import itertools
import operator
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from conftest import ACTIVATION_REFERENCES, autocast_compute_dtype, run_in_threads, tolerances
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import FrozenBatchNorm2d

import pyops
from pyops.demo.conv_bn_relu import HomeworkNet, homework_setup, max_squared_error, randomize_batchnorms_
from pyops.conv_bn_relu import conv2d_bias_act
from pyops.fuse import fuse_sequentials
from pyops.nn import ConvBNReLU2d, LinearBNReLU


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randomized(model, seed=0):
    return randomize_batchnorms_(model, gen(seed)).eval()


def state_snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(module, snapshot):
    state = module.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), f"{k} was modified"


def assert_no_batchnorm(model):
    norms = [name for name, m in model.named_modules() if isinstance(m, (_BatchNorm, FrozenBatchNorm2d))]
    assert not norms, f"BatchNorms left: {norms}"


def assert_close_relative(actual, expected, rtol):
    """max |actual - expected| <= rtol * max |expected| (outputs of deep networks: one scale for all entries)."""
    err = (actual - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), f"max abs error {err} vs scale {expected.abs().max().item()}"


# --- (a) the homework's network -----------------------------------------------------------------------------------

def test_homework_network_meets_the_criterion(device):
    model, fused, inputs = homework_setup(seed=0, batches=5, batch_size=100)
    model, fused = model.to(device), fused.to(device)
    assert_no_batchnorm(fused)
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(ConvBNReLU2d) == 2 and kinds.count(LinearBNReLU) == 2  # (the last Linear → ReLU has no BN)
    assert [m.folds_batchnorm for m in fused.modules() if isinstance(m, LinearBNReLU)] == [True, False]
    error = max_squared_error(model, fused, [x.to(device) for x in inputs])
    assert error < 1e-8


# --- (b) fold_bn --------------------------------------------------------------------------------------------------

LAYERS = {
    "conv1d": (lambda bias: nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=bias), nn.BatchNorm1d, (3, 4, 11)),
    "conv2d": (lambda bias: nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=bias), nn.BatchNorm2d, (3, 4, 9, 8)),
    "conv3d": (lambda bias: nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=bias), nn.BatchNorm3d, (2, 4, 3, 5, 6)),
    "linear": (lambda bias: nn.Linear(7, 6, bias=bias), nn.BatchNorm1d, (5, 7)),
    "convtranspose1d": (lambda bias: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=bias),
                        nn.BatchNorm1d, (3, 4, 11)),
    "convtranspose2d": (lambda bias: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, dilation=2, bias=bias),
                        nn.BatchNorm2d, (3, 4, 9, 8)),
    "convtranspose3d": (lambda bias: nn.ConvTranspose3d(4, 6, (1, 3, 3), stride=(1, 2, 2), output_padding=(0, 1, 0),
                                                        bias=bias), nn.BatchNorm3d, (2, 4, 3, 5, 6)),
}


def make_pair(kind, bias=True, affine=True, dtype=torch.float64, seed=0):
    make_layer, make_bn, input_shape = LAYERS[kind]
    torch.manual_seed(seed)
    layer, bn = make_layer(bias).to(dtype), make_bn(6, affine=affine).to(dtype)
    randomized(bn, seed)
    return layer.eval(), bn, torch.randn(input_shape, dtype=dtype, generator=gen(seed + 1))


@pytest.mark.parametrize("kind,bias,affine", list(itertools.product(LAYERS, [True, False], [True, False])))
def test_fold_bn_is_exact_in_float64(kind, bias, affine):
    layer, bn, x = make_pair(kind, bias, affine)
    before = (state_snapshot(layer), state_snapshot(bn))
    folded = pyops.fold_bn(layer, bn)
    assert type(folded) is type(layer) and folded is not layer
    assert isinstance(folded.bias, nn.Parameter) and folded.bias.requires_grad == (bias or affine)
    rtol, atol = tolerances(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(layer(x)), rtol=rtol, atol=atol)
    assert_state_equal(layer, before[0])
    assert_state_equal(bn, before[1])
    assert (layer.bias is None) == (not bias) and not bn.training


def test_fold_bn_fp32_on_device(device):
    layer, bn, x = make_pair("conv2d", dtype=torch.float32)
    layer, bn, x = layer.to(device), bn.to(device), x.to(device)
    folded = pyops.fold_bn(layer, bn)
    assert folded.weight.device == layer.weight.device
    expected = bn.double()(layer.double()(x.double()))
    rtol, atol = tolerances(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_bn_half_precision_weights_are_rounded_once_from_float64(dtype):
    layer64, bn64, _ = make_pair("conv2d")
    layer, bn = copy.deepcopy(layer64).to(dtype), copy.deepcopy(bn64).to(dtype)
    folded = pyops.fold_bn(layer, bn)
    assert folded.weight.dtype == dtype and folded.bias.dtype == dtype
    # the float64 fold of the same (rounded) half-precision values, rounded once: equal to the last bit
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = (layer.weight.double() * scale[:, None, None, None]).to(dtype)
    bias = ((layer.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()).to(dtype)
    assert torch.equal(folded.weight, weight) and torch.equal(folded.bias, bias)


def test_fold_bn_keeps_channels_last_layout():
    for kind, fmt in (("conv2d", torch.channels_last), ("conv3d", torch.channels_last_3d),
                      ("convtranspose2d", torch.channels_last)):
        layer, bn, x = make_pair(kind)
        layer.weight.data = layer.weight.data.contiguous(memory_format=fmt)
        folded = pyops.fold_bn(layer, bn)
        assert folded.weight.is_contiguous(memory_format=fmt) and not folded.weight.is_contiguous()
        with torch.no_grad():
            torch.testing.assert_close(folded(x), bn(layer(x)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("groups,out_channels", [(2, 6), (4, 8), (4, 4)])  # grouped, grouped, depthwise
def test_fold_bn_grouped_convolutions(groups, out_channels, transposed):
    # (a ConvTranspose's (C_in, C_out/groups, k, k) weight holds its output channels on dim 1, group by group)
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    layer = cls(4, out_channels, 3, padding=1, groups=groups).double()
    bn = randomized(nn.BatchNorm2d(out_channels).double())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(pyops.fold_bn(layer, bn)(x), bn(layer(x)), rtol=1e-10, atol=1e-12)


def test_fold_bn_accepts_frozen_batchnorm():
    layer, _, x = make_pair("conv2d", bias=False)
    frozen = FrozenBatchNorm2d(6, eps=1e-3).double()
    for buffer in (frozen.weight, frozen.bias, frozen.running_mean):
        buffer.copy_(torch.randn(6, generator=gen(2)))
    frozen.running_var.copy_(torch.rand(6, generator=gen(3)) + 0.5)
    with torch.no_grad():
        torch.testing.assert_close(pyops.fold_bn(layer, frozen)(x), frozen(layer(x)), rtol=1e-10, atol=1e-12)


def test_fold_bn_keeps_hyper_parameters_and_flags():
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect").double()
    layer.weight.requires_grad_(False)
    bn = randomized(nn.BatchNorm2d(6).double())
    folded = pyops.fold_bn(layer, bn)
    assert (folded.stride, folded.padding, folded.padding_mode) == ((2, 2), (1, 1), "reflect")
    assert folded.weight.requires_grad and folded.bias.requires_grad  # (γ, β trainable)
    assert not pyops.fold_bn(layer, bn.requires_grad_(False)).weight.requires_grad
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(layer(x)), rtol=1e-10, atol=1e-12)
    layer = nn.ConvTranspose2d(4, 6, 3, stride=(2, 3), padding=1, output_padding=(1, 2), dilation=2).double()
    folded = pyops.fold_bn(layer, bn)
    assert (folded.stride, folded.padding, folded.output_padding, folded.dilation) == ((2, 3), (1, 1), (1, 2), (2, 2))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(layer(x)), rtol=1e-10, atol=1e-12)


def test_fold_bn_rejects_bad_arguments():
    layer, bn, _ = make_pair("conv2d")
    with pytest.raises(ValueError, match="training mode"):
        pyops.fold_bn(layer, copy.deepcopy(bn).train())
    with pytest.raises(ValueError, match="running statistics"):
        pyops.fold_bn(layer, nn.BatchNorm2d(6, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="channels"):
        pyops.fold_bn(layer, nn.BatchNorm2d(5).eval())
    with pytest.raises(TypeError, match="layer"):
        pyops.fold_bn(nn.Bilinear(4, 4, 6), bn)
    with pytest.raises(TypeError, match="bn"):
        pyops.fold_bn(layer, nn.LayerNorm(6))
    # a BatchNorm of another rank: unfused, the pair raises on the input's rank (the fused layer ran)
    for other in (nn.BatchNorm1d(6), nn.BatchNorm3d(6)):
        with pytest.raises(ValueError, match=f"{type(other).__name__}, which does not normalize"):
            pyops.fold_bn(layer, other.eval())
        with pytest.raises(ValueError, match="does not normalize"):
            ConvBNReLU2d.from_modules(layer, other.eval())
    with pytest.raises(ValueError, match="does not normalize"):
        pyops.fold_bn(nn.Linear(4, 6), nn.BatchNorm2d(6).eval())
    with pytest.raises(ValueError, match="does not normalize"):
        pyops.fold_bn(nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm1d(6).eval())
    with pytest.raises(ValueError, match="channels"):
        pyops.fold_bn(nn.ConvTranspose2d(6, 4, 3), bn)  # 6 input channels, 4 output


# --- pyops.nn modules ---------------------------------------------------------------------------------------------

def conv_bn(cin=4, cout=6, seed=0, **conv_args):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, **conv_args).double().eval()
    return conv, randomized(nn.BatchNorm2d(cout).double(), seed)


@pytest.mark.parametrize("relu,activation", [(True, "relu"), (nn.ReLU(inplace=True), "relu"), ("relu6", "relu6"),
                                             (nn.ReLU6(), "relu6"), (False, "none"), (nn.SiLU(), "silu"),
                                             ("silu", "silu"), (nn.Hardswish(inplace=True), "hardswish"),
                                             ("hardswish", "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"),
                                             (nn.Sigmoid(), "sigmoid"), ("sigmoid", "sigmoid")])
def test_conv_bn_relu_module_matches_the_unfused_chain(relu, activation):
    conv, bn = conv_bn(padding=1, stride=2)
    fused = ConvBNReLU2d.from_modules(conv, bn, relu)
    assert fused.activation == activation
    act = ACTIVATION_REFERENCES[activation]
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, generator=gen()) * 3
    residual = torch.randn(2, 6, 5, 5, dtype=torch.float64, generator=gen(1)) * 3
    broadcast = torch.randn(6, 1, 1, dtype=torch.float64, generator=gen(2))
    with torch.no_grad():
        for res in (None, residual, broadcast):
            expected = act(bn(conv(x)) + (0 if res is None else res))
            torch.testing.assert_close(fused(x, res), expected, rtol=1e-10, atol=1e-12)
        for res in (None, residual[0], broadcast):  # unbatched input, as nn.Conv2d takes
            expected = act(bn(conv(x[:1]))[0] + (0 if res is None else res))
            torch.testing.assert_close(fused(x[0], res), expected, rtol=1e-10, atol=1e-12)


def test_conv_bn_relu_module_repr_and_state_dict():
    conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False).eval()
    bn = randomized(nn.BatchNorm2d(64))
    fused = ConvBNReLU2d.from_modules(conv, bn)
    assert repr(fused) == ("ConvBNReLU2d(3, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=True, "
                           "activation=relu)")
    assert set(fused.state_dict()) == {"weight", "bias"}
    fresh = ConvBNReLU2d(3, 64, 7, stride=2, padding=3)
    fresh.load_state_dict(fused.state_dict())
    x = torch.rand(1, 3, 32, 32, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fused(x), rtol=0, atol=0)
    assert fused.double().weight.dtype == torch.float64  # parameters follow .to()/.double()/.half()


def test_conv_bn_relu_module_same_padding_and_rejections():
    conv, bn = conv_bn(padding="same", dilation=2)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    assert fused.padding == (2, 2)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), F.relu(bn(conv(x))), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="padding_mode"):
        ConvBNReLU2d.from_modules(*conv_bn(padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match="same"):
        ConvBNReLU2d.from_modules(nn.Conv2d(4, 6, 2, padding="same").eval(), nn.BatchNorm2d(6).eval())
    with pytest.raises(ValueError, match="relu"):
        ConvBNReLU2d.from_modules(conv, bn, relu="gelu")
    with pytest.raises(TypeError, match="conv"):
        ConvBNReLU2d.from_modules(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6).eval())


def test_conv_bn_relu_module_constructor_takes_conv2d_arguments():
    """The constructor takes nn.Conv2d's padding strings (padding='same' was split into ('s', 'a', 'm', 'e')) and
    refuses what nn.Conv2d refuses with a ValueError (groups=0 raised ZeroDivisionError); 0 output channels build."""
    x = torch.randn(1, 4, 7, 6, dtype=torch.float64, generator=gen())
    for padding, kwargs in [("same", dict(dilation=2)), ("valid", dict(stride=2))]:
        fused = ConvBNReLU2d(4, 6, 3, padding=padding, dtype=torch.float64, **kwargs)
        conv = nn.Conv2d(4, 6, 3, padding=padding, dtype=torch.float64, **kwargs)
        conv.load_state_dict(fused.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fused(x), F.relu(conv(x)), rtol=1e-10, atol=1e-12)
    assert ConvBNReLU2d(4, 0, 3, dtype=torch.float64)(x).shape == (1, 0, 5, 4)
    assert ConvBNReLU2d(4, 6, 3, groups=np.int64(2)).groups == 2  # (nn.Conv2d takes numpy integers; fuse passes them)
    for kwargs, message in [(dict(groups=0), "'groups' must be >= 1"),
                            (dict(padding="full"), "expected an int, a pair, 'valid' or 'same'"),
                            (dict(padding="same", stride=2), "not supported for strided"),
                            (dict(kernel_size=2, padding="same"), "pads asymmetrically"),
                            (dict(stride=0, padding="same"), "'stride' must be >= 1"),  # (named the padding)
                            (dict(dilation=(1, 0)), "'dilation' must be >= 1"),
                            (dict(padding=-1), "'padding' must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            ConvBNReLU2d(4, 6, **{"kernel_size": 3, **kwargs})


# --- the CPU packed-weight path of ConvBNReLU2d (fp32 inference: the weight packed once in oneDNN's layout) ----------

def fp32_conv_bn(cin=64, cout=24, k=3, seed=0, **conv_args):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, **conv_args).eval(), randomized(nn.BatchNorm2d(cout), seed)


def float64_chain(conv, bn, activation):
    """The unfused chain in float64 (a copy: conv and bn stay fp32)."""
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    act = ACTIVATION_REFERENCES[activation]
    return lambda x, residual=None: act(bn64(conv64(x.double())) + (0 if residual is None else residual.double()))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, "relu6", False, "silu", "hardswish", "hardsigmoid", "sigmoid"])
@pytest.mark.parametrize("conv_args", [dict(padding=1), dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                       dict(padding=0)], ids=["p1", "s2", "d2", "p0"])
def test_conv_bn_relu_module_packed_cpu_path(conv_args, relu, layout):
    """Packed (fp32, CPU, no grad): float64-chain values within fp32 tolerance, with and without a residual (ReLU6
    after a residual is a case oneDNN cannot fuse, computed by our direct kernel); the output is channels_last, as
    PyTorch's convolution with a channels_last weight returns."""
    conv, bn = fp32_conv_bn(**conv_args)
    fused = ConvBNReLU2d.from_modules(conv, bn, relu)
    chain = float64_chain(conv, bn, fused.activation)
    x = torch.randn(2, 64, 11, 13, generator=gen()) * 2
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    out_shape = chain(x).shape
    with torch.no_grad():
        for residual in (None, torch.randn(out_shape, generator=gen(1))):
            out = fused(x, residual)
            assert fused._derived is not None, "the packed path was not taken"
            assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
            assert_close_relative(out.double(), chain(x, residual), 2e-6)


@pytest.mark.parametrize("relu", [True, "relu6", False, "silu"])
@pytest.mark.parametrize("groups, cout, k", [(4, 24, 3), (64, 64, 3), (64, 128, 5), (2, 24, 1)],
                         ids=["grouped", "depthwise", "multiplier", "grouped-1x1"])
def test_grouped_module_packed_on_channels_last(groups, cout, k, relu):
    """Grouped, depthwise and depth-multiplier layers pack on a channels_last input (stop 27): float64-chain values
    within fp32 tolerance with and without a residual, strided too; a channels_last output."""
    for stride in (1, 2):
        conv, bn = fp32_conv_bn(cout=cout, k=k, stride=stride, padding=k // 2, groups=groups)
        fused = ConvBNReLU2d.from_modules(conv, bn, relu)
        chain = float64_chain(conv, bn, fused.activation)
        x = (torch.randn(2, 64, 11, 13, generator=gen()) * 2).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for residual in (None, torch.randn(chain(x).shape, generator=gen(1))):
                out = fused(x, residual)
                assert fused._derived is not None, "the packed path was not taken"
                assert out.is_contiguous(memory_format=torch.channels_last)
                assert_close_relative(out.double(), chain(x, residual), 2e-6)


def packed_shapes(module):
    entry = module._derived
    return [] if entry is None else [e.kind[1] for e in (entry, *entry.older)]


def test_packed_weight_follows_input_shape_and_weight_updates():
    """A packed weight per input shape, the latest first, 8 at most (a layer shared by the levels of a feature
    pyramid repacked its weight on every call: 2x slower than eager); an update of the weight repacks."""
    conv, bn = fp32_conv_bn(padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    expected = lambda x: F.conv2d(x.double(), fused.weight.double(), fused.bias.double(), padding=1).relu()
    shapes = [(1, 64, 8, 8), (3, 64, 10, 6), (1, 64, 8, 8)] + [(1, 64, 5, 5 + i) for i in range(8)]
    with torch.no_grad():
        for i, shape in enumerate(shapes):
            x = torch.randn(shape, generator=gen())
            assert_close_relative(fused(x).double(), expected(x), 2e-6)
            assert packed_shapes(fused)[0] == shape and len(packed_shapes(fused)) == min(len(set(shapes[:i + 1])), 8)
            if i == 0:
                first = fused._derived.value
            if i == 2:
                assert fused._derived.value is first  # a shape seen again is served, not repacked
        assert (1, 64, 8, 8) not in packed_shapes(fused)  # the least recently used went first
        fused.weight.mul_(-0.5)  # an in-place update (optimizer step, load_state_dict) must repack
        assert_close_relative(fused(x).double(), expected(x), 2e-6)
        assert packed_shapes(fused) == [shape]  # the stale forms of the other shapes are dropped
    with torch.inference_mode():
        y_inference = fused(x)
    with torch.no_grad():  # a packing made under inference_mode serves later no_grad calls too
        torch.testing.assert_close(fused(x), y_inference, rtol=0, atol=0)


def test_packed_weight_is_keyed_by_the_weight_itself():
    """A fresh weight each call (torch.func.functional_call) or a replaced Parameter can land at the freed weight's
    address with the same version (0): the packing is keyed by the tensor's identity, so it is never served for
    another weight (an address-only key returned the previous weight's results, errors of 2-126)."""
    conv, bn = fp32_conv_bn(padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn, "none")
    x = torch.randn(1, 64, 8, 8, generator=gen())
    w, b = fused.weight.detach(), fused.bias.detach()
    with torch.no_grad():
        for scale in (1.0, 2.0, -3.0, 0.5, 1.0, 2.0):
            y = torch.func.functional_call(fused, {"weight": w * scale, "bias": b}, (x,))
            assert_close_relative(y.double(), F.conv2d(x.double(), w.double() * scale, b.double(), padding=1), 2e-6)
        for seed in range(4):
            fused.weight = nn.Parameter(torch.randn(w.shape, generator=gen(seed)))
            assert_close_relative(fused(x).double(), F.conv2d(x.double(), fused.weight.double(), b.double(),
                                                              padding=1), 2e-6)


def test_packed_weight_follows_a_data_swap_at_a_reused_address():
    """`param.data = t` keeps the Parameter and its version counter: a new weight at a freed weight's address matched
    a key of (object, address, version), and the freed weight's packing served. The key holds the storage's
    identity too. (Weights made by torch.frombuffer over one buffer: a new storage at the same address, every time.)"""
    fused = ConvBNReLU2d.from_modules(*fp32_conv_bn(64, 64, padding=1), "none")
    x, b, shape = torch.randn(1, 64, 8, 8, generator=gen()), fused.bias.detach().double(), fused.weight.shape
    memory = bytearray(fused.weight.numel() * 4)
    with torch.no_grad():
        for seed in range(3):
            weight = torch.frombuffer(memory, dtype=torch.float32).view(shape)
            weight.copy_(torch.randn(shape, generator=gen(seed)))
            fused.weight.data = weight
            ref = F.conv2d(x.double(), weight.double(), b, padding=1)
            assert_close_relative(fused(x).double(), ref, 2e-6)  # packs this weight (the first call) or reuses it


def test_fused_layers_under_vmap(device):
    """torch.func.vmap hands the layers batched tensors: the op's batching rule takes them, not the inference-only
    paths (packed weights, the widening stem's layout conversion), which raised."""
    for cin in (64, 3):  # a packed layer, a widening stem
        fused = ConvBNReLU2d.from_modules(*fp32_conv_bn(cin, 64, padding=1)).to(device)
        x = torch.randn(3, 2, cin, 8, 8, generator=gen()).to(device)
        with torch.no_grad():
            torch.testing.assert_close(torch.func.vmap(fused)(x), torch.stack([fused(xi) for xi in x]),
                                       rtol=1e-5, atol=1e-5)


def test_fused_layer_ensemble_under_vmap(device):
    """An ensemble (torch.func.stack_module_state + vmap over functional_call) batches the weights, not the input:
    a plain input with batched weights must not take the packed path either (it read the batched weight's data
    pointer and raised)."""
    members = [ConvBNReLU2d.from_modules(*fp32_conv_bn(64, 64, padding=1, seed=s)).to(device) for s in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    x = torch.randn(2, 64, 8, 8, generator=gen()).to(device)

    def member(p, b):
        return torch.func.functional_call(members[0], (p, b), (x,))

    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(member)(params, buffers), torch.stack([m(x) for m in members]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_module_carries_forward_mode_tangents(device, channels_last):
    """Under no_grad a dual input skips neither to the packed (CPU) nor to the cuDNN (CUDA) shortcut, which would
    drop its tangent: it reaches the op, which carries it (the unfused chain's jvp)."""
    conv, bn = fp32_conv_bn(padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn).to(device)
    chain = nn.Sequential(conv, bn, nn.ReLU()).eval().to(device)
    x = torch.randn(2, 64, 8, 8, generator=gen()).to(device)
    v = torch.randn(2, 64, 8, 8, generator=gen(1)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        ours = torch.autograd.forward_ad.unpack_dual(fused(torch.autograd.forward_ad.make_dual(x, v)))
        expected = torch.autograd.forward_ad.unpack_dual(chain(torch.autograd.forward_ad.make_dual(x, v)))
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and outside a dual level the shortcuts serve again
        fused(x)
        if device == "cpu":
            assert fused._derived is not None


def test_packed_module_serves_threads_with_different_shapes():
    """Threads calling one module with alternating input shapes (each shape packs anew) all get right answers."""
    conv, bn = fp32_conv_bn(padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    inputs = [torch.randn(shape, generator=gen()) for shape in [(1, 64, 8, 8), (2, 64, 6, 6), (1, 64, 5, 7)]]
    expected = [F.conv2d(x.double(), fused.weight.double(), fused.bias.double(), padding=1).relu() for x in inputs]
    def serve(offset):
        with torch.no_grad():
            for i in range(15):
                k = (i + offset) % len(inputs)
                assert_close_relative(fused(inputs[k]).double(), expected[k], 2e-6)

    errors = run_in_threads(serve)
    assert not errors, errors


def test_packed_module_copies_pickles_converts_and_trains():
    conv, bn = fp32_conv_bn(padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    x = torch.randn(2, 64, 9, 9, generator=gen())
    with torch.no_grad():
        y = fused(x)
    assert fused._derived is not None
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert clone._derived is None  # an MKLDNN tensor is neither copied nor pickled; it is rebuilt
        with torch.no_grad():
            torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    as64 = copy.deepcopy(fused)
    with torch.no_grad():
        as64(x)
    as64.double()
    assert as64._derived is None
    with torch.no_grad():
        assert_close_relative(as64(x.double()), y.double(), 2e-6)
    # With grad needed the packed path is skipped: gradients flow as through the unpacked op.
    xg = x.clone().requires_grad_()
    out = fused(xg)
    assert out.grad_fn is not None
    out.sum().backward()
    assert xg.grad is not None and fused.weight.grad is not None
    torch.testing.assert_close(out.detach(), y.contiguous(), rtol=1e-5, atol=1e-5)


def test_packing_only_where_it_pays():
    """The measured rule: layers with >= 64 input channels pack when their input is channels_last, or when their
    kernel is spatial and they have one group; a 16-channel layer, a 1×1 or grouped layer on an NCHW input, fp64
    and calls that need grad do not (their results come from the unpacked op), nor a 1×1 layer the op runs as a
    GEMM (a channels_last input of few positions: pyops._C.one_by_one_runs_as_gemm; a grouped 1×1 layer, which
    the op never runs as one, packs)."""
    cl, nchw = torch.channels_last, torch.contiguous_format
    cases = [(fp32_conv_bn(cin=16, padding=1), 16, nchw, 8, False),
             (fp32_conv_bn(k=1), 64, nchw, 8, False), (fp32_conv_bn(k=1), 64, cl, 8, False),
             (fp32_conv_bn(k=1, cout=256), 64, cl, 64, True),
             (fp32_conv_bn(padding=1, groups=4), 64, nchw, 8, False),
             (fp32_conv_bn(padding=1, groups=4), 64, cl, 8, True),
             (fp32_conv_bn(cout=64, padding=1, groups=64), 64, cl, 8, True),
             (fp32_conv_bn(k=1, groups=2), 64, cl, 8, True),
             (fp32_conv_bn(padding=1), 64, nchw, 8, True), (fp32_conv_bn(padding=1), 64, cl, 8, True)]
    for (conv, bn), cin, layout, side, packs in cases:
        fused = ConvBNReLU2d.from_modules(conv, bn)
        x = torch.randn(2, cin, side, side, generator=gen()).contiguous(memory_format=layout)
        with torch.no_grad():
            out = fused(x)
            assert (fused._derived is not None) == packs, (cin, conv, layout)
            assert_close_relative(out.double(), float64_chain(conv, bn, "relu")(x), 2e-6)
    fresh = ConvBNReLU2d.from_modules(*fp32_conv_bn(padding=1))
    fresh(torch.randn(1, 64, 8, 8, generator=gen()))  # grad mode, parameters requiring grad: the autograd path
    assert fresh._derived is None
    as64 = copy.deepcopy(fused).double()
    with torch.no_grad():
        as64(torch.randn(1, 64, 8, 8, generator=gen(), dtype=torch.float64))
    assert as64._derived is None


def test_widening_layer_returns_channels_last_in_cpu_inference():
    """A layer that widens < 64 channels into >= 64 (a stem) takes an NCHW fp32 input to channels_last in CPU
    inference, so that a fused network is channels_last from its stem on (same values); with grad, in float64, with
    fewer output channels or groups it keeps the op's rule (output in the input's layout)."""
    cl = torch.channels_last
    cases = [(fp32_conv_bn(cin=3, cout=64, k=7, stride=2, padding=3), True),
             (fp32_conv_bn(cin=16, cout=64, padding=1), True), (fp32_conv_bn(cin=3, cout=32, padding=1), False),
             (fp32_conv_bn(cin=64, cout=64, k=1), False), (fp32_conv_bn(cin=16, cout=64, padding=1, groups=2), False)]
    for (conv, bn), widens in cases:
        fused = ConvBNReLU2d.from_modules(conv, bn)
        x = torch.randn(2, conv.in_channels, 12, 12, generator=gen())
        with torch.no_grad():
            out = fused(x)
        assert out.is_contiguous(memory_format=cl) == widens and out.is_contiguous() != widens, conv
        assert_close_relative(out.double(), float64_chain(conv, bn, "relu")(x), 2e-6)
    fused = ConvBNReLU2d.from_modules(*fp32_conv_bn(cin=3, cout=64, padding=1))
    x = torch.randn(2, 3, 12, 12, generator=gen())
    assert fused(x).is_contiguous()  # grad mode, parameters requiring grad: the op's layout
    with torch.no_grad():
        assert copy.deepcopy(fused).double()(x.double()).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_widening_layer_in_half_precision(dtype):
    """In float16/bfloat16 a stem widens into channels_last too (oneDNN computes it, natively or in float32), so the
    layers after it stay channels_last: a bfloat16 resnet18 fused ran NCHW at eager's speed, 1.46x with it. Values:
    as the op's, whatever the layout."""
    conv, bn = fp32_conv_bn(cin=3, cout=64, k=7, stride=2, padding=3)
    fused = ConvBNReLU2d.from_modules(conv, bn).to(dtype)
    x = torch.randn(2, 3, 20, 20, generator=gen()).to(dtype)
    with torch.no_grad():
        out = fused(x)
        expected = conv2d_bias_act(x, fused.weight, fused.bias, 2, 3)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


# --- inference that converts: float16 on the CPU (computed in float32), any dtype in an autocast region ---------------

# (module dtype, autocast region dtype or None, whether inference converts before the op)
CONVERSIONS = [(torch.float16, None, True),
               (torch.bfloat16, None, not torch.ops.mkldnn._is_mkldnn_bf16_supported()),  # computed in float32
               (torch.float32, torch.bfloat16, autocast_compute_dtype("cpu", torch.bfloat16) is not torch.float32),
               (torch.float32, torch.float16, False),  # the CPU computes a float16 region in float32
               (torch.float16, torch.float16, True)]  # ... so a float16 model is converted there
# (input channels, output channels): where converting pays (ConvBNReLU2d._conversion_pays): never for a small layer,
# always for a widening one (its channels_last path) and one of >= 2^18 weights, for a float32 computation where
# the layer packs its weight
CONVERTED_LAYERS = {"small": (16, 24), "widening": (16, 64), "packing": (64, 24), "large": (512, 64)}


@pytest.mark.parametrize("dtype,region,converts", CONVERSIONS)
@pytest.mark.parametrize("layer", list(CONVERTED_LAYERS))
def test_inference_keeps_the_converted_weights(dtype, region, converts, layer):
    """CPU inference converts a layer's weight and bias to the dtype it computes in once and keeps them, where that
    pays: a float16 model computes in float32 (the op converted the weights on every call: a fused float16
    resnet18 took 44 ms vs 26 in float32) and a float32 model in a bfloat16 region in bfloat16 (29 -> 16 ms).
    Values and output dtype: the op's in the same place (the op converts x, weight, bias and residual the same
    way); an in-place update of the weight is followed, copies and pickles carry no converted weights."""
    cin, cout = CONVERTED_LAYERS[layer]
    conv, bn = fp32_conv_bn(cin=cin, cout=cout, padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn).to(dtype)
    x = torch.randn(2, cin, 9, 9, generator=gen()).to(dtype)
    residual = torch.randn(2, cout, 9, 9, generator=gen(1)).to(dtype)
    region_cm = (lambda: torch.autocast("cpu", dtype=region)) if region else contextlib.nullcontext
    out_dtype = autocast_compute_dtype("cpu", region) if region else dtype
    compute_dtype = autocast_compute_dtype("cpu", region) if region else torch.float32
    kept = converts and (layer in ("widening", "large") or (layer == "packing" and compute_dtype == torch.float32))
    rtol, atol = tolerances(torch.bfloat16 if torch.bfloat16 in (dtype, region) else torch.float16)

    def check():
        with torch.no_grad(), region_cm():
            for r in (None, residual):
                out = fused(x, r)
                expected = conv2d_bias_act(x, fused.weight, fused.bias, 1, 1, residual=r)
                assert out.dtype == expected.dtype == out_dtype
                torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    check()
    assert (fused._converted is not None) == kept
    if kept:
        converted = fused._converted.value[0]
        assert converted.dtype == compute_dtype
        if layer == "packing":
            assert fused._derived is not None, "the float32 conversion was not packed"
        check()
        assert fused._converted.value[0] is converted  # served, not converted again
        with torch.no_grad():
            fused.weight.mul_(-0.5)
        check()
        assert fused._converted.value[0] is not converted
        for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert clone._converted is None


def test_inference_converts_without_keeping_where_weights_may_change():
    """In training mode (a loop's own writes may bypass the version counter) and whenever autograd records the call
    the conversion is not kept (autograd: the op's autocast kernel casts, differentiably; gradients reach the
    float32 parameters); a weight swapped in for one call (torch.func.functional_call) is not served later."""
    fused = ConvBNReLU2d.from_modules(*fp32_conv_bn(cin=16, cout=64, padding=1)).half()  # (converting pays)
    x = torch.randn(2, 16, 9, 9, generator=gen()).half()
    rtol, atol = tolerances(torch.float16)  # (the module computes channels_last, the op here NCHW)
    with torch.no_grad():
        expected = conv2d_bias_act(x, fused.weight, fused.bias, 1, 1)
        fused.train()
        torch.testing.assert_close(fused(x), expected, rtol=rtol, atol=atol)
    assert fused._converted is None
    with torch.no_grad():
        fused.eval()
        w = fused.weight.detach() * 2  # another weight for one call (functional_call swaps the Parameter)
        torch.testing.assert_close(torch.func.functional_call(fused, {"weight": w}, (x,)),
                                   conv2d_bias_act(x, w, fused.bias, 1, 1), rtol=rtol, atol=atol)
        torch.testing.assert_close(fused(x), expected, rtol=rtol, atol=atol)  # not served the swapped weight's form
    fused = ConvBNReLU2d.from_modules(*fp32_conv_bn(cin=16, cout=64, padding=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x.float())
    out.float().sum().backward()
    assert fused._converted is None and fused.weight.grad is not None and fused.weight.grad.dtype == torch.float32


def test_packed_ops_reject_bad_arguments():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    packed = torch.ops.pyops.conv2d_pack_weight(x, w, *conv)
    run = torch.ops.pyops.conv2d_bias_act_packed
    with pytest.raises(ValueError, match="packed_weight"):
        run(x, w, w, None, *conv, 1, None)  # a dense tensor, not conv2d_pack_weight's result
    with pytest.raises(ValueError, match="packed_weight"):
        run(x, torch.randn(8, 4, 5, 5), packed, None, *conv, 1, None)  # packed for another weight
    with pytest.raises(ValueError, match="channels"):
        run(torch.randn(1, 3, 6, 6), w, packed, None, *conv, 1, None)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.pyops.conv2d_pack_weight(x.double(), w.double(), *conv)
    with pytest.raises(ValueError, match="stride"):
        torch.ops.pyops.conv2d_pack_weight(x, w, [0, 1], [1, 1], [1, 1], 1)


# --- the CUDA inference path of ConvBNReLU2d (cuDNN called from forward, without the op's host path) -------------

class CallCounter:
    """Wraps a function and counts its calls (to see which path a module took)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "nchw"), (torch.float32, "channels_last"),
                                          (torch.float16, "channels_last"), (torch.bfloat16, "channels_last"),
                                          (torch.float16, "nchw")])
@pytest.mark.parametrize("relu", [True, False, "relu6"])
def test_conv_bn_relu_module_cuda_inference_path(dtype, layout, relu, monkeypatch):
    """CUDA inference calls cuDNN from forward (runtime fusion for ReLU, the convolution for no activation; ReLU6 goes
    to the op): the op's values and layout, with and without a residual; an NCHW weight meets a channels_last input
    converted once; with grad, under a dispatch mode or with PYOPS_CONV_PATH=ours the op runs instead."""
    conv, bn = fp32_conv_bn(cin=32, cout=24, padding=1, stride=2)
    fused = ConvBNReLU2d.from_modules(conv, bn, relu).to("cuda", dtype)
    chain_cpu = float64_chain(conv, bn, fused.activation)
    chain = lambda t, r=None: chain_cpu(t.cpu(), None if r is None else r.cpu()).cuda()  # noqa: E731
    x = (torch.randn(2, 32, 15, 17, generator=gen()) * 2).to("cuda", dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    residual = torch.randn(chain(x).shape, generator=gen(1)).to("cuda", dtype).contiguous(memory_format=fmt)
    spies = {name: CallCounter(getattr(torch, name)) for name in ("cudnn_convolution_relu",
                                                                   "cudnn_convolution_add_relu")}
    spies["conv2d"] = CallCounter(F.conv2d)
    for name, spy in spies.items():
        monkeypatch.setattr(F if name == "conv2d" else torch, name, spy)
    direct = {"relu": 1, "none": 1, "relu6": 0}[fused.activation]

    def direct_calls(fn):  # fn(), and how many of the direct cuDNN calls it made
        before = sum(spy.calls for spy in spies.values())
        out = fn()
        return out, sum(spy.calls for spy in spies.values()) - before

    rtol, _ = tolerances(dtype)
    tol = 3 * rtol if dtype != torch.float32 else 2e-6
    op = torch.ops.pyops.conv2d_bias_act.default
    with torch.no_grad():
        for r in (None, residual):
            out, calls = direct_calls(lambda: fused(x, r))
            assert calls == direct
            assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
            via_op = op(x, fused.weight, fused.bias, fused.stride, fused.padding, fused.dilation, fused.groups,
                        {"relu": 1, "none": 0, "relu6": 2}[fused.activation], r)
            torch.testing.assert_close(out, via_op, rtol=rtol, atol=rtol)
            assert_close_relative(out.double(), chain(x, r), tol)
        if layout == "channels_last":  # the weight (NCHW, from fold_bn) was converted once for the channels_last input
            assert (fused._derived is not None) == bool(direct)
        monkeypatch.setenv("PYOPS_CONV_PATH", "ours")
        out, calls = direct_calls(lambda: fused(x))
        assert calls == 0
        assert_close_relative(out.double(), chain(x), tol)
        monkeypatch.delenv("PYOPS_CONV_PATH")
        with FlopCounterMode(display=False) as counter:
            _, calls = direct_calls(lambda: fused(x))
        assert calls == 0 and counter.get_total_flops() > 0
        with pytest.raises(ValueError, match="channels"):  # left to the op, whose error names the argument
            fused(torch.randn(2, 31, 15, 17, device="cuda", dtype=dtype))
    _, calls = direct_calls(lambda: fused(x.requires_grad_()).sum().backward())
    assert calls == 0 and x.grad is not None


@pytest.mark.parametrize("relu", [True, "relu6", False])
def test_linear_bn_relu_module_matches_the_unfused_chain(relu):
    torch.manual_seed(0)
    linear, bn = nn.Linear(7, 6).double(), randomized(nn.BatchNorm1d(6).double())
    fused = LinearBNReLU.from_modules(linear, bn, relu)
    act = {True: F.relu, "relu6": F.relu6, False: lambda t: t}[relu]
    x = torch.randn(5, 7, dtype=torch.float64, generator=gen()) * 3
    with torch.no_grad():
        torch.testing.assert_close(fused(x), act(bn(linear(x))), rtol=1e-10, atol=1e-12)


# --- (e) gradients with frozen statistics ------------------------------------------------------------------------

def test_conv_bn_relu_gradients_match_eval_mode_batchnorm(device):
    conv, bn = conv_bn(cin=3, cout=5, padding=1)
    conv, bn = conv.to(device), bn.to(device)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=gen()).to(device).requires_grad_()
    residual = torch.randn(2, 5, 6, 6, dtype=torch.float64, generator=gen(1)).to(device).requires_grad_()
    grad_out = torch.randn(2, 5, 6, 6, dtype=torch.float64, generator=gen(2)).to(device)

    expected = torch.autograd.grad(F.relu(bn(conv(x)) + residual), (x, residual, conv.weight, conv.bias), grad_out)
    got = torch.autograd.grad(fused(x, residual), (x, residual, fused.weight, fused.bias), grad_out)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    # W' = W·s and b' = (b − μ)·s + β, so dL/dW = dL/dW'·s and dL/db = dL/db'·s per output channel
    for e, g in zip(expected, (got[0], got[1], got[2] * scale[:, None, None, None], got[3] * scale)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert bn.weight.grad is None and bn.running_mean.grad is None  # statistics and affine frozen


def test_fused_module_gradcheck():
    conv, bn = conv_bn(cin=2, cout=3, padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=gen(), requires_grad=True)
    residual = torch.randn(1, 3, 5, 5, dtype=torch.float64, generator=gen(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, w, b: torch.func.functional_call(fused, {"weight": w, "bias": b},
                                                                                   (x, r)),
                                    (x, residual, fused.weight, fused.bias), fast_mode=True)
    linear = LinearBNReLU.from_modules(nn.Linear(4, 3).double(), randomized(nn.BatchNorm1d(3).double()))
    xl = torch.randn(5, 4, dtype=torch.float64, generator=gen(), requires_grad=True)
    assert torch.autograd.gradcheck(linear, (xl,), fast_mode=True)


# --- (c) torchvision models ----------------------------------------------------------------------------------------

MODELS = {"resnet18": (2, 3, 64, 64), "mobilenet_v2": (2, 3, 64, 64), "vgg11_bn": (1, 3, 64, 64)}


@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_torchvision_models(name, device):
    torch.manual_seed(0)
    model = randomized(getattr(torchvision.models, name)(weights=None)).to(device)
    snapshot = state_snapshot(model)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    fused = pyops.fuse(model)
    assert_no_batchnorm(fused)
    assert not any(isinstance(m, nn.Conv2d) for m in fused.modules())  # every conv had a BN after it
    assert sum(isinstance(m, ConvBNReLU2d) for m in fused.modules()) == convs
    assert not any(m.training for m in fused.modules())
    x = torch.rand(MODELS[name], generator=gen()).to(device)
    with torch.no_grad():
        assert_close_relative(fused(x), model(x), 1e-4)
    assert_state_equal(model, snapshot)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name,act_class,activation,gate_class,gate", [
    ("efficientnet_b0", nn.SiLU, "silu", nn.Sigmoid, "sigmoid"),
    ("mobilenet_v3_small", nn.Hardswish, "hardswish", nn.Hardsigmoid, "hardsigmoid")])
def test_fuse_folds_silu_and_hardswish_into_the_layers(name, act_class, activation, gate_class, gate, device):
    """EfficientNet's Conv → BN → SiLU and MobileNetV3's Conv → BN → Hardswish blocks become one fused layer each,
    the activation in its epilogue, and so do the squeeze-excitation blocks' Conv → SiLU / ReLU without a BN, their
    gates' Conv → Sigmoid / Hardsigmoid, and the classifier's Linear → Hardswish (MobileNetV3's): no activation
    module remains, and the outputs match."""
    torch.manual_seed(0)
    model = randomized(getattr(torchvision.models, name)(weights=None)).to(device)
    gates = sum(isinstance(m, gate_class) for m in model.modules())
    after_bn = sum(isinstance(m, torchvision.ops.Conv2dNormActivation) and isinstance(m[-1], act_class)
                   for m in model.modules())
    after_linear = sum(isinstance(m, act_class) for m in model.classifier.modules())
    after_conv = sum(isinstance(m, act_class) for m in model.modules()) - after_linear
    se_relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    fused = pyops.fuse(model)
    assert_no_batchnorm(fused)
    assert sum(isinstance(m, ConvBNReLU2d) and m.activation == activation for m in fused.modules()) == after_conv
    assert after_conv > after_bn > 10 or (activation == "hardswish" and after_conv == after_bn > 10)
    assert sum(isinstance(m, LinearBNReLU) and m.activation == activation for m in fused.modules()) == after_linear
    assert not any(isinstance(m, (act_class, gate_class)) for m in fused.modules())
    assert not any(isinstance(m, nn.ReLU) for m in fused.modules()) and (se_relus > 0) == (activation == "hardswish")
    assert sum(isinstance(m, ConvBNReLU2d) and m.activation == gate for m in fused.modules()) == gates > 2
    x = torch.rand(2, 3, 64, 64, generator=gen()).to(device)
    with torch.no_grad():
        assert_close_relative(fused(x), model(x), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_fuse_resnet18_half_precision(dtype, layout, device):
    model = randomized(torchvision.models.resnet18()).to(device)
    x = torch.rand(1, 3, 32, 32, generator=gen()).to(device)
    with torch.no_grad():
        reference = model.double()(x.double())
        model = model.to(dtype, memory_format=layout)
        x = x.to(dtype, memory_format=layout)
        fused = pyops.fuse(model)
        eager_error = (model(x).double() - reference).abs().max().item()
        fused_error = (fused(x).double() - reference).abs().max().item()
    # fusion rounds fewer intermediates than eager: no worse than eager's own error, or 1% of the output scale
    assert fused_error <= max(2 * eager_error, 1e-2 * reference.abs().max().item())


def test_fuse_resnet_fuses_residual_adds_and_relus():
    model = randomized(torchvision.models.resnet18())
    fused = pyops.fuse(model)
    calls = [n for n in fused.graph.nodes if n.op == "call_module"]
    assert sum("residual" in n.kwargs for n in calls) == 8  # one per BasicBlock
    assert not any(n.target in (operator.add, torch.add) for n in fused.graph.nodes)
    activations = [fused.get_submodule(n.target).activation for n in calls if isinstance(
        fused.get_submodule(n.target), ConvBNReLU2d)]
    assert activations.count("none") == 3  # the downsample shortcuts; everything else ends in a ReLU
    assert not any(isinstance(m, nn.ReLU) for m in fused.modules())


# --- (d) graph patterns, in-place, errors, the fallback ------------------------------------------------------------

class FunctionalBlocks(nn.Module):
    """Chains written with every ReLU spelling, residual adds (same-shape and broadcast), and links that must not
    fuse: a conv output with two users, a BN output with two users, a conv module called twice."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8 if i else 3, 8, 3, padding=1) for i in range(8))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(9))
        self.frozen = FrozenBatchNorm2d(8)
        self.offset = nn.Parameter(torch.randn(8, 1, 1))
        self.relu6 = nn.ReLU6(inplace=True)

    def forward(self, x):
        c, b = self.convs, self.bns
        x = F.relu(b[0](c[0](x)), inplace=True)
        x = torch.relu(b[1](c[1](x)) + x)
        x = self.relu6(torch.add(x, b[2](c[2](x))))
        x = b[3](c[3](x)).relu_()
        y = c[4](x)
        x = b[4](y) + y  # conv output used twice: BN stays
        z = b[5](c[5](x))
        x = F.relu(z) * z  # BN output used twice: fold only, the ReLU stays
        x = F.relu6(b[6](c[6](x)) + self.offset)  # broadcast residual
        x = F.relu(b[7](c[7](x))) + F.relu(b[8](c[7](x)))  # one conv, two BNs
        x = F.relu(self.frozen(c[1](x)))  # c[1] called again, FrozenBatchNorm2d
        return x * self.convs[0].weight.mean()  # a weight read directly: its conv must keep its name


class FunctionalSwish(nn.Module):
    """F.silu after a residual add, F.hardswish in place, a SiLU on a BN output used twice (not fusable), and a
    squeeze-excitation gate's conv (no BN) → torch.sigmoid, Tensor.sigmoid or F.hardsigmoid."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate
        self.convs = nn.ModuleList(nn.Conv2d(8 if i else 3, 8, 3, padding=1) for i in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(3))
        self.excite = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        c, b = self.convs, self.bns
        x = F.hardswish(b[0](c[0](x)), inplace=True)
        x = F.silu(b[1](c[1](x)) + x)
        z = b[2](c[2](x))
        s = self.excite(F.adaptive_avg_pool2d(z, 1))
        s = torch.sigmoid(s) if self.gate == "torch.sigmoid" else s.sigmoid() if self.gate == "method" else \
            F.hardsigmoid(s)
        return F.silu(z) * z * s


@pytest.mark.parametrize("gate", ["torch.sigmoid", "method", "F.hardsigmoid"])
def test_fuse_functional_silu_and_hardswish(gate):
    torch.manual_seed(0)
    model = randomized(FunctionalSwish(gate)).double()
    fused = pyops.fuse(model)
    activation = "hardsigmoid" if gate == "F.hardsigmoid" else "sigmoid"
    assert [m.activation for m in fused.modules() if isinstance(m, ConvBNReLU2d)] == \
        ["hardswish", "silu", "none", activation]
    targets = [n.target for n in fused.graph.nodes if n.op in ("call_function", "call_method")]
    assert targets.count(F.silu) == 1 and F.hardswish not in targets  # the third chain's SiLU stays
    assert not {torch.sigmoid, "sigmoid", F.hardsigmoid} & set(targets)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_fuse_graph_patterns():
    torch.manual_seed(0)
    model = randomized(FunctionalBlocks()).double()
    for buffer, low, high in (("running_var", 0.5, 2.0), ("running_mean", -0.5, 0.5), ("weight", 0.5, 1.5),
                              ("bias", -0.5, 0.5)):
        getattr(model.frozen, buffer).uniform_(low, high, generator=gen())
    fused = pyops.fuse(model)
    norms = [name for name, m in fused.named_modules() if isinstance(m, _BatchNorm)]
    assert norms == ["bns.4"]  # the only BN whose input (a conv output) has another user
    activations = sorted(m.activation for m in fused.modules() if isinstance(m, ConvBNReLU2d))
    assert activations == sorted(["relu", "relu", "relu6", "relu", "none", "relu6", "relu", "relu", "relu"])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)
    refused = pyops.fuse(fused)  # fusing again changes nothing
    with torch.no_grad():
        torch.testing.assert_close(refused(x), model(x), rtol=1e-10, atol=1e-10)


def conv_bn_sequential():
    torch.manual_seed(0)
    return randomized(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),  # fold only
        nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5), nn.BatchNorm1d(5),
    ).double())


def test_fuse_sequential():
    model = conv_bn_sequential()
    snapshot = state_snapshot(model)
    fused = pyops.fuse(model)
    assert_no_batchnorm(fused)
    kinds = [type(m).__name__ for m in fused.modules() if not list(m.children())]
    assert kinds == ["ConvBNReLU2d", "ConvBNReLU2d", "Conv2d", "ReLU", "ConvBNReLU2d", "Flatten", "LinearBNReLU",
                     "LinearBNReLU"]
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)
    assert_state_equal(model, snapshot)


class Conv1dResidual(nn.Module):
    """A 1-D ResNet block's tail, relu(bn(conv(x)) + x), and a functional ReLU6 after a second chain."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.conv2, self.bn2 = nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)) + x)
        return F.relu6(self.bn2(self.conv2(y)))


def test_fuse_conv1d_chains_take_the_activation_conv3d_chains_fold_only():
    """Conv1d → BatchNorm1d [→ add] → ReLU/ReLU6 is one FoldedConv1d whose kernels add the residual and apply the
    activation as they store (pyops::conv1d_bias_act; no add or ReLU left in the graph), in the traced graph and (no
    residual there) in the Sequential fallback. Conv3d chains fold only."""
    torch.manual_seed(0)
    chains = [(nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.ReLU6(), "relu6"), (nn.SiLU(), "silu"),
              (nn.Hardswish(inplace=True), "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"), (nn.Sigmoid(), "sigmoid")]
    for act, name in chains:
        model = randomized(nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.BatchNorm1d(5), act).double())
        x = torch.randn(2, 3, 9, dtype=torch.float64, generator=gen()) * 3
        fallback = copy.deepcopy(model)
        fuse_sequentials(fallback)
        for fused in (pyops.fuse(model), fallback):
            assert_no_batchnorm(fused)
            layer = getattr(fused, "0")
            assert type(layer) is pyops.nn.FoldedConv1d and layer.activation == name
            assert not any(isinstance(m, tuple(pyops.activations.MODULES)) for m in fused.modules())
            assert f"activation={name}" in repr(layer)
            with torch.no_grad(), torch.profiler.profile() as prof:
                got = fused(x)
            assert sum(e.name == "pyops::conv1d_bias_act" for e in prof.events()) == 1
            with torch.no_grad():
                want = model(x.clone())
            assert (want == 0).any() or name not in ("relu", "relu6")
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    model = randomized(Conv1dResidual().double())
    fused = pyops.fuse(model)
    assert_no_batchnorm(fused)
    assert fused.conv.activation == "relu" and fused.conv2.activation == "relu6"
    assert [n.op for n in fused.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    x = torch.randn(2, 4, 12, dtype=torch.float64, generator=gen()) * 3
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = fused(x)
    assert sum(e.name == "pyops::conv1d_bias_act" for e in prof.events()) == 2
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-10, atol=1e-12)
    # a residual the kernel does not take (broadcast over the length, another dtype): added as PyTorch adds it
    for residual in (torch.randn(2, 4, 1, dtype=torch.float64), torch.randn(2, 4, 12)):
        with torch.no_grad():
            want = F.relu(model.bn(model.conv(x)) + residual)
            torch.testing.assert_close(fused.conv(x, residual=residual), want, rtol=1e-10, atol=1e-12)
    # fine-tuning through it: the gradients of the unfused chain with the BatchNorm frozen
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(fused(xg).sum(), xg)[0],
                               torch.autograd.grad(model(xg).sum(), xg)[0], rtol=1e-10, atol=1e-12)
    model = randomized(nn.Sequential(nn.Conv3d(3, 5, 3), nn.BatchNorm3d(5), nn.ReLU()).double())
    fused = pyops.fuse(model)
    assert_no_batchnorm(fused)
    assert any(isinstance(m, nn.ReLU) for m in fused.modules())
    x = torch.randn(2, 3, 5, 5, 5, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12)
    # Unbatched (C, L): BatchNorm1d takes C as the batch and normalizes along L (a number only where L_out equals
    # C_out); the folded layer refuses what it does not compute.
    model = randomized(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)).double())
    fallback = copy.deepcopy(model)
    fuse_sequentials(fallback)
    for fused in (pyops.fuse(model), fallback):
        assert type(getattr(fused, "0")) is pyops.nn.FoldedConv1d
        with pytest.raises(ValueError, match="3-D"):
            fused(torch.randn(3, 6, dtype=torch.float64))


class UNetUp(nn.Module):
    """A U-Net decoder step, called by attribute: upsample by a ConvTranspose2d → BN → ReLU, concatenate the skip."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, skip):
        return self.conv(torch.cat([F.relu(self.bn(self.up(x))), skip], 1))


class ConvActBlocks(nn.Module):
    """Conv layers without a BatchNorm: → ReLU, → add → ReLU6, → add alone, a Conv1d → SiLU, a parametrized conv
    → ReLU (computes its weight: not fused), a Linear → ReLU; a Linear → BN → add → ReLU (folded; the add, which
    LinearBNReLU does not take, and the ReLU stay)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1))
        self.conv1d = nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.head, self.head_bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu6(self.conv(x) + x)
        x = self.proj(x) + x
        x = torch.relu(self.normed(x))
        y = F.silu(self.conv1d(x.flatten(2)))
        h = F.relu(self.fc(y.mean(2)))
        return F.relu(self.head_bn(self.head(h)) + h)


def test_fuse_conv_activation_chains_without_batchnorm():
    """Conv2d / Conv1d [→ add] → activation without a BatchNorm (and → add alone) become one fused layer sharing the
    layer's Parameters (a bias-free layer gets a zero bias that trains nothing), and so does Linear → activation; a
    layer computing its weight stays as it is. VGG and SqueezeNet (no BatchNorm): every Conv2d → ReLU and Linear
    → ReLU fused."""
    torch.manual_seed(0)
    model = randomized(ConvActBlocks().double())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=gen())
    fused = pyops.fuse(model, inplace=True)
    assert type(fused.head) is LinearBNReLU and fused.head.activation == "none"
    assert [type(getattr(fused, n)) for n in ("stem", "conv", "proj", "normed", "conv1d", "fc")] == \
        [ConvBNReLU2d, ConvBNReLU2d, ConvBNReLU2d, type(model.normed), pyops.nn.FoldedConv1d, LinearBNReLU]
    assert [getattr(fused, n).activation for n in ("stem", "conv", "proj", "conv1d", "fc")] == \
        ["relu", "relu6", "none", "silu", "relu"]
    assert sum("residual" in n.kwargs for n in fused.graph.nodes) == 2
    assert fused.conv.weight is model.conv.weight and fused.conv.bias is model.conv.bias  # (inplace: shared)
    assert fused.stem.weight is model.stem.weight and not fused.stem.bias.requires_grad and not fused.stem.bias.any()
    assert not fused.conv1d.folds_batchnorm and not fused.fc.folds_batchnorm and fused.head.folds_batchnorm
    assert fused.fc.weight is model.fc.weight and fused.fc.bias is model.fc.bias
    with pytest.raises(ValueError, match="computes its weight"):
        ConvBNReLU2d.from_modules(model.normed, None)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12)
        # an unbatched input, which a Conv1d → BatchNorm1d refuses, runs where no BatchNorm was folded
        u = torch.randn(8, 7, dtype=torch.float64, generator=gen(1))
        torch.testing.assert_close(fused.conv1d(u), F.silu(model.conv1d(u)), rtol=1e-10, atol=1e-12)
    # fine-tuning: the gradients of the model's own Parameters (all but the folded Linear's and BN's, which the fused
    # model holds folded copies of), and an optimizer over them trains the fused model
    shared = [p for p in model.parameters() if any(p is q for q in fused.parameters())]
    assert len(shared) == len(list(model.parameters())) - 4
    grads = torch.autograd.grad(model(x).sum(), shared)
    fused_grads = torch.autograd.grad(fused(x).sum(), shared)
    for a, b in zip(grads, fused_grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        model.conv.weight.mul_(0.5)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12)
    for name, shape in (("vgg11", (1, 3, 32, 32)), ("squeezenet1_1", (1, 3, 64, 64))):
        net = getattr(torchvision.models, name)(weights=None).eval()
        convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
        linears = sum(isinstance(m, nn.Linear) for m in net.modules())
        fused = pyops.fuse(net)
        assert sum(isinstance(m, ConvBNReLU2d) and m.activation == "relu" for m in fused.modules()) == convs
        # (VGG's classifier: Linear → ReLU twice, then the last Linear, which has no activation to fuse)
        assert sum(isinstance(m, LinearBNReLU) and m.activation == "relu" for m in fused.modules()) == \
            max(linears - 1, 0)
        assert not any(isinstance(m, (nn.Conv2d, nn.ReLU)) for m in fused.modules())
        x = torch.rand(shape, generator=gen())
        with torch.no_grad():
            assert_close_relative(fused(x), net(x), 1e-4)
    # the Sequential fallback: Conv2d → ReLU and Linear → ReLU fused, their ReLUs Identity; a lone Conv2d stays
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.ReLU())
    seq = seq.double().eval()
    fallback = copy.deepcopy(seq)
    assert fuse_sequentials(fallback) == ["0", "4"]
    assert type(fallback[0]) is ConvBNReLU2d and type(fallback[1]) is nn.Identity
    assert type(fallback[2]) is nn.Conv2d and type(fallback[4]) is LinearBNReLU and type(fallback[5]) is nn.Identity
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fallback(x), seq(x), rtol=1e-10, atol=1e-12)


def test_fuse_folds_transposed_convolutions():
    """ConvTranspose1d/2d/3d → BatchNorm fold into one ConvTranspose (the activation stays a module): a DCGAN
    generator in a Sequential, traced and in the fallback, and a U-Net decoder step called by attribute."""
    torch.manual_seed(0)
    generator = randomized(nn.Sequential(
        nn.ConvTranspose2d(16, 12, 4, 1, 0, bias=False), nn.BatchNorm2d(12), nn.ReLU(True),
        nn.ConvTranspose2d(12, 6, 4, 2, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(True),
        nn.ConvTranspose2d(6, 3, 4, 2, 1, bias=False), nn.Tanh()).double())
    z = torch.randn(2, 16, 1, 1, dtype=torch.float64, generator=gen())
    fallback = copy.deepcopy(generator)
    assert fuse_sequentials(fallback) == ["0", "3"]
    for fused in (pyops.fuse(generator), fallback):
        assert_no_batchnorm(fused)
        assert [type(m) for m in fused.modules()].count(nn.ConvTranspose2d) == 3
        assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 2
        with torch.no_grad():
            torch.testing.assert_close(fused(z), generator(z), rtol=1e-10, atol=1e-12)
    up = randomized(UNetUp().double())
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=gen(1))
    skip = torch.randn(2, 4, 10, 12, dtype=torch.float64, generator=gen(2))
    fused = pyops.fuse(up)
    assert_no_batchnorm(fused)
    assert type(fused.up) is nn.ConvTranspose2d and fused.up.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(fused(x, skip), up(x, skip), rtol=1e-10, atol=1e-12)
    for cls, norm, shape in ((nn.ConvTranspose1d, nn.BatchNorm1d, (2, 3, 7)),
                             (nn.ConvTranspose3d, nn.BatchNorm3d, (2, 3, 3, 4, 5))):
        model = randomized(nn.Sequential(cls(3, 5, 3, stride=2, groups=1), norm(5), nn.ReLU()).double())
        fused = pyops.fuse(model)
        assert_no_batchnorm(fused)
        x = torch.randn(shape, dtype=torch.float64, generator=gen(3))
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12)


def test_folded_conv1d_layers_run_pyops_conv1d():
    """A folded Conv1d → BatchNorm1d is a pyops.nn.Conv1d (pyops' kernels: a Conformer's depthwise layer, 1.85x
    eager with it, 1.01x with F.conv1d), padding modes included, the SiLU after it fused (pyops::conv1d_bias_act);
    swap_conv1d converts the layers no BN followed."""
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv1d(8, 8, 5, padding=2, groups=8, padding_mode="reflect"),
                                     nn.BatchNorm1d(8), nn.SiLU(), nn.Conv1d(8, 6, 1), nn.BatchNorm1d(6),
                                     nn.Conv1d(6, 4, 3)).double())
    x = torch.randn(2, 8, 30, dtype=torch.float64, generator=gen())
    fused = pyops.fuse(model)
    assert isinstance(getattr(fused, "0"), pyops.nn.Conv1d) and isinstance(getattr(fused, "3"), pyops.nn.Conv1d)
    assert getattr(fused, "0").activation == "silu" and not any(isinstance(m, nn.SiLU) for m in fused.modules())
    pyops_conv1d = ("pyops::conv1d", "pyops::conv1d_bias_act")
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = fused(x)
    assert sum(e.name in pyops_conv1d for e in prof.events()) == 2  # (the last layer: F.conv1d, as the model)
    torch.testing.assert_close(got, model(x), rtol=1e-10, atol=1e-12)
    swapped = pyops.nn.swap_conv1d(fused)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = swapped(x)
    assert sum(e.name in pyops_conv1d for e in prof.events()) == 3
    torch.testing.assert_close(got, model(x), rtol=1e-10, atol=1e-12)


class DataDependent(nn.Module):
    """Untraceable: control flow on a tensor value."""

    def __init__(self):
        super().__init__()
        self.body = conv_bn_sequential()

    def forward(self, x):
        y = self.body(x)
        return y if y.sum() > 0 else -y


class OptionalShortcut(nn.Module):
    """forward(x, shortcut=None): torch.fx traces `shortcut` as a tensor, so `if shortcut is None` is not traced."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return F.relu(self.bn(self.conv(x)) + shortcut)


def test_fuse_falls_back_where_a_forward_argument_defaults_to_none():
    """The traced graph would run a call without `shortcut` with None, which the fused layer takes as no residual:
    fuse uses the Sequential fallback instead, and both calls keep the model's values."""
    model = randomized(OptionalShortcut().double())
    with pytest.warns(UserWarning, match="'shortcut' defaults to None"):
        fused = pyops.fuse(model)
    x, r = (torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=gen(i)) for i in (1, 2))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused(x, r), model(x, r), rtol=1e-12, atol=1e-12)


def test_fuse_untraceable_model_falls_back_to_sequentials():
    model = randomized(DataDependent())
    fused_names = r"body\.0, body\.3, body\.6, body\.11, body\.14, body\.9\.0\. The result equals"
    with pytest.warns(UserWarning, match=r"could not trace DataDependent.*: " + fused_names):
        fused = pyops.fuse(model)
    assert type(fused) is DataDependent and fused is not model
    assert_no_batchnorm(fused)
    assert any(isinstance(m, _BatchNorm) for m in model.modules())
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_fuse_inplace():
    model = randomized(DataDependent())
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="could not trace"):
        fused = pyops.fuse(model, inplace=True)
    assert fused is model  # untraceable: rewritten in place
    assert_no_batchnorm(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)

    resnet = randomized(torchvision.models.resnet18())
    fused = pyops.fuse(resnet, inplace=True)  # traceable: no copy, the unfused modules are shared
    assert fused.fc is resnet.fc and fused.maxpool is resnet.maxpool
    assert pyops.fuse(resnet).fc is not resnet.fc


def test_fuse_rejects_training_mode():
    with pytest.raises(ValueError, match="training mode"):
        pyops.fuse(HomeworkNet())
    model = HomeworkNet().eval()
    model.bn2.train()
    with pytest.raises(ValueError, match="bn2"):
        pyops.fuse(model)
    with pytest.raises(TypeError, match="model"):
        pyops.fuse(lambda x: x)
    # a dropout has no state, but its training flag is what it computes (Monte Carlo dropout)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)).eval()
    model[3].train()
    with pytest.raises(ValueError, match=r"training mode \(3\)"):
        pyops.fuse(model)


def test_fuse_refuses_lazy_layers_not_initialized_yet():
    """An uninitialized nn.LazyConv2d has no weight shape to fold a BatchNorm into: fuse returned the model
    unfused, BatchNorm kept, without a word. Once an input has initialized it, it fuses."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"lazy layers .*\(0\).*run the model once"):
        pyops.fuse(model)
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        want = model(x)
        fused = pyops.fuse(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)


def test_fuse_ignores_stateless_torch_layers_in_training_mode_and_leaves_them():
    """An nn.Identity put in after model.eval() (training by default) changes nothing; inplace=True leaves the
    caller's module as it was, the result is in eval mode."""
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    model.append(nn.Identity())
    fused = pyops.fuse(model, inplace=True)
    assert model[3].training and not fused.training
    assert not any(m.training for m in pyops.fuse(model).modules())


def test_fused_model_compiles_without_graph_breaks():
    model = conv_bn_sequential().float()
    fused = pyops.fuse(model)
    x = torch.rand(3, 3, 8, 8, generator=gen())
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")  # dynamo + AOT autograd, no codegen
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_leaves_batchnorms_that_use_batch_statistics():
    """track_running_stats=False: the BatchNorm normalizes with each batch's statistics even in eval mode, so no
    weights reproduce it; the chain stays as it is (both in a traced graph and in the Sequential fallback)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    x = torch.rand(2, 3, 8, 8, generator=gen())
    fallback = copy.deepcopy(model)
    assert fuse_sequentials(fallback) == []
    for fused in (pyops.fuse(model), fallback):
        assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 1
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_fused_linear_refuses_inputs_where_the_fold_does_not_hold():
    """Linear → BatchNorm1d on a 3-D input (N, L, features): BatchNorm1d normalizes dim 1 (L == num_features here,
    or it would fail), not the Linear's features. The fused layer raises instead of giving other values."""
    model = randomized(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())).eval()
    fused = pyops.fuse(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(torch.ones(3, 5)), model(torch.ones(3, 5)), rtol=1e-6, atol=1e-6)
        model(torch.ones(3, 6, 5))  # the original runs
        with pytest.raises(ValueError, match="2-D"):
            fused(torch.ones(3, 6, 5))


class InPlaceHazards(nn.Module):
    """Chains next to in-place ops whose effect a fused call in the wrong place would miss or see."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(4))
        self.relu_ = nn.ReLU(inplace=True)

    def forward(self, x):
        c, b = self.convs, self.bns
        # the layer's input is changed in place after the layer read it: the fused call must read it first
        y = F.relu(b[0](c[0](x))) + c[1](self.relu_(x))
        # a residual computed after the layer by an in-place op on the layer's input (pre-activation style)
        z = b[1](c[2](y))
        z = F.relu(z + y.relu_())
        # an in-place add that writes into the residual, which is used again afterwards
        a = c[3](z)
        out = F.relu(a.add_(b[2](c[4](z)))) + a
        # an in-place op on another tensor between the layer and its BN's ReLU
        w = b[3](c[5](out))
        out.mul_(2)
        return F.relu(w) + out


def test_fuse_keeps_the_order_of_in_place_ops():
    model = randomized(InPlaceHazards()).double()
    fused = pyops.fuse(model)
    assert_no_batchnorm(fused)
    residual_adds = [node for node in fused.graph.nodes if node.op == "call_module" and "residual" in node.kwargs]
    # the adds after the BatchNorms are unsafe to fuse here; c[1]'s add (no BatchNorm) is safe, and fused
    assert len(residual_adds) == 1
    assert torch.equal(fused.get_submodule(residual_adds[0].target).weight, model.convs[1].weight)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x.clone()), model(x.clone()), rtol=1e-10, atol=1e-10)


def test_fused_layers_without_activation_allow_in_place_ops_after_them():
    """Nothing saved for backward that an in-place op after the layer may change: MobileNetV3's and EfficientNet's
    conv → BN → Hardswish/SiLU(inplace=True) blocks fine-tune after fusing as before."""
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(inplace=True),
                                     nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.SiLU(inplace=True))).double()
    fused = pyops.fuse(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=gen(), requires_grad=True)
    grads = [torch.autograd.grad(m(x).square().sum(), (x, m[0].weight if m is model else next(m.parameters())))
             for m in (model, fused)]
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-10, atol=1e-10)
    # the functional op too: conv2d_bn_relu without ReLU, then an in-place op on its output
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=gen(1), requires_grad=True)
    stats = [torch.rand(8, dtype=torch.float64, generator=gen(s)) + 0.5 for s in range(4)]
    y = pyops.conv2d_bn_relu(x, w, None, *stats, relu=False)
    y.mul_(2).sum().backward()
    expected = torch.autograd.grad(2 * F.batch_norm(F.conv2d(x, w), stats[2], stats[3], stats[0], stats[1]).sum(), w)
    torch.testing.assert_close(w.grad, expected[0], rtol=1e-10, atol=1e-10)


def test_fused_conv_residuals_the_kernel_does_not_take():
    """A residual of another dtype (type promotion), a number, or a 4-D one with an unbatched input is added as
    PyTorch adds it, as in the unfused chain."""
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), randomized(nn.BatchNorm2d(6))
    module = ConvBNReLU2d.from_modules(conv, bn)
    x = torch.randn(2, 3, 8, 8, generator=gen())
    def chain(x, r):  # (BatchNorm2d takes batched inputs only)
        return F.relu((bn(conv(x[None]))[0] if x.dim() == 3 else bn(conv(x))) + r)

    with torch.no_grad():
        for inp, residual in ((x, torch.randn(2, 6, 8, 8, dtype=torch.float64, generator=gen(1))), (x, 3),
                              (x[0], torch.randn(1, 6, 8, 8, generator=gen(2)))):
            got, expected = module(inp, residual), chain(inp, residual)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    class AddsChannelCount(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)) + x.shape[1])  # the "residual" is an int node in the graph

    model = AddsChannelCount().eval()
    with torch.no_grad():
        torch.testing.assert_close(pyops.fuse(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_flattening_views_survive_channels_last_outputs():
    """Fused CPU inference may return channels_last tensors (a widening stem, packed layers); a model that
    flattens its features with .view(n, -1) still runs after fusing, with the same values."""
    class ViewFlatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Linear(64 * 6 * 6, 5)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            return self.fc(y.view(y.size(0), -1))

    model = randomized(ViewFlatten())
    fused = pyops.fuse(model)
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert fused.conv(x).is_contiguous(memory_format=torch.channels_last)  # what the view has to cope with
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
        # pickling re-traces a GraphModule's code, as symbolic_trace does: view_or_copy stays one call
        for again in (pickle.loads(pickle.dumps(fused)), torch.fx.symbolic_trace(fused)):
            torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_keeps_views_that_are_written_in_place_aliased():
    """`y.view(n, -1).clamp_(min=0)` writes into y through the view: the fused layers keep their input's layout
    there (a view of a channels_last output would have to be a copy, which the write would miss)."""
    class WriteThroughView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)

        def forward(self, x):
            y = self.bn(self.conv(x))
            y.view(y.shape[0], -1).clamp_(min=0)
            return y.view(size=(y.shape[0], -1))  # the keyword form, too

    model = randomized(WriteThroughView())
    fused = pyops.fuse(model)
    x = torch.randn(2, 3, 6, 6, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
        assert fused(x).min() == 0


def test_fuse_view_with_a_size_keyword():
    class SizeKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64))

        def forward(self, x):
            y = self.body(x)
            return y.view(size=(y.shape[0], -1))

    model = randomized(SizeKeyword())
    x = torch.randn(2, 3, 6, 6, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(pyops.fuse(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_fallback_keeps_sequential_indices_and_names():
    """The untraceable fallback puts nn.Identity where it absorbed a BatchNorm or ReLU (as
    torch.ao.quantization.fuse_modules does), so indexing a Sequential or naming its children keeps working."""
    class IndexesItsBody(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent: untraceable
                return self.body[3](self.body[:3](x))
            return x

    model = randomized(IndexesItsBody())
    with pytest.warns(UserWarning, match="could not trace"):
        fused = pyops.fuse(model)
    assert [type(m).__name__ for m in fused.body] == ["ConvBNReLU2d", "Identity", "Identity", "Conv2d"]
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_bn_reads_old_style_weight_norm_and_spectral_norm_weights():
    """torch.nn.utils.weight_norm/spectral_norm recompute layer.weight in a forward pre-hook (spectral_norm's
    attribute is not normalized before the first forward): the fold uses the weight the forward computes."""
    bn = randomized(nn.BatchNorm2d(6)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen())
    for wrap in (nn.utils.spectral_norm, nn.utils.weight_norm):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated for torch.nn.utils.parametrizations
            conv = wrap(nn.Conv2d(3, 6, 3).double()).eval()
        if wrap is nn.utils.weight_norm:
            with torch.no_grad():
                conv.weight_g.mul_(2)  # the attribute is stale until the next forward
        folded = pyops.fold_bn(conv, bn)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-10, atol=1e-10)


def test_fused_conv_rejects_inputs_without_channels():
    conv = nn.Conv2d(0, 6, 3)
    module = ConvBNReLU2d.from_modules(conv, randomized(nn.BatchNorm2d(6)))
    with pytest.raises(ValueError, match="'input' has 0 channels"):
        module(torch.randn(2, 0, 8, 8))
    with pytest.raises(TypeError, match="'relu' must be a bool"):
        pyops.conv2d_bn_relu(torch.randn(1, 3, 5, 5), torch.randn(6, 3, 3, 3), None, None, None, torch.zeros(6),
                             torch.ones(6), relu="relu6")


@torch.fx.wrap
def _scales_in_place(t):  # a user function torch.fx records as one call: its body is not in the graph
    t.mul_(3)
    return t


class _MutatesInput(nn.Module):
    def __init__(self, mutate):
        super().__init__()
        self.conv, self.bn, self.mutate = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), mutate

    def forward(self, x, r):
        y = self.bn(self.conv(x))
        self.mutate(self, x)
        return F.relu(y + r)  # the residual add: fusing it would read x after the mutation


@pytest.mark.parametrize("mutate", [
    lambda m, x: torch.ops.aten.relu_.default(x), lambda m, x: torch._foreach_mul_([x], 3.0),
    lambda m, x: F.relu(x, inplace=1), lambda m, x: _scales_in_place(x), lambda m, x: m.act(x),
    lambda m, x: m.hooked(x)], ids=["aten op", "foreach", "inplace=1", "fx.wrap function", "ReLU(inplace=1)",
                                    "pre-hook"])
def test_fuse_sees_every_kind_of_in_place_op(mutate):
    model = _MutatesInput(mutate)
    model.act, model.hooked = nn.ReLU(inplace=1), nn.Identity()
    model.hooked.register_forward_pre_hook(lambda module, args: args[0].mul_(2))
    model = randomized(model).double()
    fused = pyops.fuse(model)
    x, r = (torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen(s)) for s in (1, 2))
    with torch.no_grad():
        torch.testing.assert_close(fused(x.clone(), r), model(x.clone(), r), rtol=1e-10, atol=1e-10)


def test_fuse_keeps_modules_the_graph_passes_as_arguments():
    """A module handed to a function (a get_attr node) is kept whole, in the caller's model too (inplace=True)."""
    crop = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(8 * 6 * 6, 5)))

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.crop = crop

        def forward(self, images):
            return pyops.sliding_classify(self.crop, images, 8)

    model = Dense().eval()
    images = torch.randn(1, 3, 11, 10, generator=gen())
    with torch.no_grad():
        expected = model(images)
        fused = pyops.fuse(model, inplace=True)
        assert len(model.crop) == 5
        torch.testing.assert_close(fused(images), expected, rtol=1e-5, atol=1e-5)


def test_fuse_rewrites_only_what_depends_on_the_layout():
    """Views keep aliasing wherever they worked before (a write through one reaches the tensor); a view or view_as
    of a fused channels_last output, which would fail, copies; as_strided reads the NCHW layout it was written for."""
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64)

        def forward(self, x, like):
            y = F.relu(self.bn(self.conv(x)))  # a widening stem: channels_last in CPU fp32 inference after fusing
            t = x.transpose(2, 3)
            t.view(t.shape).add_(1.0)  # a write through a view of a tensor fusion does not touch: must reach x
            return y.view_as(like) + y.as_strided((2, 64), (64, 1)).sum(), x

    model = randomized(Views())
    fused = pyops.fuse(model)
    x, like = torch.randn(2, 3, 6, 6, generator=gen()), torch.empty(2, 64 * 16)
    with torch.no_grad():
        for got, expected in zip(fused(x.clone(), like), model(x.clone(), like)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fuse_fallback_layers_keep_the_input_layout():
    """The untraceable fallback cannot rewrite the model's own .view calls: its fused layers return NCHW."""
    class ViewsUntraceably(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3),
                                      nn.BatchNorm2d(64))

        def forward(self, x):
            y = self.body(x)
            if y.sum() > -1e9:  # data-dependent: untraceable
                y = y + 0
            return y.view(y.size(0), -1)

    model = randomized(ViewsUntraceably())
    with pytest.warns(UserWarning, match="could not trace"):
        fused = pyops.fuse(model)
    x = torch.randn(2, 3, 9, 9, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_leaves_hooked_and_custom_layers():
    """A layer or BatchNorm with hooks, or a conv subclass with a forward of its own (a QAT conv fake-quantizes its
    weight there), would lose that behaviour in a fused module: such chains stay as they are."""
    class HalvedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) / 2

    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     HalvedConv(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))).double()
    model[1].register_forward_hook(lambda module, args, out: out * 10)
    fused = pyops.fuse(model)
    assert sum(isinstance(m, _BatchNorm) for m in fused.modules()) == 2  # only the last pair folded
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_fuse_folds_layer_subclasses_that_keep_torch_forward():
    """Subclasses of torch.nn's layers and BatchNorms that keep the inherited forward (torchvision's Conv3DSimple in
    the video ResNets, for one) are called as leaves, so their chains fold; torch.fx used to trace into them."""
    class NamedConv(nn.Conv2d):
        pass

    class NamedConv3d(nn.Conv3d):
        pass

    class NamedNorm(nn.BatchNorm2d):
        pass

    model = randomized(nn.Sequential(NamedConv(3, 4, 3), NamedNorm(4), nn.ReLU())).double()
    fused = pyops.fuse(model)
    assert_no_batchnorm(fused)
    assert isinstance(getattr(fused, "0"), ConvBNReLU2d)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)
    video = randomized(torchvision.models.video.mc3_18())
    fused = pyops.fuse(video)
    assert_no_batchnorm(fused)
    x = torch.randn(1, 3, 2, 16, 16, generator=gen())
    with torch.no_grad():
        assert_close_relative(fused(x), video(x), 1e-5)
    model = randomized(nn.Sequential(NamedConv3d(3, 4, 3), nn.BatchNorm3d(4))).double()
    assert_no_batchnorm(pyops.fuse(model))

    class StandardizedConv(nn.Conv2d):  # keeps forward, standardizes the weight in _conv_forward: not folded
        def _conv_forward(self, x, weight, bias):
            weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std((1, 2, 3), keepdim=True)
            return super()._conv_forward(x, weight, bias)

    model = randomized(nn.Sequential(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).double()
    fused = pyops.fuse(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_fuse_takes_torch_fx_graph_modules_and_in_place_residual_dtypes():
    """A symbolically traced model (its plain containers are in training mode: they hold no state, so they do not
    count) fuses; an in-place residual add keeps the conv output's dtype, as add_ does."""
    class InPlaceAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x, r):
            return F.relu(self.bn(self.conv(x)).add_(r))

    class Outer(nn.Module):  # (so that the traced GraphModule holds a container "inner")
        def __init__(self):
            super().__init__()
            self.inner = InPlaceAdd()

        def forward(self, x, r):
            return self.inner(x, r)

    model = randomized(Outer())
    traced = torch.fx.symbolic_trace(model)
    assert traced.inner.training
    x, r = torch.randn(2, 3, 5, 5, generator=gen()), torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen(1))
    with torch.no_grad():
        expected = model(x, r)
        for fused in (pyops.fuse(model), pyops.fuse(traced)):
            got = fused(x, r)
            assert got.dtype == expected.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_weight_follows_fused_optimizer_steps_and_inference_tensors():
    """torch.optim's fused=True steps change the weight without bumping its version counter: the packed weight is
    made in eval mode only and dropped when train()/eval() switches, so evaluation after training sees the new
    weight. Parameters made in torch.inference_mode (no version counter) pack too."""
    module = ConvBNReLU2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 8, 8, generator=gen())
    opt = torch.optim.Adam(module.parameters(), lr=0.1, fused=True)
    module.eval()
    with torch.no_grad():
        module(x)  # packs
    module.train()
    module(x).sum().backward()
    opt.step()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.conv2d(x, module.weight, module.bias, 1, 1).relu(), rtol=1e-4,
                                   atol=1e-4)
    with torch.inference_mode():
        fresh = ConvBNReLU2d(64, 64, 3, padding=1).eval()
        torch.testing.assert_close(fresh(x), F.conv2d(x, fresh.weight, fresh.bias, 1, 1).relu(), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "foreach-step"])
def test_packed_weight_follows_optimizer_steps_in_eval_mode(fused):
    """Fine-tuning with frozen statistics keeps the model in eval mode: training steps and no_grad evaluations
    alternate without a train()/eval() switch. A fused=True step bumps no version counter; every torch.optim step
    drops the packed weight (it served the first step's weight: off by ~7)."""
    module = ConvBNReLU2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 8, 8, generator=gen())
    opt = torch.optim.Adam(module.parameters(), lr=0.1, **({"fused": True} if fused else {"foreach": True}))
    for _ in range(3):
        module(x).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.conv2d(x, module.weight, module.bias, 1, 1).relu(), rtol=1e-4,
                                       atol=1e-4)


def test_optimizer_steps_drop_only_their_own_parameters_forms():
    """A fused inference model beside a training loop (a distillation teacher) keeps its packed weights: an
    unrelated optimizer's step made every layer repack (2.4x slower teacher forwards)."""
    teacher = ConvBNReLU2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 8, 8, generator=gen())
    with torch.no_grad():
        teacher(x)
    packed = teacher._derived
    student = nn.Linear(4, 4)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student(torch.randn(2, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        teacher(x)
    assert teacher._derived is packed


class WritesThroughAlias(nn.Module):
    """A stem (3 → 64 channels: CPU fp32 inference makes its fused output channels_last) whose output is written in
    place through an alias: reshape/flatten/contiguous are views of an NCHW tensor, copies of a channels_last one."""

    def __init__(self, alias):
        super().__init__()
        self.alias = alias
        self.conv, self.bn = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        self.alias(y).mul_(2)  # in the model: a write into y
        return y


@pytest.mark.parametrize("alias", [lambda y: y.reshape(y.shape[0], -1), lambda y: y.flatten(1),
                                   lambda y: y.contiguous(), lambda y: torch.flatten(y, 1),
                                   lambda y: y.view(y.shape[0], -1).T, lambda y: y.view(y.shape[0], -1).data],
                         ids=["reshape", "flatten", "contiguous", "torch.flatten", "view.T", "view.data"])
def test_fused_model_keeps_writes_through_layout_dependent_aliases(alias):
    torch.manual_seed(0)
    model = randomized(WritesThroughAlias(alias))
    x = torch.randn(2, 3, 16, 16, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


def test_fuse_keeps_the_models_hooks():
    """fx traces forward, not __call__: the root's hooks never ran in the fused GraphModule, and a traced-through
    submodule's hooks ran once, on the trace's proxies (a feature-extraction hook then recorded nothing)."""
    model = randomized(torchvision.models.resnet18(num_classes=10))
    model.register_forward_hook(lambda module, args, out: out.softmax(-1))
    features = []
    model.layer3.register_forward_hook(lambda module, args, out: features.append(out))
    fused = pyops.fuse(model)
    assert isinstance(fused.layer3, torch.fx.GraphModule)  # fused on its own
    assert_no_batchnorm(fused)
    x = torch.randn(2, 3, 64, 64, generator=gen())
    with torch.no_grad():
        expected = model(x)
        features.clear()
        got = fused(x)
    assert_close_relative(got, expected, 1e-5)
    assert len(features) == 1 and features[0].shape == (2, 256, 4, 4)
    assert pyops.fuse(model, inplace=True).layer3 is not model.layer3  # (inplace=True: the hooked one is copied)


def test_fuse_warns_about_global_module_hooks():
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        with pytest.warns(UserWarning, match="global module hooks"):
            pyops.fuse(model)
    finally:
        handle.remove()


class LeakyAsReLU(nn.ReLU):
    def forward(self, x):
        return F.leaky_relu(x, 0.1)


class TwoHeads(nn.Sequential):
    """A Sequential whose forward does not chain its entries."""

    def forward(self, x):
        return torch.cat([self[0](x), self[1](x[:, :8])], 1)


class Untraceable(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x) if x.sum() > -1e30 else x  # control flow on a value: the Sequential fallback


def test_sequential_fallback_fuses_only_what_computes_a_chain():
    """A ReLU subclass with its own forward is no ReLU to fuse; a Sequential subclass whose forward does not chain
    its entries has no chain to fuse (both were fused by the fallback, as ReLU and as conv → BN)."""
    torch.manual_seed(0)
    for body in (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), LeakyAsReLU()),
                 TwoHeads(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))):
        model = randomized(Untraceable(body))
        x = torch.randn(2, 8, 6, 6, generator=gen())
        with pytest.warns(UserWarning, match="could not trace"):
            fused = pyops.fuse(model)
        with torch.no_grad():
            assert_close_relative(fused(x), model(x), 1e-5)
    with pytest.raises(ValueError, match="LeakyAsReLU"):
        ConvBNReLU2d.from_modules(*fp32_conv_bn(8, 8), LeakyAsReLU())


def test_in_place_residual_add_keeps_the_models_dtype_and_aliases():
    """`out += identity` is traced in place (torch.fx's Proxy has no __iadd__: Python ran out = out + identity): a
    float64 identity no longer promotes the float32 output, and aliases of the written tensor see the write."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x, identity):
            out = self.bn(self.conv(x))
            out += identity
            return out

    class WritesIntoAliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x, h):
            alias = h[:, :2]
            h += self.bn(self.conv(x))
            return alias * 1

    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=gen())
    for model, r in ((Block(), torch.randn(2, 4, 6, 6, dtype=torch.float64)), (WritesIntoAliased(), x.clone())):
        model = randomized(model)
        fused = pyops.fuse(model)
        with torch.no_grad():
            expected, got = model(x, r.clone()), fused(x, r.clone())
        assert got.dtype == expected.dtype
        assert_close_relative(got, expected, 1e-5)


def test_fuse_folds_only_batchnorms_of_the_layers_rank():
    """A BatchNorm of another rank normalizes another dimension where the model runs (a BatchNorm1d on an unbatched
    Conv2d's (C, H, W) output, a FrozenBatchNorm2d broadcasting a Linear's): not folded."""
    torch.manual_seed(0)
    cases = [(nn.Sequential(nn.Conv2d(8, 14, 3), nn.BatchNorm1d(14)), torch.randn(8, 16, 16)),
             (nn.Sequential(nn.ConvTranspose2d(8, 14, 3), nn.BatchNorm1d(14)), torch.randn(8, 12, 12)),
             (nn.Sequential(nn.Conv3d(4, 6, 3), nn.BatchNorm2d(6)), torch.randn(4, 8, 8, 8)),
             (nn.Sequential(nn.Linear(8, 6), FrozenBatchNorm2d(6)), torch.randn(3, 8))]
    for model, x in cases:
        model = randomized(model)
        fused = pyops.fuse(model)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x))


def test_fuse_keeps_what_is_frozen_and_what_is_trainable():
    """A folded parameter requires grad where a value it is made of does: a frozen backbone (only the head
    trainable) stayed frozen only in part (every bias-free conv's folded bias came back trainable), and a trainable
    BatchNorm after a frozen conv lost its trainable γ, β."""
    model = randomized(torchvision.models.resnet18(num_classes=10)).requires_grad_(False)
    model.fc.requires_grad_(True)
    trainable = [name for name, p in pyops.fuse(model).named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    conv, bn = fp32_conv_bn(8, 8)
    conv.requires_grad_(False)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    assert fused.weight.requires_grad and fused.bias.requires_grad
    frozen = FrozenBatchNorm2d(8)
    assert not any(p.requires_grad for p in pyops.fold_bn(nn.Conv2d(8, 8, 3, bias=False).requires_grad_(False),
                                                           frozen).parameters())


def test_a_block_called_twice_keeps_one_set_of_weights():
    """A conv → BN → ReLU called twice (a shared block) became two fused modules with two copies of the folded
    weights, which fine-tuning moved apart. Same epilogue: one module; another one: the same Parameters."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            y = F.relu(self.bn(self.conv(y)))
            return self.bn(self.conv(y))  # no activation: another module, the same weights

    model = randomized(Shared())
    fused = pyops.fuse(model)
    layers = [m for m in fused.modules() if isinstance(m, ConvBNReLU2d)]
    assert len(layers) == 2 and layers[0].weight is layers[1].weight and layers[0].bias is layers[1].bias
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.conv.parameters())
    x = torch.randn(2, 8, 6, 6, generator=gen())
    with torch.no_grad():
        assert_close_relative(fused(x), model(x), 1e-5)


def test_cached_forms_leave_tensors_swappable_and_copyable():
    """The weight caches held Python weak references to the weights: torch.utils.swap_tensors (load_state_dict
    under set_swap_module_params_on_conversion) refused them after one forward. And a parametrized fused layer's
    deep copy (torch's parametrize copies __dict__, past __getstate__) copied the cache: an error for the MKLDNN
    weight, and its storage weak references, each released twice (a crash)."""
    fused = ConvBNReLU2d.from_modules(*fp32_conv_bn(64, 64, padding=1))
    x = torch.randn(1, 64, 8, 8, generator=gen())
    with torch.no_grad():
        fused(x)  # packs the weight
        new = torch.randn(fused.weight.shape, generator=gen(1))
        torch.utils.swap_tensors(fused.weight, nn.Parameter(new.clone()))
        assert torch.equal(fused.weight, new)
        assert_close_relative(fused(x).double(), F.relu(F.conv2d(x.double(), new.double(), fused.bias.double(),
                                                                 padding=1)), 2e-6)
    torch.nn.utils.parametrize.register_parametrization(fused, "weight", nn.Identity())
    for _ in range(20):
        with torch.no_grad():
            fused(x)
        copied = copy.deepcopy(fused)
        with torch.no_grad():
            torch.testing.assert_close(copied(x), fused(x))


class CountsBatch(nn.Module):
    """An int updated by `+=` after a copy of it was taken: torch.fx writes operator.iadd as `n += 1`, rebinding the
    variable the copy's later readers share."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        n = y.size(0)
        batch = n
        n += 1
        return y.reshape(batch, -1) * n


class HookedBlock(nn.Module):
    def __init__(self, cin=4, cout=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ReachesInside(nn.Module):
    """Uses a hooked block whole and one of its layers on its own: the block cannot be fused on its own."""

    def __init__(self):
        super().__init__()
        self.block = HookedBlock()

    def forward(self, x):
        return self.block(x) + self.block.conv(x) + self.block.conv.bias.view(1, -1, 1, 1)


class DropsInPlace(nn.Module):
    """efficientnet's classifier: torch.flatten, then Dropout(inplace=True), the identity in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.drop, self.fc = nn.Dropout(0.2, inplace=True), nn.Linear(64 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(F.relu(self.bn(self.conv(x))), 1)))


class ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_regressions_of_the_fuse_fixes():
    """What the first round of fuse fixes broke, found by fuzzing them: `n += 1` on an int changed an earlier copy;
    a hooked block fused on its own while the model also reached inside it; hooks recording into their own state
    recorded into a deep copy; backward hooks on a conv/BN did not keep it from fusing; an eval-mode
    Dropout(inplace=True) after torch.flatten counted as a write (efficientnet lost its channels_last path); and,
    older, the fallback folded a BatchNorm subclass with its own forward."""
    torch.manual_seed(0)
    x3, x4 = torch.randn(2, 3, 8, 8, generator=gen()), torch.randn(2, 4, 8, 8, generator=gen(1))
    checks = [(randomized(CountsBatch()), x3), (randomized(ReachesInside()), x4), (randomized(DropsInPlace()), x3)]
    checks[1][0].block.register_forward_hook(lambda module, args, out: out * 3)
    for model, x in checks:
        fused = pyops.fuse(model)
        with torch.no_grad():
            assert_close_relative(fused(x), model(x), 1e-5)
    assert not any(m.keep_input_layout for m in pyops.fuse(checks[2][0]).modules() if isinstance(m, ConvBNReLU2d))

    calls = []
    for inplace in (False, True):
        model = randomized(nn.Sequential(HookedBlock(), nn.Conv2d(4, 4, 1)))
        model[0].register_forward_hook(lambda module, args, out, calls=calls: calls.append(out.shape))
        model.register_forward_pre_hook(functools.partial(lambda seen, module, args: seen.append(1), calls))
        calls.clear()
        with torch.no_grad():
            pyops.fuse(model, inplace=inplace)(x4)
        assert len(calls) == 2  # the block's hook and the model's, on the user's own list

    model = randomized(HookedBlock())
    seen = []
    model.bn.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(1))
    fused = pyops.fuse(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # not fused: its hook must run
    fused(x4.clone().requires_grad_()).sum().backward()
    assert seen == [1]

    model = randomized(Untraceable(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), ScaledBN(4))))
    with pytest.warns(UserWarning, match="could not trace"):
        fused = pyops.fuse(model)
    with torch.no_grad():
        assert_close_relative(fused(x4), model(x4), 1e-5)


# --- stop 23's fuzzing round: graphs fuse must read more carefully ---------------------------------------------------

class CropAndSlide(nn.Module):
    """The crop classifier's conv → BN called one by one, and the classifier also handed whole to a function."""

    def __init__(self):
        super().__init__()
        self.crop = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(192, 5))

    def forward(self, images):
        feats = F.relu(self.crop[1](self.crop[0](images)))
        return pyops.sliding_classify(self.crop, feats, 8, exact=True)


class WholeAndInside(nn.Module):
    """A hooked block (a leaf of the trace: it runs as it is) and its conv → BN called by attribute."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.block(x) + F.relu(self.block[1](self.block[0](x)))


def test_a_chain_inside_a_module_the_graph_uses_whole_is_left_alone():
    """The fused layer was installed inside the module used whole (the crop classifier handed to sliding_classify:
    off by 0.26; a hooked block: AttributeError), which with inplace=True was the caller's own."""
    whole = randomized(WholeAndInside())
    whole.block.register_forward_hook(lambda module, args, out: out + 1)
    for model, x in ((randomized(CropAndSlide()), torch.randn(1, 3, 10, 10, generator=gen())),
                     (whole, torch.randn(2, 4, 6, 6, generator=gen()))):
        with torch.no_grad():
            expected = model(x)
            snapshot = state_snapshot(model)
            for inplace in (False, True):
                torch.testing.assert_close(pyops.fuse(model, inplace=inplace)(x), expected)
            assert_state_equal(model, snapshot)
            torch.testing.assert_close(model(x), expected)


class InPlaceBeside(nn.Module):
    """conv → BN with an in-place op on the conv's input between the layer and the residual add."""

    def __init__(self, write):
        super().__init__()
        self.conv, self.bn, self.write = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), write

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y + self.write(x))


def test_an_eval_rrelu_in_place_is_a_write():
    """An eval-mode rrelu with inplace=True is a leaky_relu_, which fuse took for the identity (as an eval dropout):
    the fused call read the input after the write (off by 0.7-0.95)."""
    model = randomized(InPlaceBeside(lambda x: F.rrelu(x, 0.1, 0.3, training=False, inplace=True)))
    x = torch.randn(2, 4, 6, 6, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x.clone()), model(x.clone()), 1e-5)


class WriteThroughAView(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.conv, self.bn, self.write = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), write

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        self.write(y)
        return y


@pytest.mark.parametrize("write", [lambda y: y.view(y.size(0), -1).tensor_split(2, 1)[0].mul_(0),
                                   lambda y: y.view(y.size(0), -1).swapdims(0, 1).mul_(2),
                                   lambda y: y.view(y.size(0), -1).moveaxis(0, 1).mul_(2),
                                   lambda y: y.permute(0, 2, 3, 1).contiguous().tensor_split(2)[0].zero_()],
                         ids=["view-tensor_split", "view-swapdims", "view-moveaxis", "contiguous-tensor_split"])
def test_writes_through_views_of_layout_dependent_results_keep_the_layout(write):
    """Views fuse did not know (tensor_split, swapdims, moveaxis) hid writes into a `.view` (which became a copy of
    a channels_last output) or a `.contiguous()` (a copy of an NCHW tensor, the same memory as a channels_last
    one): the writes were lost (off by ~2)."""
    model = randomized(WriteThroughAView(write))
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


class FusedNameTaken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_fused = nn.Parameter(torch.randn(4, 1, 1, generator=gen()))

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + self.conv(x) * self.conv_fused


def test_fresh_names_avoid_parameters_and_buffers():
    """The fused layer's fresh name `conv_fused` was a Parameter's: KeyError."""
    model = randomized(FusedNameTaken())
    x = torch.randn(2, 4, 6, 6, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


class OwnFusedLayerAndView(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = ConvBNReLU2d(3, 64, 3, padding=1).eval()  # the user's own fused layer
        self.conv, self.bn = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(self.pre(x))))
        y.view(y.size(0), -1).clamp_(max=1.0)
        return y


def test_inplace_fuse_leaves_the_callers_own_fused_layers_as_they_were():
    model = randomized(OwnFusedLayerAndView())
    fused = pyops.fuse(model, inplace=True)
    assert not model.pre.keep_input_layout
    assert all(m.keep_input_layout for m in fused.modules() if isinstance(m, ConvBNReLU2d) and m is not model.pre)


def flatten_features(x):
    return x.view(x.size(0), -1)


torch.fx.wrap("flatten_features")


class OpaqueView(nn.Module):
    """A stem whose fused layer returns channels_last on the CPU, feeding code the graph does not show."""

    def __init__(self, hooked):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Linear(64 * 64, 5)
        self.flat = HookedFlatten() if hooked else None
        if hooked:
            self.flat.register_forward_hook(lambda module, args, out: out)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(self.flat(y) if self.flat is not None else flatten_features(y))


class HookedFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


@pytest.mark.parametrize("hooked", [False, True], ids=["fx.wrap", "hooked-leaf"])
def test_channels_last_outputs_do_not_reach_code_the_graph_does_not_show(hooked):
    """RuntimeError (view size is not compatible) in a function torch.fx.wrap left untraced or a hooked leaf."""
    model = randomized(OpaqueView(hooked))
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


def test_sync_batchnorm_and_pyops_conv1d_fold():
    """An eval-mode SyncBatchNorm (convert_sync_batchnorm) and the BatchNorm1d after a swapped pyops.nn.Conv1d were
    left unfolded."""
    sync = randomized(nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())))
    swapped = randomized(pyops.nn.swap_conv1d(nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU())))
    for model, x in ((sync, torch.randn(2, 3, 8, 8, generator=gen())), (swapped, torch.randn(2, 3, 9, generator=gen()))):
        fused = pyops.fuse(model)
        assert_no_batchnorm(fused)
        with torch.no_grad():
            assert_close_relative(fused(x), model(x), 1e-5)


def test_fuse_under_inference_mode_gives_a_model_usable_with_autograd():
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    with torch.inference_mode():
        fused = pyops.fuse(model)
    x = torch.randn(2, 3, 8, 8, generator=gen(), requires_grad=True)
    fused(x).sum().backward()  # (inference-tensor weights: RuntimeError)
    assert x.grad is not None


def test_fusing_a_fused_layer_alone_returns_it():
    layer = ConvBNReLU2d(3, 8, 3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a warning about an attribute '' before)
        fused = pyops.fuse(layer)
    assert type(fused) is ConvBNReLU2d and fused is not layer
    assert pyops.fuse(layer, inplace=True) is layer


def test_packed_path_stays_out_of_fake_tensor_tracing_and_computed_weights():
    """The packed path ran under FakeTensorMode (make_fx, the shape probes of convolutionalize): no fake kernel for
    pyops.conv2d_pack_weight; and it packed a weight computed anew each call (weight_norm) on every call."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    layer = ConvBNReLU2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, 8, 8, generator=gen())
    with torch.no_grad():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = mode.from_tensor(x)
            assert layer(fake).shape == (1, 64, 8, 8)
        assert layer._derived is None and layer(fake).shape == (1, 64, 8, 8)  # a fake tensor outside its mode
        layer(x)
    assert layer._derived is not None  # the real call packed
    normed = torch.nn.utils.parametrizations.weight_norm(ConvBNReLU2d(64, 64, 3, padding=1).eval())
    with torch.no_grad():
        want = F.conv2d(x, normed.weight, normed.bias, padding=1).relu()
        torch.testing.assert_close(normed(x), want, rtol=1e-5, atol=1e-5)
    assert normed._derived is None


def test_packed_weights_past_the_limit_are_freed():
    """The kept entries held their own lists of older ones: every packed weight stayed alive (9 MB per new input
    shape of a 512-channel layer)."""
    import weakref
    layer = ConvBNReLU2d(64, 64, 3, padding=1).eval()
    refs = []
    with torch.no_grad():
        for width in range(4, 24):
            layer(torch.randn(1, 64, 6, width, generator=gen()))
            refs.append(weakref.ref(layer._derived.value))
    alive = [r for r in refs if r() is not None]
    assert len(alive) == 8 and all(r() is not None for r in refs[-8:])


class WriteThroughAModule(nn.Module):
    def __init__(self, mid):
        super().__init__()
        self.conv, self.bn, self.mid = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), mid

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        self.mid(y.view(y.size(0), -1)).mul_(2)
        return y


@pytest.mark.parametrize("mid", [nn.Identity(), nn.Dropout(0.5), nn.Flatten()], ids=["Identity", "Dropout", "Flatten"])
def test_writes_through_modules_returning_their_input_keep_the_layout(mid):
    model = randomized(WriteThroughAModule(mid))
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


@pytest.mark.parametrize("write", [lambda v: v.positive().mul_(2), lambda v: torch.conj(v).mul_(2),
                                   lambda v: F.dropout(v, 0.5, training=False).mul_(2)],
                         ids=["positive", "conj", "F.dropout"])
def test_writes_through_ops_returning_their_input_keep_the_layout(write):
    model = randomized(WriteThroughAView(lambda y: write(y.view(y.size(0), -1))))
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


def flatten_in_torch_utils(x):
    return x.view(x.size(0), -1)


flatten_in_torch_utils.__module__ = "torch_utils"  # a user's module whose name starts with "torch"
torch.fx.wrap("flatten_in_torch_utils")


class OpaqueViewTorchUtils(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Linear(64 * 64, 5)

    def forward(self, x):
        return self.fc(flatten_in_torch_utils(F.relu(self.bn(self.conv(x)))))


def test_user_modules_named_like_torch_are_user_code():
    model = randomized(OpaqueViewTorchUtils())
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


def test_a_hooked_container_keeps_the_fused_layers_channels_last():
    """A no-op hook on resnet18.layer4 made every fused layer keep its input's layout (88 -> 117 ms): the hooked
    container is fused on its own, and hooks are the caller's code."""
    model = randomized(torchvision.models.resnet18(weights=None))
    model.layer4.register_forward_hook(lambda module, args, out: None)
    fused = pyops.fuse(model)
    assert not any(m.keep_input_layout for m in fused.modules() if isinstance(m, ConvBNReLU2d))
    x = torch.randn(1, 3, 64, 64, generator=gen())
    with torch.no_grad():
        assert_close_relative(fused(x), model(x), 1e-4)


class Recorder:
    def __init__(self):
        self.calls = 0

    def hook(self, module, args, out):
        self.calls += 1


def test_fusing_a_fused_layer_alone_keeps_its_hooks():
    """A bound-method hook records into the caller's own object (a deep copy recorded into a copy of it)."""
    layer = ConvBNReLU2d(3, 8, 3).eval()
    recorder = Recorder()
    layer.register_forward_hook(recorder.hook)
    with torch.no_grad():
        pyops.fuse(layer)(torch.randn(1, 3, 5, 5))
    assert recorder.calls == 1


class WriteThroughFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.flat = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Flatten()

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        self.flat(y).mul_(0)
        return y


@pytest.mark.parametrize("write", [lambda y: y.ravel().mul_(0), lambda y: torch.ravel(y).mul_(0),
                                   lambda y: y.to(memory_format=torch.channels_last).mul_(0),
                                   lambda y: torch.dropout(y, 0.5, False).view(y.size(0), -1).mul_(0),
                                   lambda y: torch.unsafe_split(y.view(y.size(0), -1), 32, 1)[0].mul_(0),
                                   lambda y: y.view(y.size(0), -1).numpy().__imul__(0)],
                         ids=["ravel", "torch.ravel", "to-memory_format", "torch.dropout", "unsafe_split", "numpy"])
def test_more_layout_dependent_results_and_aliases(write):
    """ravel, nn.Flatten and to(memory_format=...) give a view of one layout and a copy of the other; torch.dropout
    (not training), unsafe_split and numpy() return their input or views of it: writes through them were lost or
    applied to a copy (sums 0 vs ~1700)."""
    for model in (randomized(WriteThroughAView(write)), randomized(WriteThroughFlatten())):
        x = torch.randn(2, 3, 8, 8, generator=gen())
        with torch.no_grad():
            torch.testing.assert_close(pyops.fuse(model)(x), model(x), rtol=1e-5, atol=1e-5)


class HeadViewing(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.fc, self.write = nn.Linear(64 * 64, 5), write

    def forward(self, x):
        if self.write:
            x.flatten(1).mul_(0)
        return self.fc(x.view(x.size(0), -1))


class StemAndHookedHead(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), HeadViewing(write)
        self.head.register_forward_hook(lambda module, args, out: None)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("write", [False, True])
def test_a_hooked_containers_own_code_sees_the_models_layout(write):
    """A hooked container is fused on its own, its code out of the outer graph's sight: a `.view` there failed on
    the fused stem's channels_last output (RuntimeError), a write through a flatten was lost (off by 1600)."""
    model = randomized(StemAndHookedHead(write))
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


class MyLinear(nn.Linear):
    pass


def test_library_code_and_plain_subclasses_keep_the_fused_layout():
    """torchvision's stochastic_depth (torch.fx.wrap'ed; EfficientNet: every fused layer kept its layout, the fused
    model 1.6x slower than the model) and a subclass of a torch.nn layer keeping its forward are not code the graph
    cannot see."""
    effnet = randomized(torchvision.models.efficientnet_b0(weights=None))
    plain = randomized(nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
                                     MyLinear(64 * 36, 5)))
    for model, x in ((effnet, torch.randn(1, 3, 64, 64, generator=gen())), (plain, torch.randn(2, 3, 8, 8))):
        fused = pyops.fuse(model)
        assert not any(m.keep_input_layout for m in fused.modules() if isinstance(m, ConvBNReLU2d))
        with torch.no_grad():
            assert_close_relative(fused(x), model(x), 1e-4)


def test_fusing_a_lone_fused_layer_under_inference_mode_gives_normal_weights():
    layer = ConvBNReLU2d(8, 8, 3).eval()
    with torch.inference_mode():
        fused = pyops.fuse(layer)
    assert not fused.weight.is_inference()
    fused(torch.randn(1, 8, 6, 6, requires_grad=True)).sum().backward()


class ViewFlattening(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Linear(64 * 14 * 14, 10)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(y.view(y.size(0), -1))


def test_fused_models_flattening_with_view_convolutionalize():
    """fuse writes `.view` as view_or_copy, which convolutionalize did not take for a flatten ('no flatten')."""
    model = randomized(ViewFlattening())
    images = torch.randn(1, 3, 20, 20, generator=gen())
    with torch.no_grad():
        want = pyops.sliding_classify(model, images, 16, exact=True)
        got = pyops.sliding_classify(pyops.fuse(model), images, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


class HookedStemThenView(nn.Module):
    """The outer graph has no chain of its own; the hooked stem's fused layer returns channels_last."""

    def __init__(self):
        super().__init__()
        self.backbone, self.fc = HookedBlock(3, 64), nn.Linear(64 * 64, 5)
        self.backbone.register_forward_hook(lambda module, args, out: None)

    def forward(self, x):
        f = self.backbone(x)
        return self.fc(f.view(f.size(0), -1))


class HookedStemThenWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.conv, self.bn = HookedBlock(3, 64), nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64)
        self.backbone.register_forward_hook(lambda module, args, out: None)

    def forward(self, x):
        y = self.backbone(x)
        y.flatten().mul_(0)
        return F.relu(self.bn(self.conv(y))) + y.sum()


@pytest.mark.parametrize("cls", [HookedStemThenView, HookedStemThenWrite])
def test_a_hooked_containers_fused_layers_meet_the_graphs_code(cls):
    """A hooked container (a feature-extraction hook on a backbone) is fused on its own, and its layers returned
    channels_last to the outer graph's code: a `.view` failed where the outer graph had no chain of its own, a write
    through a flatten was lost (off by 1783)."""
    model = randomized(cls())
    x = torch.randn(2, 3, 8, 8, generator=gen())
    with torch.no_grad():
        assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


@pytest.mark.parametrize("name,hooked", [("resnet18", "fc"), ("mobilenet_v2", "classifier")])
def test_a_hook_on_the_classifier_keeps_the_fused_layouts(name, hooked):
    """A hooked module after the flatten counted as a possible write through it, and a fused hooked container as
    unknown code: every fused layer kept its layout (resnet18 34.7 ms, as unfused, vs 22 ms)."""
    model = randomized(getattr(torchvision.models, name)(weights=None))
    model.get_submodule(hooked).register_forward_hook(lambda module, args, out: None)
    fused = pyops.fuse(model)
    assert not any(m.keep_input_layout for m in fused.modules() if isinstance(m, ConvBNReLU2d))
    x = torch.randn(1, 3, 64, 64, generator=gen())
    with torch.no_grad():
        assert_close_relative(fused(x), model(x), 1e-4)


class Postprocess(nn.Module):
    """A part with a public method beside forward, which its parent calls (as a detection model's transform)."""
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(64, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))

    def postprocess(self, y):
        return y.flatten(1).sum(1)


class Features(nn.Module):
    """A backbone returning a dict of feature maps (as torchvision's FPN backbones do): a widening stem, so that its
    fused layers compute channels_last, and a ResNet block."""
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.block = torchvision.models.resnet.BasicBlock(64, 64)
        self.out_channels = 64

    def forward(self, x):
        return {"out": self.block(self.stem(x)), "pool": F.adaptive_avg_pool2d(self.block(self.stem(x)), 1)}


class UntraceableWithParts(nn.Module):
    """Control flow on a value (untraceable) around a traceable backbone, with a plain attribute the parent reads
    and a `.view` of the backbone's feature maps in the parent's own code."""
    def __init__(self):
        super().__init__()
        self.backbone = Features()
        self.head = Postprocess()

    def forward(self, x):
        if x.sum() > -1e30:
            x = x * 1.5
        y = self.backbone(x)
        assert self.backbone.out_channels == y["out"].shape[1]
        flat = y["out"].view(y["out"].size(0), 64, -1)  # (a view: fails on a channels_last tensor)
        return self.head.postprocess(self.head(flat.mean(2).view(-1, 64, 1, 1) + y["pool"]))


@pytest.mark.parametrize("inplace", [False, True])
def test_untraceable_model_fuses_its_traceable_parts(inplace):
    """One untraceable line in a model's forward left every chain its parts call by attribute unfused (only
    Sequentials were searched: a detection model kept 49 of its 53 FrozenBatchNorms). Now each part torch.fx traces
    and whose class adds no public method is fused whole in its place (its plain attributes kept, its outputs, a
    dict here, in its input's layout: the model's own code may view them); a part with other methods is searched
    in."""
    model = randomized(UntraceableWithParts())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, generator=gen())
    with pytest.warns(UserWarning, match="could not trace UntraceableWithParts.*fused whole.*backbone"):
        fused = pyops.fuse(model, inplace=inplace)
    assert (fused is model) == inplace
    assert not any(isinstance(m, _BatchNorm) for m in fused.backbone.modules())
    assert isinstance(fused.head, Postprocess) and isinstance(fused.head.bn, nn.BatchNorm2d)  # searched in: no chain
    assert fused.backbone.out_channels == 64
    # its layers compute channels_last (CPU inference); the parent's code gets NCHW feature maps (its `.view`)
    assert not any(m.keep_input_layout for m in fused.backbone.modules() if isinstance(m, ConvBNReLU2d))
    with torch.no_grad():
        stem = next(m for m in fused.backbone.modules() if isinstance(m, ConvBNReLU2d) and m.in_channels == 3)
        assert stem(x).is_contiguous(memory_format=torch.channels_last)
        assert all(t.is_contiguous() for t in fused.backbone(x).values())
        assert_close_relative(fused(x), reference(x), 1e-5)


class ScaledBlock(nn.Sequential):
    pass


def test_hooks_reading_module_attributes_keep_working():
    """A module fused into a GraphModule (a hooked container, the model itself) lost its plain attributes: hooks
    reading them raised AttributeError; a hooked parametrized conv (its parametrizations are children) became a
    GraphModule although nothing inside it fused. Plain attributes now move with the hooks, and a hooked module
    whose fuse changes nothing stays itself."""
    from torch.nn.utils.parametrizations import weight_norm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ScaledBlock(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.block.scale = 2.0
            self.block.register_forward_hook(lambda m, args, out: out * m.scale)
            self.conv = weight_norm(nn.Conv2d(8, 8, 1))
            self.conv.register_forward_hook(lambda m, args, out: out[:, :m.out_channels // 2])
            self.bn, self.temperature = nn.BatchNorm2d(4), 0.5

        def forward(self, x):
            return self.bn(self.conv(self.block(x)))

    model = randomized(Net())
    model.register_forward_hook(lambda m, args, out: out / m.temperature)
    x = torch.randn(2, 4, 8, 8, generator=gen())
    fused = pyops.fuse(model)
    assert type(fused.conv) is type(model.conv) and isinstance(fused.block, fx.GraphModule)
    with torch.no_grad():
        assert_close_relative(fused(x), model(x), 1e-5)
        assert_close_relative(copy.deepcopy(fused)(x), model(x), 1e-5)  # GraphModule's deepcopy dropped hooks


def test_hooks_of_a_traced_model_survive_its_copy():
    """fuse(inplace=False) deep-copies the model, and torch's copy of a GraphModule (a torch.fx-traced model, a
    fused one fused again, a traced submodule) drops its forward hooks: the fused result lacked them (off by 2x)."""
    def double(module, args, out):
        return out * 2

    traced = fx.symbolic_trace(randomized(nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))).eval()
    traced.register_forward_hook(double)
    outer = nn.Sequential(copy.deepcopy(traced), nn.Conv2d(8, 2, 1)).eval()
    outer[0].register_forward_hook(double)
    x = torch.randn(1, 4, 8, 8, generator=gen())
    with torch.no_grad():
        for model in (traced, outer):
            assert_close_relative(pyops.fuse(model)(x), model(x), 1e-5)


class Describes:
    def describe(self):
        return "part"


class PartWithMixin(nn.Module, Describes):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.body(x)


class PartWithProperty(PartWithMixin.__base__):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    @property
    def width(self):
        return self.conv.out_channels

    def forward(self, x):
        return self.bn(self.conv(x))


class UntraceableAroundParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixed, self.prop = PartWithMixin(), PartWithProperty()
        self.traced = fx.symbolic_trace(nn.Sequential(nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
        self.alias = self.traced

    def forward(self, x):
        if x.sum() > -1e30:
            x = x * 2
        assert self.mixed.describe() == "part" and self.prop.width == 8
        return self.alias(self.traced(self.prop(self.mixed(x))[:, :, :, :].repeat(1, 1, 1, 1))[:, :, :, :]
                          .repeat(1, 2, 1, 1))


def test_fallback_parts_keep_methods_aliases_and_fuse_graph_modules():
    """The fallback replaced a part whose public method came from a mixin after nn.Module, or which had a public
    property (AttributeError in the parent's code); fused only the first name of a part the model holds twice (the
    second kept its BatchNorm and stopped being the same module); and searched inside a torch.fx GraphModule (its
    methods are GraphModule's) instead of fusing it, leaving its BatchNorms."""
    model = randomized(UntraceableAroundParts())
    x = torch.randn(2, 3, 16, 16, generator=gen())
    with pytest.warns(UserWarning, match="could not trace"):
        fused = pyops.fuse(model)
    assert isinstance(fused.mixed, PartWithMixin) and isinstance(fused.prop, PartWithProperty)
    assert fused.alias is fused.traced and not any(isinstance(m, _BatchNorm) for m in fused.traced.modules())
    with torch.no_grad():
        assert_close_relative(fused(x), model(x), 1e-5)


def test_deep_copies_keep_the_current_attribute_values():
    """fuse kept a part's plain attributes as a snapshot that torch's GraphModule deepcopy wrote back: a value set
    after fusing (backbone.out_channels = 16) came back as the old one in copies and in fuse of the result."""
    model = randomized(UntraceableWithParts())
    with pytest.warns(UserWarning, match="could not trace"):
        fused = pyops.fuse(model)
    fused.backbone.out_channels = 16
    assert copy.deepcopy(fused).backbone.out_channels == 16
    traced = pyops.fuse(randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))
    traced.note = "kept"
    traced.register_forward_hook(lambda m, args, out: out * 2)
    again = copy.deepcopy(traced)
    x = torch.randn(1, 3, 6, 6, generator=gen())
    with torch.no_grad():
        assert again.note == "kept" and torch.equal(again(x), traced(x))


class PartSharingOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y, y[:, :8]  # two outputs sharing memory


class PartMakingItsInputNCHW(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x.contiguous())))


class UntraceableUsingPartOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.stem = PartSharingOutputs(), PartMakingItsInputNCHW()

    def forward(self, x):
        if x.sum() > -1e30:
            x = x * 1.0
        y = self.stem(x)
        a, b = self.shared(y)
        a.mul_(0.5)  # a write through one output the other one sees
        return b.view(b.size(0), -1), y.view(y.size(0), -1)


def test_fallback_parts_keep_their_outputs_aliasing_and_give_nchw():
    """Fused parts converted their channels_last outputs to NCHW copies: a write through one output no longer
    reached another that was a view of it (off by 1.69); and only where the part's input was NCHW, so a part making
    its channels_last input contiguous first returned channels_last to the model's `.view` (RuntimeError)."""
    model = randomized(UntraceableUsingPartOutputs())
    x = torch.randn(2, 3, 8, 8, generator=gen()).contiguous(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match="could not trace"):
        fused = pyops.fuse(model)
    with torch.no_grad():
        for got, expected in zip(fused(x), model(x)):
            assert_close_relative(got, expected, 1e-5)


def test_packed_layers_in_a_cpu_autocast_region():
    """A float32 input reaching a layer with a packed weight inside a bf16 autocast region: the op's autocast kernel
    cast the opaque packed weight (NotImplementedError); the layer now computes as the op does there."""
    conv, bn = fp32_conv_bn(cin=64, cout=64, padding=1)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    x = torch.randn(2, 64, 8, 8, generator=gen())
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused(x)
            expected = conv2d_bias_act(x, fused.weight, fused.bias, 1, 1)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected)
