"""pyops.count_ops, its CLI, the FlopCounterMode helpers and bench/report.py."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import pyops
from pyops import counting
from pyops.count import main as count_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_report():
    """bench/report.py as a module (bench/ is not a package, and its conftest must stay out of sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "bench", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def only_row(model, x):
    count = pyops.count_ops(model, x)
    assert len(count.by_layer) == 1, count
    return count.by_layer[0]


# ---- the homework's figures -------------------------------------------------------------------------------------

def test_alexnet_homework_figures():
    model = torchvision.models.alexnet(weights=None)
    count = pyops.count_ops(model, torch.randn(1, 3, 224, 224))
    assert count.conv == 1_311_133_056
    assert count.linear == 117_243_904
    # fused (its Conv2d → ReLU and Linear → ReLU each one pyops op): the same figures, layer by layer
    fused = pyops.count_ops(pyops.fuse(model.eval()), torch.randn(1, 3, 224, 224))
    assert (fused.conv, fused.linear, fused.other) == (count.conv, count.linear, 0)
    assert [row[1:] for row in fused.by_layer] == [row[1:] for row in count.by_layer]
    assert count.other == 0 and count.total == count.conv + count.linear
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [(r.name, r.kind) for r in count.by_layer] == ([(n, "conv") for n, _ in convs] +
                                                          [(n, "linear") for n, _ in linears])
    # each conv row is the homework's C_in·F²·C_out·h_out² multiplications and as many additions
    for (name, conv), row in zip(convs, count.by_layer):
        _, c_out, h, w = row.output_shape
        assert h == w and row.mults == row.adds == conv.in_channels * conv.kernel_size[0] ** 2 * c_out * h * h


def test_alexnet_agrees_with_flop_counter_mode():
    """PyTorch's FlopCounterMode counts 2 flops per product for these layers: 2·(all mults)."""
    model, x = torchvision.models.alexnet(weights=None), torch.randn(2, 3, 224, 224)
    count = pyops.count_ops(model, x)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(x)
    assert flops.get_total_flops() == 2 * sum(r.mults for r in count.by_layer)


# ---- convolutions against hand computations -------------------------------------------------------------------

# (module, input shape, output shape, mults per output) — hand-computed:
#   out = floor((in + 2·pad − dil·(k − 1) − 1) / stride) + 1, mults per output = (C_in/groups)·∏kernel
HAND_CONVS = [
    # 2D grouped, strided, dilated: out = floor((9 + 2 − 4 − 1)/2) + 1 = 4; per output (4/2)·3·3 = 18
    (lambda b: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=b), (1, 4, 9, 9), (1, 6, 4, 4), 18),
    # depthwise 5x3 kernel, stride (1, 2): out = (8 − 5 + 1, floor((7 − 3)/2) + 1) = (4, 3); per output 1·15 = 15
    (lambda b: nn.Conv2d(3, 3, (5, 3), stride=(1, 2), groups=3, bias=b), (2, 3, 8, 7), (2, 3, 4, 3), 15),
    # 1D: out = floor((50 + 6 − 3·4 − 1)/3) + 1 = 15; per output (8/4)·5 = 10
    (lambda b: nn.Conv1d(8, 12, 5, stride=3, padding=3, dilation=3, groups=4, bias=b), (3, 8, 50), (3, 12, 15), 10),
    # 3D: out = (6 − 3 + 1, floor((7 + 2 − 3)/2) + 1, 5) = (4, 4, 5); per output 2·3·3·1 = 18
    (lambda b: nn.Conv3d(2, 5, (3, 3, 1), stride=(1, 2, 1), padding=(0, 1, 0), bias=b), (1, 2, 6, 7, 5),
     (1, 5, 4, 4, 5), 18),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("make,in_shape,out_shape,per_output", HAND_CONVS)
def test_conv_hand_computed(make, in_shape, out_shape, per_output, bias):
    row = only_row(make(bias), torch.randn(in_shape))
    outputs = math.prod(out_shape)
    assert row.kind == "conv" and row.output_shape == out_shape
    assert row.mults == outputs * per_output
    # per output: mults − 1 additions, plus the bias add; bias-free layers: adds = mults − outputs
    assert row.adds == (row.mults if bias else row.mults - outputs)


def test_conv_transpose_hand_computed():
    # padding 0: every input value is multiplied by (C_out/groups)·∏kernel weights and all products land inside
    # input (2, 4, 5, 6), weight (4, 6/2, 3, 2), stride 2: mults = 2·4·5·6 · 3·3·2 = 4320;
    # output (2, 6, 11, 12): every position is reached (stride 2 ≤ kernel), so bias-free adds = 4320 − 2·6·11·12
    layer = nn.ConvTranspose2d(4, 6, (3, 2), stride=2, groups=2, bias=False)
    row = only_row(layer, torch.randn(2, 4, 5, 6))
    assert row.output_shape == (2, 6, 11, 12) and row.kind == "conv"
    assert (row.mults, row.adds) == (4320, 4320 - 1584)


TRANSPOSED = [
    (nn.ConvTranspose1d, dict(in_channels=3, out_channels=2, kernel_size=2, stride=5), (2, 3, 7)),  # gaps: unreached
    (nn.ConvTranspose1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, output_padding=1,
                              dilation=2, groups=2), (1, 4, 9)),
    (nn.ConvTranspose2d, dict(in_channels=2, out_channels=4, kernel_size=(3, 4), stride=(3, 1), padding=(1, 2)),
     (2, 2, 5, 4)),
    (nn.ConvTranspose3d, dict(in_channels=2, out_channels=2, kernel_size=2, stride=(1, 3, 2), padding=(0, 1, 1),
                              groups=2), (1, 2, 3, 4, 3)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls,kwargs,in_shape", TRANSPOSED)
def test_conv_transpose_against_ones(cls, kwargs, in_shape, bias):
    """With all-ones input and weights each output value is the number of products that reach it: their sum is
    the count of multiplications, the non-zero outputs are those that need (products − 1) additions (+1 bias)."""
    layer = cls(**kwargs, bias=bias).double()
    row = only_row(layer, torch.randn(in_shape, dtype=torch.float64))
    with torch.no_grad():
        nn.init.ones_(layer.weight)
        reached = F.__dict__[f"conv_transpose{len(in_shape) - 2}d"](
            torch.ones(in_shape, dtype=torch.float64), layer.weight, None, layer.stride, layer.padding,
            layer.output_padding, layer.groups, layer.dilation)
    assert row.mults == int(reached.sum())
    assert row.adds == (row.mults if bias else row.mults - int(torch.count_nonzero(reached)))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("name,value", [("stride", 2), ("padding", 1), ("dilation", 2)])
def test_one_value_lists_stand_for_every_spatial_dim(transposed, name, value):
    """PyTorch's convolutions take stride=(2,) for (2, 2): the count must be the same (a 1-list was zipped with the
    two spatial dims and counted one of them: 129 of a transposed conv's 2199 operations)."""
    x, w = torch.randn(1, 2, 5, 6), torch.randn(2, 3, 3, 3)  # (C_in, C_out, k, k) transposed
    w = w if transposed else w.transpose(0, 1)

    def conv(v):  # torch.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        args = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], name: v}
        return lambda t: torch.convolution(t, w, None, args["stride"], args["padding"], args["dilation"], transposed,
                                           [0, 0], 1)

    whole, listed = only_row(conv([value, value]), x), only_row(conv([value]), x)
    assert (listed.mults, listed.adds, listed.output_shape) == (whole.mults, whole.adds, whole.output_shape)


def test_conv_transpose_stride_list_hand_computed():
    # input (1, 2, 5, 6), weight (2, 3, 3, 3), stride 2, padding 1 -> output (1, 3, 9, 11). Along H (5 inputs, 9
    # outputs) tap k lands input i at 2i - 1 + k: 4 + 5 + 4 = 13 products inside, reaching all 9 outputs; along W
    # (6 inputs, 11 outputs) 5 + 6 + 5 = 16 products reaching all 11: per (C_in, C_out) pair 13·16 = 208 products,
    # mults = 2·3·208 = 1248, adds without bias = 1248 − 3·9·11 = 951
    x, w = torch.randn(1, 2, 5, 6), torch.randn(2, 3, 3, 3)
    row = only_row(lambda t: torch.convolution(t, w, None, [2], [1], [1], True, [0], 1), x)
    assert (row.mults, row.adds, row.output_shape) == (1248, 951, (1, 3, 9, 11))


# ---- linear and matmul -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 20), (2, 3, 20), (2, 2, 3, 20)])
def test_linear(shape, bias):
    row = only_row(nn.Linear(20, 7, bias=bias), torch.randn(shape))
    outputs = math.prod(shape[:-1]) * 7
    # the op's output: nn.Linear runs addmm on the input flattened to a matrix
    assert row.kind == "linear" and row.output_shape == (math.prod(shape[:-1]), 7)
    assert row.mults == outputs * 20 and row.adds == outputs * 20 - (0 if bias else outputs)


class Matmuls(nn.Module):
    def forward(self, a, b, v, c):
        return (torch.mm(a, b), torch.bmm(c, c.transpose(1, 2)), torch.mv(a, v), torch.dot(v, v),
                torch.baddbmm(torch.ones(2, 3, 3), c, c.transpose(1, 2)), torch.addbmm(torch.ones(3, 3), c, c.mT),
                torch.addmm(torch.ones(4, 6), a, b, beta=0), a @ b)


def test_matmul_family():
    a, b, v, c = torch.randn(4, 5), torch.randn(5, 6), torch.randn(5), torch.randn(2, 3, 8)
    rows = pyops.count_ops(Matmuls(), (a, b, v, c)).by_layer
    # (outputs, contracted length, added term): mm 4·6 of 5; bmm 2·3·3 of 8; mv 4 of 5; dot 1 of 5;
    # baddbmm 2·3·3 of 8 + 1; addbmm 3·3 of 2·8 + 1; addmm with beta=0 adds nothing; a @ b is an mm
    expected = [(24, 5, 0), (18, 8, 0), (4, 5, 0), (1, 5, 0), (18, 8, 1), (9, 16, 1), (24, 5, 0), (24, 5, 0)]
    assert [(r.kind, r.mults, r.adds) for r in rows] == [("linear", n * k, n * (k - 1 + bias))
                                                         for n, k, bias in expected]


def test_attention_counts_projections_and_both_matmuls():
    """batch 2, 5 tokens, embed 16 in 4 heads of 4: in/out projections of 16 products per output, then per head
    scores 5·5 outputs of 4 products and the weighted sum 5·4 outputs of 5 products."""
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    rows = pyops.count_ops(mha, (x, x, x, None, False)).by_layer
    tokens, heads = 2 * 5, 2 * 4
    attention = heads * (25 * 4 + 20 * 5)
    # the packed input projection runs as mm + a separate bias add on the batch_first (transposed) input
    assert [(r.kind, r.mults, r.adds) for r in rows] == [
        ("linear", tokens * 48 * 16, tokens * 48 * 15), ("linear", attention, attention - heads * (25 + 20)),
        ("linear", tokens * 16 * 16, tokens * 16 * 16)]
    assert torch.backends.mha.get_fastpath_enabled()  # restored


# ---- model-level properties ---------------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, groups=4, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(x.mean((2, 3))) + x.flatten(1) @ torch.ones(x[0].numel(), 5)


def test_fused_aten_kernels_without_a_counter_warn():
    """nn.Bilinear (aten::_trilinear) and the CPU LSTM (aten::mkldnn_rnn_layer) hide their products in one kernel:
    a warning names it rather than a silent zero; nn.GRU's addmm calls are counted."""
    with pytest.warns(UserWarning, match="_trilinear"):
        pyops.count_ops(nn.Bilinear(3, 4, 5), (torch.randn(2, 3), torch.randn(2, 4)))
    gru = pyops.count_ops(nn.GRU(4, 8), torch.randn(5, 2, 4))
    assert gru.linear > 0


def test_row_names_and_table():
    count = pyops.count_ops(SmallNet(), torch.randn(2, 3, 16, 16))
    assert [(r.name, r.kind) for r in count.by_layer] == [("stem.0", "conv"), ("block.0", "conv"),
                                                          ("head", "linear"), ("", "linear")]
    text = str(count)
    for row in count.by_layer:
        assert f"{row.mults + row.adds:,}" in text
    for kind in ("conv", "linear", "other"):
        assert f"{kind} total" in text and f"{getattr(count, kind):,}" in text
    assert "<model>" in text and f"{count.total:,}" in text.splitlines()[-1]


def test_batch_scales_every_count():
    model = SmallNet()
    one, three = pyops.count_ops(model, torch.randn(1, 3, 16, 16)), pyops.count_ops(model, torch.randn(3, 3, 16, 16))
    assert (three.conv, three.linear, three.other, three.total) == (3 * one.conv, 3 * one.linear, 3 * one.other,
                                                                    3 * one.total)
    assert [(r.mults * 3, r.adds * 3) for r in one.by_layer] == [(r.mults, r.adds) for r in three.by_layer]


def test_meta_device_counts_the_same():
    model, x = SmallNet(), torch.randn(2, 3, 16, 16)
    assert pyops.count_ops(model.to("meta"), x.to("meta")) == pyops.count_ops(SmallNet(), x)


def test_eval_mode_during_count_and_restored():
    model = SmallNet().train()
    model.stem[1].eval()
    stats = model.stem[1].running_mean.clone()
    pyops.count_ops(model, torch.randn(2, 3, 16, 16))
    assert torch.equal(model.stem[1].running_mean, stats)  # batch norm ran with its running statistics
    assert model.training and model.block.training and not model.stem[1].training


class FunctionalConv(nn.Module):
    """The same layer as nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), written with F.conv2d."""

    def __init__(self, conv):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=2, padding=1, groups=2)


def test_functional_conv_counts_as_the_module():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 11, 11)
    a, b = pyops.count_ops(conv, x), pyops.count_ops(FunctionalConv(conv), x)
    assert (a.conv, a.linear, a.other) == (b.conv, b.linear, b.other) and a.conv > 0
    assert [r[1:] for r in a.by_layer] == [r[1:] for r in b.by_layer]


