"""Problem 4: backpropagation through a deep 1-D convolutional network, done by pyops' conv1d kernels."""
import torch
import torch.nn.functional as F

import pyops
from pyops import reference
from pyops.demo._timing import check, compare

TITLE = "Problem 4 - conv1d: closed-form gradients of a conv net vs pyops' own backward kernels"


def checks():
    g = torch.Generator().manual_seed(0)
    kernel_sizes, paddings, length = [9, 5, 3, 3], [4, 2, 0, 1], 64
    filters = [torch.randn(k, generator=g, dtype=torch.float64) for k in kernel_sizes]
    biases = [torch.randn((), generator=g, dtype=torch.float64) for _ in kernel_sizes]
    x = torch.randn(length, generator=g, dtype=torch.float64)
    ws = [f.view(1, 1, -1).clone().requires_grad_() for f in filters]
    bs = [b.view(1).clone().requires_grad_() for b in biases]
    xt = x.view(1, 1, -1).clone().requires_grad_()
    y = xt
    for l, (w, b, p) in enumerate(zip(ws, bs, paddings)):
        y = pyops.conv1d(y, w, b, padding=p)
        y = torch.sigmoid(y) if l < len(ws) - 1 else y
    u = torch.randn(y.shape[-1], generator=g, dtype=torch.float64)
    (y.view(-1) * u).sum().backward()
    grad_w, grad_b, grad_x = reference.conv_net_gradients(x, filters, biases, paddings, u)
    err_w = max((w.grad.view(-1) - gw).abs().max().item() for w, gw in zip(ws, grad_w))
    err_b = max((b.grad.view(()) - gb).abs().item() for b, gb in zip(bs, grad_b))
    err_x = (xt.grad.view(-1) - grad_x).abs().max().item()
    ok = check("4 layers, sigmoid between: max |dL/dw_l (pyops) - closed form (Toeplitz A_w, float64)|", err_w,
               err_w < 1e-10)
    ok &= check("max |dL/db_l (pyops) - sum(v_l)|", err_b, err_b < 1e-10)
    ok &= check("max |dL/dx (pyops transposed conv) - v_1 A_{w_1}|", err_x, err_x < 1e-10)
    xs = torch.randn(4, 16, 101, generator=g, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(16, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(pyops.conv1d(xs, wd, stride=2, padding=3, dilation=2, groups=4).sum(), (xs, wd))
    ref = torch.autograd.grad(F.conv1d(xs, wd, stride=2, padding=3, dilation=2, groups=4).sum(), (xs, wd))
    err = max((a - c).abs().max().item() for a, c in zip(ours, ref))
    ok &= check("stride 2, dilation 2, groups 4: max |grad - F.conv1d autograd| (float64)", err, err < 1e-10)
    return ok


def timings():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [("dw causal N=2 C=512 L=1024 k=4", (2, 512, 512, 1024, 4, 3, 512)),
             ("1 channel N=64 L=4096 k=9", (64, 1, 1, 4096, 9, 4, 1))]
    for label, (n, cin, cout, length, k, padding, groups) in cases:
        x = torch.randn(n, cin, length, device=device, requires_grad=True)
        w = torch.randn(cout, cin // groups, k, device=device, requires_grad=True)
        b = torch.randn(cout, device=device, requires_grad=True)
        gy = torch.randn(n, cout, length + 2 * padding - k + 1, device=device)

        def step(f):
            return lambda: torch.autograd.grad(f(x, w, b, 1, padding, 1, groups), (x, w, b), gy)

        compare(f"conv1d fwd+bwd {label} fp32", step(pyops.conv1d), step(F.conv1d), "F.conv1d", repeat=5)
