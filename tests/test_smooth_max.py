import math

import pytest
import torch

import pyops
from pyops import reference
from conftest import tolerances


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def check_close(out, ref, dtype):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=rtol, atol=atol)


SHAPES_DIMS = [((7,), 0), ((5, 300), -1), ((5, 300), 0), ((3, 4, 1025), 1), ((2, 33, 6, 5), 1), ((4, 3, 2), 2),
               ((1, 9), 0), ((64, 3), -1)]


@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
@pytest.mark.parametrize("beta", [1.0, 0.3, 7.0, -2.0])
@pytest.mark.parametrize("keepdim", [False, True])
def test_matches_float64_reference(device, shape, dim, beta, keepdim):
    for dtype in (torch.float32, torch.float64):
        x = rand(shape, dtype, device, seed=hash((shape, dim)) % 1000)
        out = pyops.smooth_max(x, beta, dim, keepdim)
        ref = reference.smooth_max(x.double().cpu(), beta, dim, keepdim)
        assert out.shape == ref.shape and out.dtype == dtype and out.device == x.device
        check_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_accumulates_in_fp32(device, dtype):
    x = rand((6, 2000), dtype, device)
    for dim in (0, 1):
        out = pyops.smooth_max(x, 2.0, dim)
        assert out.dtype == dtype
        check_close(out, reference.smooth_max(x.double().cpu(), 2.0, dim), dtype)


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0, 1000.0])
def test_bounds(device, beta):
    x = rand((50, 513), torch.float32, device, seed=3)
    nu = pyops.smooth_max(x, beta, -1)
    mx = x.amax(-1)
    assert (nu >= mx).all(), "smooth max fell below the max"
    upper = mx.double() + math.log(x.shape[-1]) / beta
    assert (nu.double() <= upper * (1 + 1e-6) + 1e-6).all()


def test_infinite_beta_is_max_and_min_exactly(device):
    x = rand((8, 1000), torch.float32, device, seed=5)
    for dim in (0, 1):
        assert torch.equal(pyops.smooth_max(x, math.inf, dim), x.amax(dim))
        assert torch.equal(pyops.smooth_max(x, -math.inf, dim), x.amin(dim))


def test_large_beta_tends_to_max(device):
    x = rand((4, 100), torch.float64, device, seed=7)
    errs = [(pyops.smooth_max(x, b, -1) - x.amax(-1)).abs().max().item() for b in (1.0, 10.0, 100.0, 1e4)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < math.log(100) / 1e4 + 1e-12


def test_negative_beta_is_smooth_min(device):
    x = rand((10, 77), torch.float64, device, seed=8)
    torch.testing.assert_close(pyops.smooth_max(x, -3.0, 1), -pyops.smooth_max(-x, 3.0, 1), rtol=1e-12, atol=1e-12)
    assert (pyops.smooth_max(x, -3.0, 1) <= x.amin(1)).all()


def test_stable_for_large_magnitudes(device):
    # exp(10 * 1e4) overflows any float: the one-pass online form never forms it.
    x = (rand((3, 1000), torch.float32, device, seed=9, scale=1.0) + 1e4)
    out = pyops.smooth_max(x, 10.0, -1)
    assert torch.isfinite(out).all()
    ref = x.double().amax(-1) + torch.log(torch.exp(10 * (x.double() - x.double().amax(-1, keepdim=True))).sum(-1)) / 10
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    assert torch.isfinite(pyops.smooth_max(-x, 10.0, 0)).all()


def test_special_values(device):
    inf, nan = math.inf, math.nan
    x = torch.tensor([[1.0, inf, 2.0], [-inf, -inf, -inf], [1.0, nan, 3.0], [inf, inf, 0.0], [-inf, 0.0, 1.0]],
                     device=device)
    out = pyops.smooth_max(x, 1.0, -1).cpu()
    assert out[0] == inf and out[1] == -inf and math.isnan(out[2]) and out[3] == inf
    torch.testing.assert_close(out[4], torch.logsumexp(torch.tensor([-inf, 0.0, 1.0]), 0))
    ref = torch.logsumexp(x.cpu(), -1)
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("beta", [1.0, 4.0, -2.5])
@pytest.mark.parametrize("shape,dim", [((5, 37), -1), ((5, 37), 0), ((3, 6, 5), 1)])
def test_gradient_is_softmax(device, beta, shape, dim):
    x = rand(shape, torch.float64, device, seed=11).requires_grad_()
    g = torch.randn(pyops.smooth_max(x, beta, dim).shape, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad(pyops.smooth_max(x, beta, dim), x, g)
    expected = torch.softmax(beta * x.detach(), dim) * g.unsqueeze(dim)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_gradient_at_infinite_beta_is_one_hot_with_ties_shared(device):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 4.0]], device=device, requires_grad=True)
    pyops.smooth_max(x, math.inf, 1).sum().backward()
    assert torch.equal(x.grad.cpu(), torch.tensor([[0, 0.5, 0.5, 0], [0, 0, 1.0, 0]]))
    x.grad = None
    pyops.smooth_max(x, -math.inf, 0).sum().backward()
    assert torch.equal(x.grad.cpu(), torch.tensor([[0.0, 0, 1, 1], [1, 1, 0, 0]]))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradcheck_and_gradgradcheck(device, dim):
    x = rand((4, 5, 6), torch.float64, device, seed=12).requires_grad_()
    f = lambda t: pyops.smooth_max(t, 1.7, dim)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_gradgradcheck_keepdim_scalar_and_infinite_beta(device):
    """The double backward's other branches: keepdim, a 0-d input, beta = +-inf (only grad_output has a gradient)."""
    x = rand((3, 5), torch.float64, device, seed=15).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: pyops.smooth_max(t, -0.8, 1, keepdim=True), (x,))
    s = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: pyops.smooth_max(t, 2.0, 0), (s,))
    for beta in (math.inf, -math.inf):
        assert torch.autograd.gradgradcheck(lambda t: pyops.smooth_max(t, beta, 0), (x,))