# ---- pyops ops ------------------------------------------------------------------------------------------------

def test_smooth_max_is_other():
    class Net(nn.Module):
        def forward(self, x):
            return pyops.smooth_max(x, 2.0, dim=1)

    row = only_row(Net(), torch.randn(3, 10, 4))
    # 12 outputs over n = 10: n multiplications by beta + 1 by 1/beta, n − 1 additions
    assert (row.kind, row.mults, row.adds, row.output_shape) == ("other", 12 * 11, 12 * 9, (3, 4))


@pytest.mark.parametrize("beta", [math.inf, -math.inf])
def test_smooth_max_at_infinite_beta_is_a_max_without_arithmetic(beta):
    assert pyops.count_ops(lambda x: pyops.smooth_max(x, beta, dim=1), torch.randn(3, 10)).by_layer == []


def test_scripted_submodule_counts_under_its_parent_and_leaves_no_hooks():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(torch.jit.script(nn.Linear(4, 3))))
    count = pyops.count_ops(model, torch.randn(2, 4))
    assert [(r.name, r.mults, r.adds) for r in count.by_layer] == [("0", 32, 32), ("1", 24, 24)]
    assert not any(m._forward_pre_hooks or m._forward_hooks
                   for m in model.modules() if not isinstance(m, torch.jit.ScriptModule))


