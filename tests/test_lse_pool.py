"""lse_pool2d: (1/β)·log(mean exp(β·s)) over H×W, against a 40-digit decimal reference; limits and gradients."""
import decimal
import math

import pytest
import torch

import pyops
from conftest import tolerances


def rand(shape, dtype=torch.float64, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def lse_pool2d_exact(s, beta, digits=40):
    """The pooled values in 40-digit decimal arithmetic, rounded to float64: float64's own logsumexp form loses
    ~eps/|β| to cancellation, more than float64's tolerance at the tiny β tested here."""
    decimal.getcontext().prec = digits
    b = decimal.Decimal(beta)
    rows = s.double().cpu().flatten(2).flatten(0, 1).tolist()
    out = [float((sum((b * decimal.Decimal(v)).exp() for v in row) / len(row)).ln() / b) for row in rows]
    return torch.tensor(out, dtype=torch.float64).view(s.shape[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [1e-6, 1e-3, -1e-4, 0.05, 0.5, 1.0, 4.0, -2.0, 300.0])  # tiny |β|: near the mean
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 10, 1, 1), (4, 2, 33, 17)])
def test_matches_reference(device, dtype, beta, shape):
    s = rand(shape, dtype, device, seed=sum(shape))
    out = pyops.lse_pool2d(s, beta)
    ref = lse_pool2d_exact(s, beta)
    assert out.shape == shape[:2] and out.dtype == dtype
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=rtol, atol=atol)


def test_limits(device):
    s = rand((3, 4, 6, 5), device=device, seed=1)
    mx, mean = s.flatten(2).amax(-1), s.flatten(2).mean(-1)
    assert torch.equal(pyops.lse_pool2d(s, math.inf), mx)
    assert torch.equal(pyops.lse_pool2d(s, -math.inf), s.flatten(2).amin(-1))
    assert torch.equal(pyops.lse_pool2d(s, 0.0), mean)
    # between mean and max, monotone in β, and converging to both ends
    prev = mean
    for beta in (1e-3, 0.1, 1.0, 10.0, 100.0):
        cur = pyops.lse_pool2d(s, beta)
        assert (cur >= prev - 1e-12).all() and (cur <= mx + 1e-12).all()
        prev = cur
    assert (pyops.lse_pool2d(s, 1e4) - mx).abs().max() < math.log(30) / 1e4 + 1e-12
    assert (pyops.lse_pool2d(s, 1e-6) - mean).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("beta", [1e-46, -1e-40, 1e-320])