def test_opcheck(device):
    for args in [(rand((4, 9), device=device).requires_grad_(), 2.0, 1, False),
                 (rand((4, 9, 3), device=device).requires_grad_(), -1.0, 1, True),
                 (rand((6,), torch.float64, device).requires_grad_(), 0.5, 0, False)]:
        torch.library.opcheck(torch.ops.pyops.smooth_max.default, args)
    x = rand((4, 9), device=device)
    r = pyops.smooth_max(x, 2.0, 1)
    torch.library.opcheck(torch.ops.pyops.smooth_max_backward.default, (torch.ones_like(r), x, r, 2.0, 1, False))


def test_torch_compile_fullgraph(device):
    def f(x):
        return pyops.smooth_max(x * 2, 3.0, 1).sum()

    x = rand((8, 40), device=device, seed=13).requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    (g_ref,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(g, g_ref)


def test_torch_compile_with_a_changing_beta(device):
    """The second call passes beta as a symbolic float: the argument checks trace as guards, no graph break."""
    compiled = torch.compile(lambda x, b: pyops.smooth_max(x, b, 1), fullgraph=True)
    x = rand((4, 5), device=device, seed=16)
    for beta in (1.5, 2.0, -3.0):
        torch.testing.assert_close(compiled(x, beta), pyops.smooth_max(x, beta, 1))


def test_long_strided_reduction_keeps_fp32_accuracy(device):
    """A reduction over a non-last dim of 2M rows: its running sum is compensated (a plain fp32 sum drifted by
    ~1e-3 relative at 16M rows, 10x torch.logsumexp's error at 1e5)."""
    x = torch.rand((2_000_000, 2), generator=gen(17), dtype=torch.float32).to(device)
    expected = torch.logsumexp(x.double(), 0)
    for got in (pyops.smooth_max(x, 1.0, 0), pyops.smooth_max(x.T.contiguous(), 1.0, 1)):
        torch.testing.assert_close(got.double(), expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_is_softmax(device, dtype):
    """The result rounded to a half type scales exp(β(x − r)) by one factor per output (bfloat16 [100, 100] gave
    0.605 each); the gradient is normalized by its sum."""
    x = torch.tensor([[100.0, 100.0], [3.0, 1.0]], dtype=dtype, device=device, requires_grad=True)
    (grad,) = torch.autograd.grad(pyops.smooth_max(x, 1.0, 1).sum(), x)
    expected = torch.softmax(x.detach().double(), 1)
    torch.testing.assert_close(grad.double(), expected, rtol=2 ** -7, atol=2 ** -9)
    rows = rand((64, 50), dtype, device, seed=18, scale=20.0).requires_grad_()
    (grad,) = torch.autograd.grad(pyops.smooth_max(rows, 1.0, 1).sum(), rows)
    torch.testing.assert_close(grad.double().sum(1), torch.ones(64, dtype=torch.float64, device=device),
                               rtol=0, atol=2 ** -6)


@pytest.mark.parametrize("dim", [0, -1])
def test_rows_of_infinities_at_a_tiny_beta(device, dim):
    """A row of -inf alone is -inf (+inf for β < 0 on a row of +inf) even where log(n)/|β| overflows: -inf + inf
    gave NaN (torch.logsumexp(β·x)/β gives -inf)."""
    inf = float("inf")
    for dtype, beta in [(torch.float32, 2e-38), (torch.float64, 1e-308)]:
        rows = torch.full((3, 100000), -inf, dtype=dtype, device=device)
        rows = rows if dim == -1 else rows.T.contiguous()
        assert (pyops.smooth_max(rows, beta, dim=dim) == -inf).all()
        assert (pyops.smooth_max(-rows, -beta, dim=dim) == inf).all()
    assert pyops.lse_pool2d(torch.full((1, 1, 400, 400), -inf, device=device), 2e-38).item() == -inf


def test_nan_at_infinite_beta_has_a_nan_gradient(device):
    x = torch.tensor([1.0, float("nan"), 2.0], device=device, requires_grad=True)
    for beta in (math.inf, -math.inf):
        (grad,) = torch.autograd.grad(pyops.smooth_max(x, beta, 0), x)
        assert grad.isnan().all()


def test_non_contiguous_input(device):
    base = rand((40, 30), device=device, seed=14)
    for x in (base.t(), base[::3, 1::2], base.unsqueeze(0).expand(3, 40, 30)):
        assert not x.is_contiguous()
        for dim in range(x.dim()):
            check_close(pyops.smooth_max(x, 1.5, dim), reference.smooth_max(x.double(), 1.5, dim), torch.float32)


def test_empty_batch_and_scalar(device):
    x = torch.empty(0, 5, device=device)
    assert pyops.smooth_max(x, 1.0, 1).shape == (0,)
    s = torch.tensor(2.5, device=device)
    assert pyops.smooth_max(s, 3.0, 0).item() == 2.5


def test_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="beta"):
        pyops.smooth_max(x, 0.0)
    with pytest.raises(ValueError, match="beta"):
        pyops.smooth_max(x, math.nan)
    with pytest.raises(IndexError, match="dim"):
        pyops.smooth_max(x, 1.0, dim=2)
    with pytest.raises(TypeError, match="floating"):
        pyops.smooth_max(torch.arange(5), 1.0)
    with pytest.raises(ValueError, match="size 0"):
        pyops.smooth_max(torch.empty(3, 0), 1.0, 1)
    # The raw op checks too, for callers that bypass the Python wrapper.
    with pytest.raises(ValueError, match="beta"):
        torch.ops.pyops.smooth_max(x, 0.0, 0, False)
    with pytest.raises(IndexError, match="dim"):
        torch.ops.pyops.smooth_max(x, 1.0, 5, False)
    with pytest.raises(TypeError, match="floating"):
        torch.ops.pyops.smooth_max(torch.arange(5), 1.0, 0, False)


def test_raw_backward_checks_grad_and_result():
    """grad and result were reshaped unchecked: a transposed grad of the right size was taken silently, a meta one
    reached the fake kernel (an uninitialized CPU result), other dtypes and sizes failed naming no argument."""
    x = torch.randn(3, 5, 7)
    r = torch.ops.pyops.smooth_max(x, 2.0, 1, False)
    backward = torch.ops.pyops.smooth_max_backward
    for grad, result, exc, match in [(torch.randn(7, 3), r, ValueError, "'grad' must have the forward's output shape"),
                                     (torch.randn(18), r, ValueError, "'grad' must have"),
                                     (torch.randn(3, 7), r.unsqueeze(1), ValueError, "'result' must have"),
                                     (torch.randn(3, 7).double(), r, TypeError, "'grad' has dtype"),
                                     (torch.randn(3, 7, device="meta"), r, ValueError, "'grad' is on meta")]:
        with pytest.raises(exc, match=match):
            backward(grad, x, result, 2.0, 1, False)
    g = torch.randn(3, 7)
    torch.testing.assert_close(backward(g.unsqueeze(1), x, r.unsqueeze(1), 2.0, 1, True), backward(g, x, r, 2.0, 1, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_beta_below_float_range_computes_in_float64(device, dtype):
    """A β below float32's normal numbers rounded to 0 in the kernels' float: 0·inf made NaN. It computes in float64:
    one element gives itself, more give log(n)/β, beyond float32's range (±inf)."""
    one = torch.tensor([3.0], device=device, dtype=dtype)
    for beta in (1e-50, -1e-300):
        assert pyops.smooth_max(one, beta).item() == 3.0
        assert pyops.smooth_max(one[0], beta).item() == 3.0  # 0-d
        assert pyops.smooth_max(torch.tensor([3.0, 1.0], device=device, dtype=dtype), beta).item() == \
            math.copysign(math.inf, beta)
    x = torch.tensor([3.0], device=device, dtype=dtype, requires_grad=True)
    pyops.smooth_max(x, 1e-50).backward()
    assert x.grad.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_beta_beyond_float_range_has_the_one_hot_gradient(device, dtype):
    """β from 1e39 to 1e308 is inf in the kernels' float: inf·0 made the gradient at the max NaN. Such a β is ±inf
    there (the result equals the max to float's rounding); smooth_max and lse_pool2d."""
    for beta, hot in ((1e39, 1), (1e300, 1), (-1e300, 0)):
        x = torch.tensor([1.0, 3.0, 2.0], device=device, dtype=dtype, requires_grad=True)
        y = pyops.smooth_max(x, beta)
        y.backward()
        assert y.item() == (3.0 if beta > 0 else 1.0)
        assert x.grad.tolist() == [1.0 if i == hot else 0.0 for i in range(3)]
    s = torch.tensor([[[[1.0, 3.0], [2.0, 0.0]]]], device=device, requires_grad=True)
    pyops.lse_pool2d(s, 1e300).sum().backward()
    assert s.grad.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]


def test_composite_under_torch_func_does_not_overflow(device):
    """torch.func transforms run the ATen composite, which took logsumexp(β·x)/β: β·x overflowed float32 where the
    result does not (β = 1e30, x = 1e10: inf and a NaN gradient). It shifts by the max, as the kernels do."""
    x = torch.tensor([1e10, 0.0, 5.0], device=device)
    f = lambda t: pyops.smooth_max(t, 1e30)  # noqa: E731
    primal, tangent = torch.func.jvp(f, (x,), (torch.tensor([1.0, 0.0, 0.0], device=device),))
    assert primal.item() == 1e10 and tangent.item() == 1.0
    assert torch.func.grad(f)(x).tolist() == [1.0, 0.0, 0.0]
    # ordinary β: the composite matches the kernels
    y = torch.randn(4, 7, device=device, dtype=torch.float64)
    torch.testing.assert_close(torch.func.grad(lambda t: pyops.smooth_max(t, 2.5).sum())(y),
                               torch.softmax(2.5 * y, -1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_of_a_row_holding_inf(device, dtype):
    """The half-precision renormalization divided by the row's NaN sum: every gradient of the row became NaN where
    float32 and torch.logsumexp give NaN at the inf only."""
    x = torch.tensor([math.inf, 1.0, 2.0], device=device, dtype=dtype, requires_grad=True)
    pyops.smooth_max(x, 1.0).backward()
    assert math.isnan(x.grad[0].item()) and x.grad[1:].tolist() == [0.0, 0.0]


def test_numpy_scalars_are_numbers():
    """beta (smooth_max, lse_pool2d) and eps (conv2d_bn_relu) took Python numbers only: numpy scalars were refused
    as "not a number"."""
    import numpy as np
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for beta in (np.float32(2.0), np.float64(2.0), np.int64(2)):
        torch.testing.assert_close(pyops.smooth_max(x, beta), pyops.smooth_max(x, 2.0))
        torch.testing.assert_close(pyops.lse_pool2d(x, beta), pyops.lse_pool2d(x, 2.0))
    w, mean, var = torch.randn(4, 3, 1, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), \
        torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(pyops.conv2d_bn_relu(x, w, None, None, None, mean, var, np.float32(1e-3)),
                               pyops.conv2d_bn_relu(x, w, None, None, None, mean, var, float(np.float32(1e-3))))


def test_composite_with_negative_beta_does_not_overflow():
    """The torch.func composite shifted by the max for every β: for β < 0, β·(x − max) overflowed (value −inf,
    a NaN gradient) where the kernels give the min. It shifts by the min there."""
    x = torch.tensor([2.0, -2.0])
    grad, value = torch.func.grad_and_value(lambda t: pyops.smooth_max(t, -1e38))(x)
    assert value.item() == -2.0 and grad.tolist() == [0.0, 1.0]
    y = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(torch.func.grad(lambda t: pyops.smooth_max(t, -1.5).sum())(y),
                               torch.softmax(-1.5 * y, -1))
