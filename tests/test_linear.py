"""pyops.linear_bias_act (act(x @ W.T + b), behind pyops.nn.LinearBNReLU) against float64 references, on every
product (PYOPS_CONV_PATH: direct = our weight-streaming kernel, library = oneDNN's / MKL's, auto = the rule) and CPU
instruction set."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pyops
from pyops import reference
from pyops.nn import LinearBNReLU
from conftest import autocast_compute_dtype, gradgradcheck_like_torch, tolerances

ISAS = pyops._C.cpu_kernel_isas().split(",")
ACTIVATIONS = list(pyops.activations.ACTIVATIONS)


def randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.fixture(params=["direct", "library", "auto"])
def path(request, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV_PATH", request.param)
    return request.param


@pytest.fixture(params=ISAS)
def isa(request):
    before = pyops._C.cpu_kernel_isa()
    pyops._C.set_cpu_kernel_isa(request.param)
    yield request.param
    pyops._C.set_cpu_kernel_isa(before)


def assert_close_float32(out, ref, k):
    """A float32 result within float32 rounding of its float64 reference: sums of k products of values around 1."""
    rtol, atol = tolerances(torch.float32)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * max(1.0, math.sqrt(k)) * 10,
                               equal_nan=True)


# (leading dims, in_features, out_features): batches around our kernel's tiles (4 weight rows, 2 or 4 rows of x),
# reductions around its vectors (8 or 16 floats), 1-D and 3-D inputs, and products the auto rule gives the library
SHAPES = [((1,), 1, 1), ((1,), 17, 5), ((3,), 16, 4), ((4,), 100, 13), ((5,), 33, 9), ((8,), 7, 64), ((9,), 250, 3),
          ((2, 3), 40, 6), ((), 31, 7), ((0,), 12, 5), ((2,), 0, 3), ((16,), 1100, 1000), ((33,), 700, 760)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64_reference(path, isa, activation):
    """Every shape, with and without a bias, through each product; a NaN in x makes its row NaN and stays NaN
    through the activation (as torch.relu keeps it)."""
    for i, (lead, k, n) in enumerate(SHAPES):
        x, w, b = randn((*lead, k), i, 2.0), randn((n, k), 100 + i, 1 / math.sqrt(max(k, 1))), randn((n,), 200 + i)
        if x.numel() > 0:
            x.view(-1, k)[0, 0] = float("nan")
        for bias in (b, None):
            out = pyops.linear_bias_act(x.float(), w.float(), None if bias is None else bias.float(), activation)
            ref = reference.linear_bias_act(x.float().double(), w.float().double(),
                                            None if bias is None else bias.float().double(), activation)
            assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
            assert_close_float32(out, ref, k)
            if x.numel() > 0 and n > 0:
                assert out.reshape(-1, n)[0].isnan().all()


def test_strided_inputs_and_weights(path):
    """x as a column slice and as a transposed view, the weight as a transposed copy's transpose, the bias strided:
    the values of the contiguous call."""
    x, w, b = randn((6, 2 * 70), 1), randn((90, 70), 2, 0.1), randn((180,), 3)
    strided_x, strided_b = x[:, ::2].float(), b[::2].float()
    transposed_w = w.float().t().contiguous().t()
    want = pyops.linear_bias_act(strided_x.contiguous(), w.float(), strided_b.contiguous())
    for xi, wi in [(strided_x, w.float()), (x[:, ::2].float().t().contiguous().t(), transposed_w)]:
        assert torch.equal(pyops.linear_bias_act(xi, wi, strided_b), want)


def test_float64_and_half_precision_as_f_linear():
    """Dtypes other than float32 run ATen's linear, the activation after it."""
    x, w, b = randn((3, 20), 1), randn((6, 20), 2), randn((6,), 3)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        xi, wi, bi = x.to(dtype), w.to(dtype), b.to(dtype)
        torch.testing.assert_close(pyops.linear_bias_act(xi, wi, bi, "relu6"), F.relu6(F.linear(xi, wi, bi)),
                                   rtol=0, atol=0)


