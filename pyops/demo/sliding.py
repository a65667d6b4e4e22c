"""Problem 5: a crop classifier applied densely (convolutionalize / sliding_classify / lse_pool2d)."""
import math

import torch
from torch import nn

import pyops
from pyops import reference
from pyops.demo._timing import check, compare

TITLE = "Problem 5 - sliding classifier: Net1 -> fully convolutional Net2, one pass instead of every crop"


def _mse(a, b):
    return (a.double() - b.double()).pow(2).mean().item()


def _pool_net():
    """A 24x24 crop classifier with two MaxPool2d(2) (total stride 4) and a BatchNorm2d."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(),
                        nn.Linear(16, 5))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.double().eval()


def checks():
    ok = True
    g = torch.Generator().manual_seed(0)
    # The scaled-down Net1 (channels 8-12-16-16-16, 64 hidden: the full one's 1.36 GB first Linear takes longer to
    # build and loop over than this demo's budget); the bench runs the full size.
    net1 = reference.homework_net1(small=True, dtype=torch.float64)
    x = torch.randn(1, 3, 36, 38, generator=g, dtype=torch.float64)
    fcn = pyops.convolutionalize(net1, 32)
    ok &= check("convolutionalize(Net1): nn.Linear layers left", sum(isinstance(m, nn.Linear) for m in fcn.modules()),
                not any(isinstance(m, nn.Linear) for m in fcn.modules()), "{}")
    scores, loop = pyops.sliding_classify(net1, x, 32), reference.crop_loop(net1, x, 32)
    err = _mse(scores, loop)
    ok &= check(f"36x38 image -> {tuple(scores.shape[2:])} map; MSE vs the 35-crop loop (float64)", err,
                scores.shape[2:] == (5, 7) and err < 1e-12)
    pool = _pool_net()
    xp = torch.randn(1, 3, 37, 41, generator=g, dtype=torch.float64)
    errs = [(pyops.sliding_classify(pool, xp, 24, s) - reference.crop_loop(pool, xp, 24, s)).abs().max().item()
            for s in (1, 2, 3, 4)]
    ok &= check("two MaxPool2d(2) (total stride 4), crop strides 1..4: max |FCN - crop loop| (shift-and-stitch)",
                max(errs), max(errs) < 1e-10)
    big = torch.randn(1, 3, 96, 96, generator=g, dtype=torch.float64)
    diff = (pyops.sliding_classify(fcn, big, 32, max_memory=2 << 20) - pyops.sliding_classify(fcn, big, 32))
    diff = diff.abs().max().item()
    ok &= check("96x96 image tiled under a 2 MiB memory bound vs untiled: max |difference|", diff, diff <= 1e-12)
    s = torch.randn(2, 10, 5, 7, generator=g, dtype=torch.float64)  # a score map with an O(1) spread
    lse = [(pyops.lse_pool2d(s, b) - s.flatten(2).amax(-1)).abs().max().item() for b in (1.0, 10.0, 100.0)]
    ok &= check("lse_pool2d: |LSE_beta - max| for beta = 1, 10, 100 shrinks; beta=inf is the max, beta=0 the mean",
                lse, lse == sorted(lse, reverse=True) and torch.equal(pyops.lse_pool2d(s, math.inf), s.flatten(2)
                                                                     .amax(-1))
                and torch.equal(pyops.lse_pool2d(s, 0), s.flatten(2).mean(-1)), "{}")
    return ok


def timings():
    # The scaled-down Net1 (the bench times the full one). Its 16x18x18 -> 64 head layer runs, in the op as in
    # Net2, as oneDNN's direct convolution on the CPU (im2col would cost as much as the GEMM at this size), so
    # the two differ by the few 1x1 GEMMs and the Python of a call: most of the gap on a 48x48 image (a 3 ms
    # call), little on a 96x96 one.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net1 = reference.homework_net1(small=True).to(dev)
    clf = pyops.nn.SlidingClassifier(net1, 32)
    net2 = reference.homework_net2(net1)
    x = torch.randn(1, 3, 48, 48, device=dev)
    with torch.no_grad():
        compare("small Net1, 48x48 image (289 crops) fp32", lambda: clf(x),
                lambda: reference.crop_loop(net1, x, 32), "per-crop loop", repeat=1)
        compare("small Net1, 48x48 image fp32", lambda: clf(x), lambda: net2(x), "torch Net2", repeat=5)
        x = torch.randn(1, 3, 96, 96, device=dev)
        compare("small Net1, 96x96 image (4225 crops) fp32", lambda: clf(x), lambda: net2(x), "torch Net2", repeat=5)