def test_pyops_op_without_counter_warns():
    class Net(nn.Module):
        def forward(self, x):
            r = pyops.smooth_max(x, 1.0)
            return torch.ops.pyops.smooth_max_backward(torch.ones_like(r), x, r, 1.0, -1, False)

    with pytest.warns(UserWarning, match="no counter for pyops::smooth_max_backward"):
        count = pyops.count_ops(Net(), torch.randn(2, 5))
    assert [r.kind for r in count.by_layer] == ["other"]


# The fused pyops ops, counted by the counters registered for them: the same convolution rows as the unfused layers.
class ConvBNReLU(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=bias), nn.BatchNorm2d(8)

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        return (y + residual if residual is not None else y).relu()


class FusedConvBNReLU(nn.Module):
    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, x, residual=None):
        c, bn = self.original.conv, self.original.bn
        return torch.ops.pyops.conv2d_bn_relu(x, c.weight, c.bias, bn.weight, bn.bias, bn.running_mean,
                                             bn.running_var, bn.eps, [2, 2], [1, 1], [1, 1], 2, True, residual)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_conv2d_bn_relu_counts_the_original_conv_plus_epilogue(bias, with_residual):
    original = ConvBNReLU(bias)
    x = torch.randn(2, 4, 9, 9)
    residual = torch.randn(2, 8, 5, 5) if with_residual else None
    plain, fused = pyops.count_ops(original, (x, residual)), pyops.count_ops(FusedConvBNReLU(original), (x, residual))
    assert fused.conv == plain.conv and fused.linear == plain.linear == 0
    conv_row, epilogue = fused.by_layer
    assert conv_row[1:] == plain.by_layer[0][1:]
    outputs = 2 * 8 * 5 * 5  # batch norm: one scale mult and one shift add each; the residual one add each
    assert (epilogue.kind, epilogue.mults, epilogue.adds) == ("other", outputs, outputs * (1 + with_residual))
    assert fused.other == outputs * (2 + with_residual)


