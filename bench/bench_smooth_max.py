"""smooth_max vs the expression a user would write, torch.logsumexp(beta * x, dim) / beta, on (4096, 4096) fp32."""
import pytest
import torch

import pyops

BETA = 3.0
SHAPE = (4096, 4096)


def torch_smooth_max(x, dim):
    return torch.logsumexp(BETA * x, dim) / BETA


IMPLS = {"pyops": lambda x, dim: pyops.smooth_max(x, BETA, dim), "torch.logsumexp": torch_smooth_max}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dim", [-1, 0])
def bench_forward(measure, device, impl, dim):
    x = torch.randn(SHAPE, device=device)
    f = IMPLS[impl]
    with torch.no_grad():
        measure(f"smooth_max fwd {SHAPE[0]}x{SHAPE[1]} fp32 dim={dim}", impl, lambda: f(x, dim),
                bytes=x.numel() * 4 + SHAPE[0] * 4)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dim", [-1, 0])
def bench_forward_backward(measure, device, impl, dim):
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    f = IMPLS[impl]
    grad = torch.randn(SHAPE[0], device=device)

    def step():
        (g,) = torch.autograd.grad(f(x, dim), x, grad)
        return g

    # fewest bytes: read x in the forward, read x and write grad_x in the backward
    measure(f"smooth_max fwd+bwd {SHAPE[0]}x{SHAPE[1]} fp32 dim={dim}", impl, step, bytes=3 * x.numel() * 4)
