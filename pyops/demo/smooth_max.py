"""Problem 1: the smooth max ν_β(x) = (1/β)·log Σ exp(β·x)."""
import math

import torch

import pyops
from pyops.demo._timing import check, compare

TITLE = "Problem 1 - smooth max: bounds, the beta -> inf limit, gradient = softmax"


def checks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 257, generator=g, dtype=torch.float64) * 3
    n = x.shape[1]
    ok = True
    for beta in (0.5, 1.0, 10.0):
        nu, mx = pyops.smooth_max(x, beta), x.amax(-1)
        slack = (mx + math.log(n) / beta - nu).min().item()
        ok &= check(f"beta={beta:<4}: max <= nu <= max + log(n)/beta over 1000 rows; min(nu - max), min slack",
                    ((nu - mx).min().item(), slack), (nu >= mx).all() and slack >= -1e-12, "{0[0]:.3g}, {0[1]:.3g}")
    gaps = [(pyops.smooth_max(x, b) - x.amax(-1)).max().item() for b in (1, 10, 100, 1000)]
    ok &= check("beta = 1, 10, 100, 1000: max(nu - max) shrinks like log(n)/beta", gaps,
                gaps == sorted(gaps, reverse=True) and gaps[-1] <= math.log(n) / 1000, "{}")
    ok &= check("beta = inf equals max exactly (max |nu - max|)",
                (pyops.smooth_max(x, math.inf) - x.amax(-1)).abs().max().item(),
                torch.equal(pyops.smooth_max(x, math.inf), x.amax(-1)))
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(pyops.smooth_max(xr, 2.0).sum(), xr)
    err = (grad - torch.softmax(2.0 * x, -1)).abs().max().item()
    ok &= check("gradient = softmax(beta x), beta=2 (max abs error, float64)", err, err < 1e-12)
    xi = torch.tensor([[1.0, 3.0, 3.0, 2.0]], requires_grad=True)
    pyops.smooth_max(xi, math.inf).sum().backward()
    ok &= check("beta = inf gradient is one-hot, ties shared", xi.grad.tolist(), xi.grad.tolist() == [[0, .5, .5, 0]],
                "{}")
    big = torch.randn(4, 1000, generator=g) + 1e4
    ok &= check("no overflow at x ~ 1e4, beta = 10 (nu - max)", (pyops.smooth_max(big, 10.0) - big.amax(-1)).max().item(),
                torch.isfinite(pyops.smooth_max(big, 10.0)).all())
    return ok


def timings():
    x = torch.randn(4096, 4096, device="cuda" if torch.cuda.is_available() else "cpu")
    for dim in (-1, 0):
        compare(f"smooth_max 4096x4096 fp32 dim={dim}", lambda: pyops.smooth_max(x, 3.0, dim),
                lambda: torch.logsumexp(3.0 * x, dim) / 3.0, "logsumexp(3x)/3", repeat=5)