def test_conv2d_bias_act_and_conv1d_counters():
    w, b, x = torch.randn(6, 3, 3, 3), torch.randn(6), torch.randn(1, 3, 8, 8)
    residual = torch.randn(1, 6, 8, 8)

    class Net(nn.Module):
        def forward(self, x):
            y = torch.ops.pyops.conv2d_bias_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, 1, residual)
            z = torch.ops.pyops.conv2d_bias_act(x, w, None, [1, 1], [1, 1], [1, 1], 1, 1, None)
            return y + z, torch.ops.pyops.conv1d(x.flatten(2), torch.randn(4, 3, 5), None, 2, 0, 3, 1)

    rows = pyops.count_ops(Net(), x).by_layer
    # per output 3·3·3 = 27 products; conv1d: length floor((64 − 12 − 1)/2) + 1 = 26, 4 channels, 3·5 products
    outputs = 6 * 8 * 8
    assert [(r.kind, r.mults, r.adds) for r in rows] == [
        ("conv", outputs * 27, outputs * 27), ("other", 0, outputs), ("conv", outputs * 27, outputs * 26),
        ("conv", 4 * 26 * 15, 4 * 26 * 14)]


def test_registered_counter_counts_a_new_op():
    @torch.library.custom_op("pyops_test::scale_shift", mutates_args=())
    def scale_shift(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    counting.register_op_counter("pyops_test::scale_shift",
                                 lambda a, out: [counting.elementwise_work(a["x"].numel(), 1, 1)])
    assert [r[1:] for r in pyops.count_ops(scale_shift, torch.randn(3, 4)).by_layer] == [("other", 12, 12, (3, 4))]
    counting.register_op_counter("pyops_test::scale_shift", lambda a, out: [counting.Work("flops", 1, 1)])
    with pytest.raises(ValueError, match="kind 'flops'"):
        pyops.count_ops(scale_shift, torch.randn(3, 4))


def test_register_op_counter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="op_name"):
        counting.register_op_counter("conv2d", lambda a, out: [])
    with pytest.raises(TypeError, match="fn"):
        counting.register_op_counter("pyops::x", 3)