def test_tiny_beta_below_the_dtypes_normal_numbers(device, dtype, beta):
    """β that rounds to 0 (or to a subnormal) in the scores' dtype: the β → 0 limit, the mean, to the dtype's
    rounding, with finite gradients 1/n (float32 at β = 1e-46 gave NaN)."""
    s = rand((2, 3, 4, 5), device=device, seed=2).to(dtype).requires_grad_()
    got = pyops.lse_pool2d(s, beta)
    expected = s.detach().double().flatten(2).mean(-1)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)
    (grad,) = torch.autograd.grad(got.sum(), s)
    torch.testing.assert_close(grad.double(), torch.full(s.shape, 1 / 20, dtype=torch.float64, device=device),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", [1e-30, -1e-25, 1e-20, 3e-5])
def test_tiny_beta_times_tiny_scores_is_the_mean(device, beta):
    """β·(s − max) below float32's normal numbers, β itself normal: expm1 gave 0 and the max came back for the mean
    (scores ~1e-20 at β = 1e-30: 3e-20 for 1.5e-20). Checked against the 40-digit reference, to eps·spread."""
    s = torch.tensor([0.0, 1e-20, 2e-20, 3e-20], device=device).view(1, 1, 2, 2)
    spread = 3e-20
    for scores in (s, s * 1e20):  # tiny scores, and ordinary ones (the same β then far from the normal limit)
        got = pyops.lse_pool2d(scores, beta).double().cpu()
        want = lse_pool2d_exact(scores.double().cpu(), beta, digits=100)
        assert (got - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * spread * scores.abs().max() / 3e-20


def test_layouts(device):
    s = rand((2, 3, 6, 5), device=device, seed=2)
    ref = pyops.lse_pool2d(s, 1.5)
    torch.testing.assert_close(pyops.lse_pool2d(s.to(memory_format=torch.channels_last), 1.5), ref)
    torch.testing.assert_close(pyops.lse_pool2d(s.transpose(2, 3), 1.5), ref)
    assert pyops.lse_pool2d(s[:0], 1.5).shape == (0, 3)


@pytest.mark.parametrize("beta", [1.5, -0.7, 0.0, math.inf, 1e-3, 0.1])  # 1e-3, 0.1: the near-mean form
def test_gradcheck(device, beta):
    s = rand((2, 3, 4, 3), device=device, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pyops.lse_pool2d(t, beta), (s,))


def test_gradient_is_softmax_over_positions():
    s = rand((2, 3, 4, 5), seed=4).requires_grad_()
    (g,) = torch.autograd.grad(pyops.lse_pool2d(s, 2.0).sum(), s)
    torch.testing.assert_close(g, torch.softmax(2.0 * s.detach().flatten(2), -1).view_as(s), rtol=1e-12, atol=1e-14)


def test_infinite_scores_keep_the_other_gradients_finite():
    """A row holding a ±inf score: the near-mean form is not taken there, and its gradient (0 by torch.where) is
    not 0·inf = NaN; only the infinite entry's own gradient may be NaN, as in torch's formula."""
    s = torch.tensor([1.0, -math.inf, 2.0, 3.0], dtype=torch.float64).view(1, 1, 2, 2).requires_grad_()
    for beta in (-1.0, 2.0):
        (g,) = torch.autograd.grad(pyops.lse_pool2d(s, beta).sum(), s)
        t = s.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad((torch.logsumexp(beta * t.flatten(2), -1) / beta).sum(), t)
        finite = s.detach().isfinite()
        torch.testing.assert_close(g[finite], expected[finite], rtol=1e-12, atol=1e-14)


def test_half_precision_rounds_once():
    """bfloat16 scores are pooled in float32 and rounded once (rounding the smooth max first lost ~11 ulps)."""
    s = torch.rand((1, 1, 128, 128), generator=torch.Generator().manual_seed(0)).bfloat16()
    got = pyops.lse_pool2d(s, 1.01)
    expected = lse_pool2d_exact(s.double(), 1.01)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected.to(torch.bfloat16).double(), rtol=0, atol=2 ** -8)


def test_torch_compile_fullgraph():
    s = rand((2, 3, 4, 5), torch.float32, seed=5)
    f = torch.compile(lambda t: pyops.lse_pool2d(t, 3.0), fullgraph=True)
    torch.testing.assert_close(f(s), pyops.lse_pool2d(s, 3.0))


def test_bad_inputs():
    with pytest.raises(ValueError, match="scores"):
        pyops.lse_pool2d(torch.randn(3, 4, 5), 1.0)
    with pytest.raises(TypeError, match="scores"):
        pyops.lse_pool2d(torch.ones(1, 2, 3, 3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="beta"):
        pyops.lse_pool2d(torch.randn(1, 2, 3, 3), math.nan)
    with pytest.raises(TypeError, match="beta"):
        pyops.lse_pool2d(torch.randn(1, 2, 3, 3), "2")
    with pytest.raises(ValueError, match="empty"):
        pyops.lse_pool2d(torch.randn(1, 2, 0, 3), 1.0)


def test_export_with_dynamic_map_size():
    """log(n) for n = H·W is a tensor op: an exported program with dynamic H and W runs on other map sizes (math.log
    pinned n to the example's, and the program failed on any other)."""
    class Pool(torch.nn.Module):
        def forward(self, s):
            return pyops.lse_pool2d(s, 1.5)

    dims = {0: torch.export.Dim("b", max=64), 2: torch.export.Dim("h", max=64), 3: torch.export.Dim("w", max=64)}
    program = torch.export.export(Pool(), (rand((2, 3, 5, 7), seed=4),), dynamic_shapes=(dims,))
    for shape in ((2, 3, 9, 4), (1, 3, 2, 2)):
        s = rand(shape, seed=5)
        torch.testing.assert_close(program.module()(s), pyops.lse_pool2d(s, 1.5), rtol=0, atol=0)


def test_autocast_region_gives_float32_at_every_beta():
    s = rand((1, 2, 3, 3), seed=6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {pyops.lse_pool2d(s, beta).dtype for beta in (0.0, 1e-320, 1.0, math.inf)} == {torch.float32}