def test_deterministic_across_calls_and_threads():
    x, w, b = randn((5, 3000), 1).float(), randn((300, 3000), 2).float(), randn((300,), 3).float()
    first = pyops.linear_bias_act(x, w, b)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(pyops.linear_bias_act(x, w, b), first)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_float64_autograd(path, activation):
    """Gradients of x, weight and bias, float32 on every product vs float64 autograd of F.linear + activation, and
    float64 gradcheck / gradgradcheck (the backward's products are ATen's, differentiable again)."""
    x, w, b = randn((2, 3, 40), 1, 2.0), randn((9, 40), 2, 0.2), randn((9,), 3)
    g = randn((2, 3, 9), 4)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    got = torch.autograd.grad(pyops.linear_bias_act(*leaves, activation=activation), leaves, g.float())
    ref_leaves = [t.float().double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(reference.linear_bias_act(*ref_leaves, activation=activation), ref_leaves, g)
    for a, e in zip(got, want):
        assert_close_float32(a, e, 40)
    small = [randn(s, i).requires_grad_() for i, s in enumerate([(3, 5), (4, 5), (4,)])]
    fn = lambda x, w, b: pyops.linear_bias_act(x, w, b, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, small)
    gradgradcheck_like_torch(fn, small, activation)
    # only the gradients asked for: a bias-free call and a frozen weight
    x1 = x.float().requires_grad_()
    (gx,) = torch.autograd.grad(pyops.linear_bias_act(x1, w.float(), None, activation).sum(), [x1])
    assert gx.shape == x1.shape


def test_opcheck_compile_and_flops():
    x, w, b = randn((4, 12), 1).float(), randn((7, 12), 2).float(), randn((7,), 3).float()
    for args in [(x, w, b, 1), (x.requires_grad_(), w.requires_grad_(), None, 2), (x.detach()[None], w.detach(), b, 0)]:
        torch.library.opcheck(torch.ops.pyops.linear_bias_act.default, args)

    def step(x, w, b):
        return (pyops.linear_bias_act(x, w, b, "relu") ** 2).sum()

    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    got = torch.autograd.grad(torch.compile(step, fullgraph=True)(*leaves), leaves)
    want = torch.autograd.grad(step(*leaves), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with FlopCounterMode(display=False) as counter:
        pyops.linear_bias_act(x.detach(), w.detach(), b)
    assert counter.get_total_flops() == 2 * 4 * 7 * 12


def test_autocast_computes_as_the_fused_convolutions():
    x, w, b = randn((3, 32), 1).float(), randn((5, 32), 2).float(), randn((5,), 3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pyops.linear_bias_act(x, w, b)
    dtype = autocast_compute_dtype("cpu", torch.bfloat16)
    assert out.dtype == dtype
    want = F.relu(F.linear(x.to(dtype), w.to(dtype), b.to(dtype)))
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_bad_input_names_the_argument():
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    cases = [
        ((x, w[:, :7], b), ValueError, "'x' of shape \\(3, 8\\) must end in weight's 7 input features"),
        ((x, w[0], b), ValueError, "'weight' must be 2-D"),
        ((x, w, b[:4]), ValueError, "'bias' must have shape \\(5,\\)"),
        ((x, w.double(), b), TypeError, "'weight' has dtype"),
        ((x, w, b.double()), TypeError, "'bias' has dtype"),
        ((x.long(), w, b), TypeError, "'x' must be a floating-point"),
        ((torch.tensor(1.0), w, b), ValueError, "'x' of shape \\(\\)"),
        ((x, w.to("meta"), b), ValueError, "'weight' is on meta"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            pyops.linear_bias_act(*args)
    with pytest.raises(ValueError, match="'activation' must be one of"):
        pyops.linear_bias_act(x, w, b, "gelu")
    # the op's own checks (C++), for callers of torch.ops.pyops directly
    op = torch.ops.pyops.linear_bias_act.default
    for args, error, match in [((x, w[:, :7], b, 1), ValueError, "'weight'.*7 input features"),
                               ((x, w, b[:4], 1), ValueError, "'bias' must have shape"),
                               ((x, w, b, 9), ValueError, "'activation' must be 0"),
                               ((torch.tensor(1.0), w, b, 1), ValueError, "'input' must have at least 1")]:
        with pytest.raises(error, match=match):
            op(*args)


def test_linear_module_without_batchnorm_shares_parameters_and_takes_any_leading_dims():
    """LinearBNReLU.from_modules(linear, None, act): the Linear's own Parameters (a bias-free Linear gets a zero bias
    that trains nothing), any (*, in_features) input, outputs and gradients of F.linear + activation."""
    torch.manual_seed(0)
    for bias in (True, False):
        linear = nn.Linear(6, 4, bias=bias).double()
        fused = LinearBNReLU.from_modules(linear, None, "relu6")
        assert fused.weight is linear.weight and not fused.folds_batchnorm
        assert (fused.bias is linear.bias) if bias else not (fused.bias.requires_grad or fused.bias.any())
        x = randn((2, 3, 6), 5, 4.0)
        torch.testing.assert_close(fused(x), F.relu6(linear(x)), rtol=1e-12, atol=1e-12)
        (got,) = torch.autograd.grad(fused(x).sum(), [linear.weight])
        (want,) = torch.autograd.grad(F.relu6(linear(x)).sum(), [linear.weight])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    folded = LinearBNReLU.from_modules(nn.Linear(6, 4), nn.BatchNorm1d(4).eval())
    with pytest.raises(ValueError, match="3-D input"):
        folded(torch.randn(2, 3, 6))


@pytest.mark.parametrize("batch", [1, 16])
def test_one_by_one_maps_share_the_product(path, batch):
    """A 1×1 convolution on a 1×1 map (a squeeze-excitation layer) is this product under auto (ours at batch 1, the
    library's at batch 16 for this size), with conv2d_bias_act's bias, residual and activation; NCHW and
    channels_last inputs give the same values."""
    from pyops.conv_bn_relu import conv2d_bias_act
    x, w, b = randn((batch, 1100, 1, 1), 1), randn((1000, 1100, 1, 1), 2, 0.03), randn((1000,), 3)
    r = randn((batch, 1000, 1, 1), 4)
    ref = reference.conv2d_bias_act(x.float().double(), w.float().double(), b.float().double(), activation="relu6",
                                    residual=r.float().double())
    for xi in (x.float(), x.float().contiguous(memory_format=torch.channels_last)):
        out = conv2d_bias_act(xi, w.float(), b.float(), activation="relu6", residual=r.float())
        assert out.shape == ref.shape
        assert_close_float32(out, ref, 1100)