# ---- FlopCounterMode: the helpers pyops' conv-like ops register their formulas with -------------------------------

@torch.library.custom_op("pyops_test::conv", mutates_args=())
def _conv(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int, transposed: bool) -> torch.Tensor:
    return (F.conv_transpose2d if transposed else F.conv2d)(x, w, None, stride, groups=groups)


@torch.library.custom_op("pyops_test::conv_backward", mutates_args=())
def _conv_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, groups: int,
                   transposed: bool) -> List[torch.Tensor]:
    gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, w, None, [stride] * 2, [0, 0], [1, 1], transposed,
                                                    [0, 0], groups, [True, True, False])
    return [gx, gw]


@_conv.register_fake
def _(x, w, stride, groups, transposed):
    return (F.conv_transpose2d if transposed else F.conv2d)(x.to("meta"), w.to("meta"), None, stride,
                                                            groups=groups).to(x.device)


def _conv_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.hyper = inputs[2:]


def _conv_grad(ctx, grad):
    return (*torch.ops.pyops_test.conv_backward(grad, *ctx.saved_tensors, *ctx.hyper), None, None, None)


_conv.register_autograd(_conv_grad, setup_context=_conv_setup_context)


@register_flop_formula(torch.ops.pyops_test.conv)
def _conv_flop(x, w, stride, groups, transposed, *, out_shape):
    return counting.conv_flops(x, w, out_shape, transposed)


