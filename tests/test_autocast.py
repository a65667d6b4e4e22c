"""torch.autocast regions: the ops take arguments of mixed floating dtypes (a float32 weight next to the half-precision
output of a layer autocast ran) and compute in one dtype — for the convolutions the region's on CUDA and on a CPU
computing it natively, else float32, for smooth_max float32 (see csrc/common/autocast.h) — giving exactly what the op gives on arguments cast to
that dtype beforehand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyops
from pyops import reference
from conftest import autocast_compute_dtype as compute_dtype, tolerances


def rand(*shape, device="cpu", dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# (device, region dtype): the CPU region in bfloat16 (its default) and in float16, CUDA's in both.
REGIONS = [("cpu", torch.bfloat16), ("cpu", torch.float16),
           pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)]


def run_in_region(device, region_dtype, fn, *args):
    with torch.autocast(device, dtype=region_dtype):
        return fn(*args)


def cast(args, dtype, keep=()):
    """args with every floating tensor (but those at the indices in keep) cast to dtype."""
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in keep else a
            for i, a in enumerate(args)]


def assert_as_if_cast_first(device, region_dtype, fn, args, keep=()):
    got = run_in_region(device, region_dtype, fn, *args)
    target = compute_dtype(device, region_dtype)
    expected = fn(*cast(args, target, keep))
    assert got.dtype == target
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device,region_dtype", REGIONS)
def test_conv1d_mixed_dtypes(device, region_dtype):
    x = rand(2, 4, 33, device=device, dtype=region_dtype)
    w, b = rand(8, 2, 3, device=device, seed=1), rand(8, device=device, seed=2)
    assert_as_if_cast_first(device, region_dtype, lambda *a: pyops.conv1d(*a, padding=1, groups=2), [x, w, b])
    assert_as_if_cast_first(device, region_dtype, lambda *a: pyops.conv1d_bias_act(*a, padding=1, groups=2), [x, w, b])


@pytest.mark.parametrize("device,region_dtype", REGIONS)
def test_conv2d_bn_relu_mixed_dtypes_keeps_the_statistics_dtype(device, region_dtype):
    x = rand(2, 4, 9, 9, device=device, dtype=region_dtype)
    w, b = rand(6, 4, 3, 3, device=device, seed=1), rand(6, device=device, seed=2)
    gamma, beta, mean = rand(6, device=device, seed=3), rand(6, device=device, seed=4), rand(6, device=device, seed=5)
    var = rand(6, device=device, seed=6).abs() + 0.5
    residual = rand(2, 6, 9, 9, device=device, dtype=region_dtype, seed=7)

    def op(x, w, b, gamma, beta, mean, var, residual):
        return pyops.conv2d_bn_relu(x, w, b, gamma, beta, mean, var, 1e-5, padding=1, residual=residual)

    # The statistics and BN affine (indices 3-6) stay float32: the fold reads them in any dtype.
    assert_as_if_cast_first(device, region_dtype, op, [x, w, b, gamma, beta, mean, var, residual], keep=(3, 4, 5, 6))


@pytest.mark.parametrize("device,region_dtype", REGIONS)
def test_sliding_head_mixed_dtypes(device, region_dtype):
    f = rand(1, 3, 7, 8, device=device, dtype=region_dtype)
    w0, w1 = rand(5, 3, 4, 4, device=device, seed=1), rand(2, 5, 1, 1, device=device, seed=2)
    b0, b1 = rand(5, device=device, seed=3), rand(2, device=device, seed=4)
    with torch.no_grad():
        assert_as_if_cast_first(device, region_dtype, lambda f, *p: pyops.sliding_head(f, p[:2], p[2:]),
                                [f, w0, w1, b0, b1])


@pytest.mark.parametrize("device,region_dtype", REGIONS)
def test_smooth_max_computes_in_float32_like_logsumexp(device, region_dtype):
    x = rand(3, 50, device=device, dtype=region_dtype)
    with torch.autocast(device, dtype=region_dtype):
        y = pyops.smooth_max(x, 4.0, dim=-1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, pyops.smooth_max(x.float(), 4.0, dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("device,region_dtype", REGIONS)
def test_conv1d_gradients_through_the_casts(device, region_dtype):
    """Autograd records the casts: the input's gradient comes back in the input's dtype, the weight's in float32."""
    x = rand(2, 4, 20, device=device, dtype=region_dtype).requires_grad_()
    w = rand(4, 1, 5, device=device, seed=1).requires_grad_()
    with torch.autocast(device, dtype=region_dtype):
        y = pyops.conv1d(x, w, padding=2, groups=4)
    g = rand(*y.shape, device=device, dtype=y.dtype, seed=2)
    y.backward(g)
    target = compute_dtype(device, region_dtype)
    xc, wc = x.detach().to(target).requires_grad_(), w.detach().to(target).requires_grad_()
    F.conv1d(xc, wc, padding=2, groups=4).backward(g)
    assert x.grad.dtype == region_dtype and w.grad.dtype == torch.float32
    rtol, atol = tolerances(target)
    torch.testing.assert_close(x.grad, xc.grad.to(region_dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(w.grad, wc.grad.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device,region_dtype", REGIONS)
def test_float64_is_never_cast(device, region_dtype):
    x, w = rand(2, 3, 16, device=device, dtype=torch.float64), rand(5, 3, 3, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=region_dtype):
        y = pyops.conv1d(x, w)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.conv1d(x, w), rtol=1e-12, atol=1e-12)


def conv_then_fused_block():
    """A plain conv (which autocast runs in half precision) feeding conv+BN+ReLU blocks (fused into our op): the
    fused model then meets a half-precision input and float32 weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("device,region_dtype", REGIONS)
def test_fused_model_runs_where_the_original_runs(device, region_dtype):
    model = conv_then_fused_block().to(device)
    fused = pyops.fuse(model)
    x = rand(2, 3, 12, 12, device=device)
    with torch.no_grad():
        exact = model.double()(x.double())
        model.float()
        with torch.autocast(device, dtype=region_dtype):
            original, ours = model(x), fused(x)
    assert ours.dtype == compute_dtype(device, region_dtype)
    assert original.dtype == region_dtype
    # Both within half precision of the float64 model (ours may compute its layers in float32: compute_dtype).
    scale = exact.abs().max().item()
    for y in (original, ours):
        assert (y.double() - exact).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("device,region_dtype", REGIONS)
@pytest.mark.parametrize("algorithm", ["direct", "fft"])
def test_sliding_classifier_in_an_autocast_region(device, region_dtype, algorithm):
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 12 * 12, 16), nn.ReLU(), nn.Linear(16, 4)).eval().to(device)
    dense = pyops.nn.SlidingClassifier(clf, 16, stride=1)
    x = rand(1, 3, 19, 18, device=device)
    with torch.no_grad():
        exact = reference.crop_loop(clf.double(), x.double(), 16, 1)
        clf.float()
        with torch.autocast(device, dtype=region_dtype):
            scores = dense(x, algorithm=algorithm)
            from_half_images = dense(x.to(region_dtype), algorithm=algorithm)  # as the float32 classifier takes them
    for s in (scores, from_half_images):
        assert s.dtype == compute_dtype(device, region_dtype)
        assert (s.double() - exact).abs().max().item() <= 2e-2 * exact.abs().max().item()


def test_mixed_dtypes_outside_a_region_are_refused_by_name():
    """Outside an autocast region of the tensors' device (none at all, or a region of another device for a device
    autocast lacks, such as meta) mixed dtypes stay an error naming the argument."""
    for device in ("cpu", "meta"):
        x, w = torch.ones(1, 2, 5, device=device), torch.ones(2, 2, 3, device=device, dtype=torch.float16)
        with pytest.raises(TypeError, match="'weight'"):
            pyops.conv1d(x, w)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(TypeError, match="'weight'"):
        pyops.conv1d(x, w)  # meta tensors in a CPU region


def test_compiled_fused_model_in_an_autocast_region():
    """torch.compile traces the autocast kernels' casts into the graph: compiled and eager agree in a region."""
    fused = pyops.fuse(conv_then_fused_block())
    x = rand(2, 3, 12, 12)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = compiled(x), fused(x)
    assert got.dtype == expected.dtype == compute_dtype("cpu", torch.bfloat16)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # (the same kernels: equal)