@register_flop_formula(torch.ops.pyops_test.conv_backward)
def _conv_backward_flop(grad, x, w, stride, groups, transposed, *, out_shape):
    return counting.conv_backward_flops(grad, x, w, transposed=transposed)


@pytest.mark.parametrize("transposed", [False, True])
def test_flop_counter_mode_sees_a_conv_like_op(transposed):
    """A custom conv op whose formulas use conv_flops / conv_backward_flops counts, forward and backward, what
    FlopCounterMode counts for the ATen convolution it stands for."""
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True) if transposed else torch.randn(6, 2, 3, 3, requires_grad=True)
    stride, groups = 2, 2
    conv = F.conv_transpose2d if transposed else F.conv2d

    def flops(f):
        with FlopCounterMode(display=False) as counter:
            f(x, w).sum().backward()
        return counter.get_flop_counts()["Global"]

    ours = flops(lambda x, w: torch.ops.pyops_test.conv(x, w, stride, groups, transposed))
    theirs = flops(lambda x, w: conv(x, w, None, stride, groups=groups))
    assert ours[torch.ops.pyops_test.conv] == theirs[torch.ops.aten.convolution] > 0
    assert ours[torch.ops.pyops_test.conv_backward] == theirs[torch.ops.aten.convolution_backward] > 0


# ---- the command line ---------------------------------------------------------------------------------------------

def test_cli_prints_the_alexnet_table():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pyops.count", "alexnet", "--input", "1,3,224,224"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("features.0") and "conv" in line for line in lines)
    assert any(line.startswith("conv total") and line.endswith("1,311,133,056") for line in lines)
    assert any(line.startswith("linear total") and line.endswith("117,243,904") for line in lines)


def test_cli_module_attr_and_batch(capsys):
    assert count_main(["torchvision.models:resnet18", "--input", "2,3,64,64"]) == 0
    with torch.device("meta"):
        expected = pyops.count_ops(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    assert str(expected) in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [(["alexnx"], "did you mean alexnet"),
                                          (["no_such_module:x"], "cannot import module"),
                                          (["torch.nn:Linear"], "calling 'torch.nn:Linear'() failed"),
                                          ([":Linear"], "cannot import module ''"),
                                          (["alexnet", "--input", "1,3,a"], "comma-separated integers"),
                                          (["alexnet", "--input", f"{2**64},3,8,8"], "sizes from 0 to 2**63 - 1"),
                                          (["alexnet", "--device", "bogus"], "argument --device: cannot use")])
def test_cli_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        count_main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_cli_model_failure_exit_1(capsys):
    assert count_main(["alexnet", "--input", "1,3,8,8"]) == 1
    assert "running alexnet on an input of shape (1, 3, 8, 8) failed" in capsys.readouterr().err


# ---- bench/report.py --------------------------------------------------------------------------------------------

def fake_benchmark(case, impl, median, **info):
    return {"name": f"bench[{impl}]", "group": case, "stats": {"median": median, "min": median / 2},
            "extra_info": {"case": case, "impl": impl, "bytes": None, "flops": None, "peak_mem": None, **info}}


def test_report_on_fake_results(tmp_path):
    data = {"machine_info": {"node": "box", "cpu": {"brand_raw": "Test CPU 9000"}, "torch": "9.9.9", "cpu_threads": 2},
            "datetime": "2026-11-27T10:00:00",
            "benchmarks": [fake_benchmark("conv 3x3", "pyops", 0.002, flops=4e9),
                           fake_benchmark("conv 3x3", "torch.conv2d", 0.005),
                           fake_benchmark("copy-bound op", "pyops", 0.004, bytes=2e8),
                           fake_benchmark("copy-bound op", "torch.add", 0.001),
                           fake_benchmark("peak: copy", "Tensor.copy_", 0.001, bytes=1e8),
                           fake_benchmark("peak: gemm fp32", "torch.mm", 0.001, flops=1e10),
                           fake_benchmark("lonely", "pyops", 0.001)]}
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(data))
    assert load_report().main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "2026-11-27" in md and "Test CPU 9000" in md and "torch 9.9.9" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2
    # speed-up = baseline / pyops; rate from flops or bytes, as a share of the peaks measured in the same run
    assert rows[0].split(" | ")[:5] == ["| conv 3x3", "2.000 ms", "torch.conv2d", "5.000 ms", "2.50x"]
    assert "2000.0 GFLOP/s (20% of peak)" in rows[0]
    assert rows[1].split(" | ")[:5] == ["| copy-bound op", "4.000 ms", "torch.add", "1.000 ms", "0.25x"]
    assert "50.0 GB/s (50% of peak)" in rows[1]
    assert "Geometric mean speed-up over all rows: 0.79x" in md and "lonely" in md
    png = (tmp_path / "out" / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # --stat min reports each benchmark's fastest round instead (fake minima: half the medians)
    assert load_report().main([str(path), "--out", str(tmp_path / "min"), "--stat", "min", "--quiet"]) == 0
    md = (tmp_path / "min" / "summary.md").read_text()
    assert "pytest-benchmark minima" in md and "| conv 3x3 | 1.000 ms | torch.conv2d | 2.500 ms | 2.50x" in md
    # two runs: each implementation keeps its best time (here the baseline improved in the second run)
    second = dict(data, benchmarks=[fake_benchmark("conv 3x3", "pyops", 0.003),
                                    fake_benchmark("conv 3x3", "torch.conv2d", 0.004)])
    path2 = tmp_path / "fake2.json"
    path2.write_text(json.dumps(second))
    assert load_report().main([str(path), str(path2), "--out", str(tmp_path / "two"), "--quiet"]) == 0
    md = (tmp_path / "two" / "summary.md").read_text()
    assert "| conv 3x3 | 2.000 ms | torch.conv2d | 4.000 ms | 2.00x" in md


def test_fused_resnet_counts_the_same_convolution_products():
    """pyops.fuse folds each BN into its conv (a bias appears), so per output: the same products, one more add."""
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    plain, fused = pyops.count_ops(model, x), pyops.count_ops(pyops.fuse(model), x)
    plain_conv = [r for r in plain.by_layer if r.kind == "conv"]
    fused_conv = [r for r in fused.by_layer if r.kind == "conv"]
    assert len(plain_conv) == len(fused_conv) == 20
    assert sum(r.mults for r in fused_conv) == sum(r.mults for r in plain_conv)
    outputs = sum(math.prod(r.output_shape) for r in plain_conv)  # resnet18's convs have no bias of their own
    assert sum(r.adds for r in fused_conv) == sum(r.adds for r in plain_conv) + outputs
    assert fused.linear == plain.linear


def test_fused_1d_model_counts_the_same_convolution_products():
    """A fused Conv1d → BatchNorm1d (→ add) → ReLU is one conv1d_bias_act: the convolution's products as before, one
    more addition per output for the folded bias of a bias-free conv, the residual as an 'other' addition."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv1d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm1d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    model = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 5, padding=2), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                Block()).eval()
    x = torch.randn(2, 3, 50)
    plain, fused = pyops.count_ops(model, x), pyops.count_ops(pyops.fuse(model), x)
    plain_conv = [r for r in plain.by_layer if r.kind == "conv"]
    fused_conv = [r for r in fused.by_layer if r.kind == "conv"]
    assert len(plain_conv) == len(fused_conv) == 2
    assert [r.mults for r in fused_conv] == [r.mults for r in plain_conv]
    assert [r.adds for r in fused_conv] == [plain_conv[0].adds, plain_conv[1].adds + 2 * 8 * 50]
    assert fused.other == 2 * 8 * 50 and plain.other == 0  # the fused residual add (an ATen add is not counted)


def test_every_forward_op_has_a_counter():
    """A new pyops op without a counter would count as nothing in models that use it (a fused Conv1d chain did, for a
    while): every op but the backward ones and the fold (arithmetic on weights, not per input) has one."""
    from pyops import counting
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyops::")}
    uncounted = names - set(counting._COUNTERS)
    assert uncounted == {"pyops::conv1d_backward_input", "pyops::conv1d_backward_weight",
                         "pyops::conv1d_backward_weight_bias", "pyops::conv_act_backward", "pyops::conv_bn_fold",
                         "pyops::smooth_max_backward"}


def test_flop_counter_mode_sees_the_pyops_convolutions():
    x, w = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3)
    with FlopCounterMode(display=False) as ours:
        torch.ops.pyops.conv2d_bias_act(x, w, None, [1, 1], [1, 1], [1, 1], 1, 1, None)
        pyops.conv1d(x.flatten(2), torch.randn(5, 4, 3))
    with FlopCounterMode(display=False) as theirs:
        F.conv2d(x, w, None, 1, 1)
        F.conv1d(x.flatten(2), torch.randn(5, 4, 3))
    assert ours.get_total_flops() == theirs.get_total_flops() > 0


def test_sliding_head_counts_as_its_convolutions():
    net = pyops.reference.homework_net1(small=True)
    fcn = pyops.convolutionalize(net, (32, 32))
    x = torch.randn(1, 3, 36, 38)
    plain = pyops.count_ops(pyops.reference.homework_net2(net), x)
    ours = pyops.count_ops(fcn, x)
    assert ours.conv == plain.conv > 0 and ours.linear == plain.linear == 0


def test_sliding_classify_counts_the_scoring_not_its_probes():
    """The conversion's shape probes (a fake run on a 2^20-pixel input) and the slide check are no work of the
    model: neither count_ops nor FlopCounterMode sees them; one call of the converted network counts once."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5)).eval()
    image = torch.randn(1, 3, 20, 20)
    # the network on the 20x20 image: a 4x18x18 map of 27 products (+ bias), then the 14x14 head at 5x5 positions
    expected = 2 * (4 * 18 * 18 * 27 + 5 * 5 * 5 * 4 * 14 * 14)
    assert pyops.count_ops(lambda x: pyops.sliding_classify(net, x, 16), image).total == expected
    dense = pyops.nn.SlidingClassifier(net, 16)
    assert pyops.count_ops(dense, image).total == pyops.count_ops(dense, image).total == expected
    with FlopCounterMode(display=False) as counter:
        pyops.sliding_classify(net, image, 16)
    assert counter.get_total_flops() == expected


def test_counts_in_inference_mode_traced_models_and_in_place_matmuls():
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 3, stride=2), nn.Flatten(),
                             nn.Linear(2 * 13 * 13, 5)).eval(), torch.randn(2, 3, 8, 8)
    model, x = make()
    plain = pyops.count_ops(model, x)
    with torch.inference_mode():  # (the dispatch mode saw aten.conv2d / aten.linear there: everything was 0)
        assert pyops.count_ops(model, x) == plain
        # a model and input made as inference tensors: without autograd keys, composite ops (aten.conv2d) reached
        # the mode whole, in inference mode or out of it, and counted 0
        inference_model, inference_x = make()
    assert pyops.count_ops(inference_model, inference_x) == plain
    with torch.inference_mode():
        assert pyops.count_ops(inference_model, inference_x) == plain
    with pytest.warns(Warning):  # (torch.jit's deprecation)
        traced = torch.jit.trace(model, x)
    assert pyops.count_ops(traced, x).total == plain.total  # aten::_convolution
    with pytest.raises(TypeError, match="script"):
        pyops.count_ops(torch.jit.script(model), x)
    a, b, c = torch.randn(4, 5), torch.randn(5, 6), torch.randn(4, 6)
    assert pyops.count_ops(lambda c: c.addmm_(a, b), c).by_layer == pyops.count_ops(lambda c: c.addmm(a, b), c).by_layer
