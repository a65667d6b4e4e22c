import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyops
from pyops import reference
from conftest import (ACTIVATION_REFERENCES, blas_runs_full_width, deterministic_cudnn, gradgradcheck_like_torch,
                      tolerances)

ops = torch.ops.pyops
# F.conv1d (the reference) warns that its own 'same' padding with an even kernel copies the input
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def rand(shape, dtype=torch.float64, device="cpu", gen=None):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def random_configs(count, seed):
    """Seeded (N, C_in, C_out, L, K, stride, padding, dilation, groups, bias) over every argument's range."""
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        groups = rng.choice([1, 1, 2, 3, "depthwise"])
        cin_g, cout_g = rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 4, 5])
        if groups == "depthwise":
            groups, cin_g, cout_g = rng.choice([3, 8]), 1, rng.choice([1, 1, 2])
        k, dilation, stride = rng.choice([1, 2, 3, 4, 5, 9]), rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 1, 2, 3])
        span = dilation * (k - 1) + 1
        padding = rng.choice([0, 1, 2, span // 2, span, "same", "valid"])
        if padding == "same":
            stride = 1
        length = span + rng.randrange(0, 60) + (1 if rng.random() < 0.5 else 0)
        configs.append((rng.choice([1, 2, 3]), cin_g * groups, cout_g * groups, length, k, stride, padding, dilation,
                        groups, rng.random() < 0.6))
    return configs


def forward_and_grads(fn, x, w, b, args, grad_out=None):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b, *args)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad_out = grad_out.to(y.device, y.dtype)
    inputs = [x, w] + ([b] if b is not None else [])
    return [y] + list(torch.autograd.grad(y, inputs, grad_out)), grad_out


def assert_matches_torch(x, w, b, args, dtype, ours=pyops.conv1d, reference=reference.conv1d):
    ours, grad_out = forward_and_grads(ours, x, w, b, args)
    ref, _ = forward_and_grads(reference, x.double().cpu(), w.double().cpu(),
                               b.double().cpu() if b is not None else None, args, grad_out.double().cpu())
    rtol, atol = tolerances(dtype)
    for name, o, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], ours, ref):
        assert o.dtype == dtype and o.device == x.device, name
        # sums of up to C_in*K*L products: scale the tolerance by the reference's magnitude
        torch.testing.assert_close(o.double().cpu(), r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", random_configs(40, seed=4), ids=str)
def test_forward_and_gradients_match_torch(device, dtype, config):
    n, cin, cout, length, k, stride, padding, dilation, groups, bias = config
    g = torch.Generator().manual_seed(hash(config) % 10000)
    x, w = rand((n, cin, length), dtype, device, g), rand((cout, cin // groups, k), dtype, device, g)
    b = rand((cout,), dtype, device, g) if bias else None
    assert_matches_torch(x, w, b, (stride, padding, dilation, groups), dtype)


# Shapes that reach the kernels' other regimes: many channels (grad_weight without batch splitting), staged dense
# windows with several chunks per row, channel counts that leave a remainder after blocks of 4, long rows.
@pytest.mark.parametrize("config", [(2, 128, 128, 300, 4, 1, 3, 1, 128), (2, 256, 260, 90, 3, 1, 1, 1, 1),
                                    (3, 64, 70, 257, 5, 1, 2, 2, 2), (5, 1, 1, 3001, 9, 1, 4, 1, 1),
                                    (2, 32, 32, 200, 3, 3, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("path", ["auto", "direct", "library", "gemm"])
def test_large_shapes_match_torch(device, config, path, monkeypatch):
    # every path on every shape: ours, or oneDNN (CPU) / cuDNN (CUDA), with the CPU's GEMM weight gradient (gemm)
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    n, cin, cout, length, k, stride, padding, dilation, groups = config
    g = torch.Generator().manual_seed(13)
    x, w = rand((n, cin, length), torch.float32, device, g), rand((cout, cin // groups, k), torch.float32, device, g)
    assert_matches_torch(x, w, rand((cout,), torch.float32, device, g), (stride, padding, dilation, groups),
                         torch.float32)


# Dense layers whose weight gradient runs as one matrix product on CPU (conv1d_cpu_gemm.cpp; `auto` takes it for
# float32 where it is faster, per CPU kind, `gemm` on every CPU): dilation, 'same' padding, strides over odd lengths,
# every tap reading only padding (stride 8 over length 4), a pointwise filter, and a batch of 17 with 512 channels
# (two chunks of the columns: the last one shorter).
@pytest.mark.parametrize("config", [(3, 40, 36, 50, 3, 1, "same", 2, 1), (2, 32, 48, 61, 4, 2, 5, 1, 1),
                                    (2, 33, 64, 40, 3, 3, 2, 2, 1), (2, 32, 32, 4, 3, 8, 3, 1, 1),
                                    (2, 64, 32, 30, 1, 1, 0, 1, 1), (17, 512, 512, 8, 3, 1, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("path", ["auto", "gemm"])
def test_dense_gemm_weight_gradient_matches_torch(device, config, path, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    n, cin, cout, length, k, stride, padding, dilation, groups = config
    g = torch.Generator().manual_seed(17)
    x, w = rand((n, cin, length), torch.float32, device, g), rand((cout, cin, k), torch.float32, device, g)
    assert_matches_torch(x, w, rand((cout,), torch.float32, device, g), (stride, padding, dilation, groups),
                         torch.float32)


# Pointwise layers (kernel 1, no padding, one group) as matrix products on the CPU (pointwise_as_product: `auto` where
# faster, `gemm` always, float32 and float64): forward and input gradient per sample, the weight gradient per sample
# on rows of >= 64 positions and as one product of copies below; strides (positions between the reads get no input
# gradient), a batch of one, no bias, and inputs that are views (transposed, sliced).
@pytest.mark.parametrize("config", [(3, 48, 40, 130, 2, True), (4, 20, 24, 100, 1, False), (1, 64, 80, 63, 1, True),
                                    (5, 16, 16, 40, 3, True), (2, 8, 12, 200, 1, True)], ids=str)
@pytest.mark.parametrize("view", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["auto", "gemm"])
def test_pointwise_layers_as_products_match_torch(device, config, view, dtype, path, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    n, cin, cout, length, stride, bias = config
    g = torch.Generator().manual_seed(23)
    if view == "transposed":
        x = rand((n, length, cin), dtype, device, g).transpose(1, 2)
    elif view == "sliced":
        x = rand((n, cin + 3, length + 5), dtype, device, g)[:, 2:cin + 2, 5:]
    else:
        x = rand((n, cin, length), dtype, device, g)
    w = rand((cout, cin, 1), dtype, device, g)
    b = rand((cout,), dtype, device, g) if bias else None
    assert_matches_torch(x, w, b, (stride, 0, 1, 1), dtype)
    if device == "cpu" and path == "gemm":  # (the products ran: forward and input gradient through bmm)
        with torch.profiler.profile() as prof:
            pyops.conv1d(x.detach().requires_grad_(), w, b, stride).sum().backward()
        assert sum(e.name == "aten::bmm" for e in prof.events()) == 2


# The CPU correlation kernel's regimes (conv1d_cpu_correlate.cpp): a strided layer's window staged in the stride's
# phases (kernels narrower and wider than the stride, dilation, several chunks per row, 1, 4 and 8 input channels
# per group, rows shorter than one vector), short rows of dense and depthwise layers (partial tiles; batches of
# them laid end to end, a batch not a multiple of the blocks included), and windows
# too wide to stage (a large dilation: read in place at stride 1, by the bounds-checked loop above it). Staged
# windows wholly inside the padding (large padding or dilation: their staging wrote past the buffer, a segfault).
@pytest.mark.parametrize("config", [(2, 1, 8, 4001, 10, 5, 0, 1, 1), (2, 8, 8, 2000, 3, 2, 1, 1, 1),
                                    (3, 16, 16, 997, 4, 2, 1, 1, 2), (2, 8, 24, 700, 10, 5, 3, 1, 1),
                                    (2, 6, 6, 300, 3, 4, 2, 3, 6), (2, 4, 12, 50, 1, 3, 0, 1, 1),
                                    (2, 8, 8, 9, 5, 7, 4, 2, 1), (64, 8, 8, 4, 3, 1, 1, 1, 1),
                                    (33, 16, 16, 13, 3, 1, 1, 1, 16), (37, 4, 6, 9, 4, 2, 3, 2, 2),
                                    (150, 3, 5, 30, 5, 3, 7, 1, 1), (1, 1, 200, 102, 2, 2, 0, 101, 1),
                                    (1, 16, 16, 5, 3, 2, 400, 1, 1), (1, 1, 1, 5, 3, 2, 7000, 1, 1),
                                    (2, 200, 16, 300, 3, 2, 1, 1, 1), (2, 8, 8, 3000, 3, 1, 1000, 1000, 1),
                                    (2, 8, 8, 3000, 3, 2, 700, 700, 1), (1, 2, 3, 400, 2, 61, 1, 1, 1),
                                    # the weight gradient's kernel sums grad_bias in its pass over grad_output: in
                                    # the first tap class (also where no class reads an input position: stride 8 over
                                    # 4), batch blocks (one channel), 4-channel blocks with a remainder, depthwise
                                    (2, 32, 32, 4, 3, 8, 3, 1, 1), (9, 1, 1, 700, 9, 1, 4, 1, 1),
                                    (3, 12, 10, 67, 5, 1, 2, 2, 2), (3, 16, 16, 64, 13, 1, 6, 1, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_short_and_wide_windows_match_torch(device, config, dtype, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    n, cin, cout, length, k, stride, padding, dilation, groups = config
    g = torch.Generator().manual_seed(length)
    x, w = rand((n, cin, length), dtype, device, g), rand((cout, cin // groups, k), dtype, device, g)
    assert_matches_torch(x, w, rand((cout,), dtype, device, g), (stride, padding, dilation, groups), dtype)


def conv1d_of_existing_pairs(x, w, stride, padding, dilation=1):
    """out[n, o, j] = sum over c and the taps t with 0 <= i = j*stride + t*dilation - padding < L of
    w[o, c, t] * x[n, c, i]: no product with the padding (whose 0 times an infinite weight would be NaN)."""
    length, k = x.shape[-1], w.shape[-1]
    out = x.new_zeros(x.shape[0], w.shape[0], (length + 2 * padding - dilation * (k - 1) - 1) // stride + 1)
    for j in range(out.shape[-1]):
        for t in range(k):
            i = j * stride + t * dilation - padding
            if 0 <= i < length:
                out[:, :, j] = out[:, :, j] + x[:, :, i] @ w[:, :, t].T
    return out


def gradients_of_existing_pairs(x, w, gy, stride, padding, dilation=1):
    """(grad_x, grad_w) of conv1d_of_existing_pairs for grad_output gy, computed on the CPU (on x's device): the
    gradients summed over the pairs inside the input only, whatever a backend's algorithm would multiply."""
    x, w = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    grads = torch.autograd.grad(conv1d_of_existing_pairs(x, w, stride, padding, dilation), (x, w), gy.cpu())
    return [grad.to(gy.device) for grad in grads]


@pytest.mark.parametrize("length", [6, 60])
@pytest.mark.parametrize("channels,stride", [(1, 1), (8, 1), (1, 2), (8, 3)])
def test_infinite_weights_beside_the_padding_make_no_nan(device, length, channels, stride, monkeypatch):
    """Every path sums only the (position, tap) pairs that read inside the input, as F.conv1d's CPU input gradient
    does: the input gradient of a staged window multiplied its zero padding by an infinite weight (NaN), and so did
    the forward of staged windows while rows read in place skipped it (F.conv1d's own forward does either, by
    backend; so may cuDNN's gradients: the reference is the sum over existing pairs, and on the CPU F.conv1d too)."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    x = torch.arange(1.0, length + 1, device=device).repeat(2, channels, 1).requires_grad_()
    w = torch.ones(4, channels, 3, device=device)
    w[:, :, 0] = math.inf
    w.requires_grad_()
    got = pyops.conv1d(x, w, None, stride, 2)
    torch.testing.assert_close(got, conv1d_of_existing_pairs(x.detach(), w.detach(), stride, 2))
    gy = torch.ones_like(got)
    grads = torch.autograd.grad(got, (x, w), gy)
    references = [gradients_of_existing_pairs(x, w, gy, stride, 2)]
    if device == "cpu":
        references.append(torch.autograd.grad(F.conv1d(x, w, None, stride, 2), (x, w), gy))
    for want in references:
        for a, e in zip(grads, want):
            torch.testing.assert_close(a, e, equal_nan=True)


@pytest.mark.parametrize("k,dilation", [(4, 1), (3, 2), (2, 3), (5, 1), (1, 1)])
def test_same_padding_matches_torch_including_asymmetric(device, k, dilation):
    g = torch.Generator().manual_seed(k)
    x, w, b = rand((2, 3, 19), device=device, gen=g), rand((4, 3, k), device=device, gen=g), rand((4,), device=device, gen=g)
    assert pyops.conv1d(x, w, b, padding="same", dilation=dilation).shape[-1] == 19
    assert_matches_torch(x, w, b, (1, "same", dilation, 1), torch.float64)
    assert_matches_torch(x, w, b, (1, "valid", dilation, 1), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", [(3, 2, 64, 150, 33, 1), (2, 16, 16, 200, 31, 1), (2, 16, 16, 37, 31, 1),
                                    (4, 3, 40, 90, 7, 2), (2, 1, 16, 60, 5, 3), (5, 4, 8, 20, 15, 1)], ids=str)
def test_wide_filters_over_zero_padding_match_torch(device, dtype, config):
    """Padded layers whose edge positions (taps reaching the zeros) the CPU kernel computes from staged windows:
    wide filters from few input channels, depthwise k31, rows shorter than the filter's span, dilations; 'same' and
    full padding; a NaN and an infinity in the input at an edge stay where F.conv1d puts them."""
    n, cin, cout, length, k, dilation = config
    groups = cin if cin == cout else 1
    g = torch.Generator().manual_seed(k)
    x, w = rand((n, cin, length), dtype, device, g), rand((cout, cin // groups, k), dtype, device, g)
    for padding in ("same", dilation * (k - 1)):
        assert_matches_torch(x, w, rand((cout,), dtype, device, g), (1, padding, dilation, groups), dtype)
    special = x.clone()
    special[0, 0, 1], special[-1, -1, -2] = float("nan"), float("inf")
    got = pyops.conv1d(special, w, None, 1, "same", dilation, groups)
    want = F.conv1d(special.double().cpu(), w.double().cpu(), None, 1, "same", dilation, groups)
    assert torch.equal(got.isnan().cpu(), want.isnan()) and torch.equal(got.isinf().cpu(), want.isinf())


def test_unbatched_input_and_tuple_arguments(device):
    g = torch.Generator().manual_seed(2)
    x, w = rand((4, 30), device=device, gen=g), rand((6, 2, 3), device=device, gen=g)
    out = pyops.conv1d(x, w, None, (2,), (1,), (2,), 2)
    assert out.shape == (6, 14)
    torch.testing.assert_close(out, F.conv1d(x, w, None, 2, 1, 2, 2), rtol=1e-10, atol=1e-12)


def test_gradcheck_and_gradgradcheck_float64(device):
    g = torch.Generator().manual_seed(3)
    for n, cin, cout, length, k, stride, padding, dilation, groups in [(2, 2, 3, 11, 3, 1, 1, 1, 1),
                                                                      (1, 4, 4, 13, 3, 2, 2, 2, 2),
                                                                      (2, 3, 3, 9, 2, 3, 1, 1, 3)]:
        x = rand((n, cin, length), device=device, gen=g).requires_grad_()
        w = rand((cout, cin // groups, k), device=device, gen=g).requires_grad_()
        b = rand((cout,), device=device, gen=g).requires_grad_()
        fn = lambda x, w, b: pyops.conv1d(x, w, b, stride, padding, dilation, groups)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradgradcheck_without_bias_float64(device):
    g = torch.Generator().manual_seed(4)
    x = rand((2, 4, 12), device=device, gen=g).requires_grad_()
    w = rand((6, 2, 3), device=device, gen=g).requires_grad_()
    fn = lambda x, w: pyops.conv1d(x, w, None, 2, 1, 1, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the pyops ops that run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyops":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs,bias", [(needs, bias) for bias in (True, False)
                                         for needs in [(True, False, False), (False, True, False), (True, True, False),
                                                       (False, False, True), (False, True, True), (True, True, True)]
                                         if bias or not needs[2]], ids=str)
def test_backward_computes_only_the_needed_gradients(device, needs, bias):
    """Each subset of (input, weight, bias) requiring grad gets exactly its gradients from exactly the ops that
    give them: backward_input for the input, backward_weight alone or with the bias sum fused."""
    need_x, need_w, need_b = needs
    g = torch.Generator().manual_seed(9)
    x, w = rand((2, 4, 17), device=device, gen=g), rand((6, 2, 3), device=device, gen=g)
    b = rand((6,), device=device, gen=g) if bias else None
    x.requires_grad_(need_x)
    w.requires_grad_(need_w)
    if b is not None:
        b.requires_grad_(need_b)
    y = pyops.conv1d(x, w, b, 2, 1, 1, 2)
    gy = rand(y.shape, device=device, gen=g)
    wanted = [t for t, need in zip((x, w, b), needs) if need]
    with OpLog() as log:
        got = torch.autograd.grad(y, wanted, gy)
    expected = (["conv1d_backward_input"] if need_x else []) + (
        ["conv1d_backward_weight_bias"] if need_w and need_b else ["conv1d_backward_weight"] if need_w else [])
    assert sorted(log.names) == sorted(expected)
    ref = torch.autograd.grad(F.conv1d(x, w, b, 2, 1, 1, 2), wanted, gy)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_non_contiguous_and_channels_last_inputs(device):
    g = torch.Generator().manual_seed(5)
    base = rand((3, 50, 8), device=device, gen=g)
    views = [base.transpose(1, 2), base.transpose(1, 2)[:, ::2, 1:40:3],
             rand((3, 8, 40), device=device, gen=g).contiguous(memory_format=torch.contiguous_format)[..., ::2]]
    w = rand((6, 8, 3), device=device, gen=g)
    for x in views:
        wx = w[:, : x.shape[1]].contiguous()
        assert not x.is_contiguous() or x is views[-1]
        assert_matches_torch(x, wx, None, (1, 1, 1, 1), torch.float64)
    w_strided = rand((3, 6, 8), device=device, gen=g).transpose(0, 2)  # (8, 6, 3) weight view
    assert_matches_torch(base.transpose(1, 2)[:, :6], w_strided, None, (1, 0, 1, 1), torch.float64)


@pytest.mark.parametrize("config", [(3, 2, 1), (1, 3, 1), (4, 2, 2), (2, 3, 1), (5, 3, 2)], ids=str)
def test_strided_input_gradient_writes_every_phase_once(config, monkeypatch):
    """At a stride above 1 our input gradient computes each phase of the input (positions r, r + stride, ...) that
    some tap reads as a correlation, and zeros the phases no tap reads (k=1 at stride 3, dilation 2 at stride 2): the
    zeros are written only where such a phase exists. Memory freed full of NaN just before (the allocator hands it
    back for a result of the same size) shows any position left unwritten."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    k, stride, dilation = config
    g = torch.Generator().manual_seed(31)
    n, c, length = 4, 64, 601
    w, x = rand((c, c, k), torch.float32, gen=g), rand((n, c, length), torch.float32, gen=g)
    grad_out = rand(tuple(torch.nn.functional.conv1d(x, w, None, stride, 1, dilation).shape), torch.float32, gen=g)
    want = torch.ops.aten.convolution_backward(grad_out.double(), x.double(), w.double(), None, [stride], [1],
                                               [dilation], False, [0], 1, [True, False, False])[0]
    for _ in range(3):
        garbage = torch.full((n, c, length), math.nan)
        del garbage
        got = torch.ops.pyops.conv1d_backward_input(grad_out, w, length, stride, 1, dilation, 1)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", ["direct", "library", "gemm"])
def test_strided_gradients_of_infinite_values_stay_where_torch_puts_them(device, path, monkeypatch):
    """Our CPU backward correlated a grad_output upsampled with zeros: 0·inf made NaN of gradients F.conv1d keeps
    finite (weight [inf, 1], stride 2: grad_input [inf, nan, inf, ...] for [inf, 1, inf, ...]). Now each phase of
    taps is correlated with its own input phase (no zeros multiplied): the gradients of the sum over existing pairs,
    which F.conv1d's CPU backward gives at batch 1. On CUDA our kernels (direct) are held to that sum, the library
    path to F.conv1d's (cuDNN's, the same call; it may multiply the zeros it pads a strided gradient with)."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    for stride, dilation, padding in ((2, 1, 0), (3, 2, 1), (2, 2, 1)):
        w = torch.tensor([[[math.inf, 1.0, 2.0]]], device=device, requires_grad=True)
        x = torch.arange(1.0, 14.0, device=device).view(1, 1, 13)
        x[0, 0, 4] = math.inf
        x.requires_grad_()
        gy = torch.ones(1, 1, (13 + 2 * padding - dilation * 2 - 1) // stride + 1, device=device)
        ours = torch.autograd.grad(pyops.conv1d(x, w, None, stride, padding, dilation), (x, w), gy)
        references = []
        if device == "cpu" or path == "direct":
            references.append(gradients_of_existing_pairs(x, w, gy, stride, padding, dilation))
        if device == "cpu" or path != "direct":
            references.append(torch.autograd.grad(F.conv1d(x, w, None, stride, padding, dilation), (x, w), gy))
        for want in references:
            for got, ref in zip(ours, want):
                torch.testing.assert_close(got, ref, equal_nan=True)
        if path != "direct":
            continue
        # Two samples (short rows: laid end to end when everything is finite) give the same per sample. (F.conv1d
        # itself does not: at batch 2 its input gradient has a NaN where batch 1's holds w[2].)
        x2 = x.detach().repeat(2, 1, 1).requires_grad_()
        grad_x, grad_w = torch.autograd.grad(pyops.conv1d(x2, w, None, stride, padding, dilation), (x2, w),
                                             gy.repeat(2, 1, 1))
        torch.testing.assert_close(grad_x, ours[0].repeat(2, 1, 1), equal_nan=True)
        torch.testing.assert_close(grad_w, 2 * ours[1], equal_nan=True)


@pytest.mark.parametrize("path", ["auto", "direct", "library", "gemm"])
def test_length_one_inputs_with_size_one_strides(device, path, monkeypatch):
    """A length-1 input transposed from (N, 1, C) counts as contiguous but has a length stride of C, on which
    oneDNN (torch 2.14) crashed; every path must give F.conv1d's values for it (computed on a standard copy)."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    g = torch.Generator().manual_seed(11)
    x = rand((2, 1, 32), device=device, gen=g).transpose(1, 2).requires_grad_()  # (2, 32, 1), strides (32, 1, 32)
    w, b = rand((32, 32, 10), device=device, gen=g).requires_grad_(), rand((32,), device=device, gen=g).requires_grad_()
    assert x.is_contiguous() and x.stride(2) != 1
    args = (4, 19, 2, 1)
    gy = rand((2, 32, 6), device=device, gen=g).transpose(0, 1).contiguous().transpose(0, 1)  # odd strides too
    ours = forward_and_grads(pyops.conv1d, x, w, b, args, gy)[0]
    expected = forward_and_grads(F.conv1d, x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(),
                                 w, b, args, gy.contiguous())[0]
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_empty_batch(device):
    x = torch.zeros((0, 4, 20), dtype=torch.float64, device=device, requires_grad=True)
    w = rand((5, 4, 3), device=device).requires_grad_()
    b = rand((5,), device=device).requires_grad_()
    y = pyops.conv1d(x, w, b, padding=1)
    assert y.shape == (0, 5, 20)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_length_shorter_than_dilated_filter_is_an_error(device):
    x, w = rand((1, 2, 6), device=device), rand((3, 2, 4), device=device)
    with pytest.raises(ValueError, match="shorter than the dilated filter span"):
        pyops.conv1d(x, w, dilation=2)
    with pytest.raises(ValueError, match="shorter than the dilated filter span"):
        ops.conv1d(x, w, None, 1, 0, 2, 1)


def grads_of(x, w, b, args, grad_out):
    ours, _ = forward_and_grads(pyops.conv1d, x, w, b, args, grad_out)
    return ours


@pytest.mark.parametrize("config", [(4, 64, 64, 257, 3, 1, 1, 1, 1), (2, 16, 16, 1000, 4, 1, 3, 1, 16),
                                    (37, 1, 1, 2000, 9, 1, 4, 1, 1), (3, 8, 8, 300, 3, 2, 1, 2, 2),
                                    # one image: on several threads its output channels are split among work items
                                    (1, 8, 130, 1024, 9, 1, 4, 1, 1), (1, 3, 7, 500, 5, 2, 2, 1, 1),
                                    # pointwise: per-sample products, and one product of copies on short rows
                                    (4, 64, 64, 257, 1, 1, 0, 1, 1), (16, 32, 48, 20, 1, 1, 0, 1, 1)], ids=str)
@pytest.mark.parametrize("path", ["auto", "direct", "library", "gemm"])
def test_deterministic_across_runs_and_thread_counts(device, config, path, monkeypatch):
    """Our kernels (`direct`) are bitwise reproducible across runs and thread counts as they are (on the CPU the
    bias gradient too: the weight gradient's kernel sums it). The library path (`library`, `gemm`, and `auto` on
    dense layers) is what ATen offers: reproducible across runs at one thread count (oneDNN splits reductions by
    thread count), on CUDA when asked through torch.backends.cudnn.deterministic."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    n, cin, cout, length, k, stride, padding, dilation, groups = config
    g = torch.Generator().manual_seed(6)
    x, w = rand((n, cin, length), torch.float32, device, g), rand((cout, cin // groups, k), torch.float32, device, g)
    b = rand((cout,), torch.float32, device, g)
    args = (stride, padding, dilation, groups)
    y = pyops.conv1d(x, w, b, *args)
    grad_out = rand(y.shape, torch.float32, device, g)
    threads = torch.get_num_threads()
    try:
        runs = []
        with deterministic_cudnn(path != "direct"):
            for t in ([2, 2, 1] if device == "cpu" and path == "direct" else [threads, threads]):
                torch.set_num_threads(t)
                runs.append(grads_of(x, w, b, args, grad_out))
    finally:
        torch.set_num_threads(threads)
    # output, grad_input, grad_weight: our kernels, bitwise; grad_bias too where our CPU kernel sums it
    ours = 4 if device == "cpu" and path == "direct" else 3
    for other in runs[1:]:
        for a, c in zip(runs[0][:ours], other[:ours]):
            assert torch.equal(a, c)
    assert torch.equal(runs[0][3], runs[1][3])


@pytest.mark.parametrize("path", ["direct", "library", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype, path, monkeypatch):
    """Accumulated in fp32, rounded once: our kernels (on the CPU: float32 ones), and the library's (on the CPU
    oneDNN's own half-precision convolution where it computes the dtype, else ours in float32)."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    g = torch.Generator().manual_seed(7)
    x, w, b = rand((2, 8, 300), dtype, device, g), rand((8, 1, 4), dtype, device, g), rand((8,), dtype, device, g)
    # (stride, padding, dilation, groups)
    for args in [(1, 3, 1, 8), (1, 1, 1, 1), (2, 2, 2, 2)]:
        wa = w if args[3] == 8 else rand((8, 8 // args[3], 4), dtype, device, g)
        ours, grad_out = forward_and_grads(pyops.conv1d, x, wa, b, args)
        ref, _ = forward_and_grads(reference.conv1d, x.double().cpu(), wa.double().cpu(), b.double().cpu(), args,
                                   grad_out.double().cpu())
        for o, r in zip(ours, ref):
            assert o.dtype == dtype
            torch.testing.assert_close(o.double().cpu(), r, rtol=2e-2, atol=2e-2 * max(1.0, r.abs().max().item()))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["elementwise", "runs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_depthwise_cuda_layouts_match_torch(layout, dtype, k, monkeypatch):
    """Both ways the CUDA depthwise kernels spread a tile over their threads (PYOPS_CONV1D_DEPTHWISE; `runs` covers
    the 2-5 tap filters, 7 taps stays elementwise under either setting): forward and all three gradients against
    float64, over lengths that end mid-run and mid-tile (tiles of 1024), odd lengths (rows not 16-byte aligned),
    several tiles, causal, centred and over-wide paddings, with and without a bias (the weight gradient alone, or
    with the bias's sum in the same pass); and bitwise the same on a second run."""
    monkeypatch.setenv("PYOPS_CONV1D_DEPTHWISE", layout)
    g = torch.Generator().manual_seed(k)
    for n, c, length, padding, bias in [(2, 3, 2048, k - 1, True), (3, 5, 2051, k // 2, True), (1, 4, 9, 0, True),
                                        (2, 2, 1029, k - 1, True), (1, 6, 3001, k + 1, True), (2, 8, 1024, 0, True),
                                        (2, 3, 2051, k - 1, False)]:
        x, w = rand((n, c, length), dtype, "cuda", g), rand((c, 1, k), dtype, "cuda", g)
        b = rand((c,), dtype, "cuda", g) if bias else None
        args = (1, padding, 1, c)
        ours, grad_out = forward_and_grads(pyops.conv1d, x, w, b, args)
        ref, _ = forward_and_grads(reference.conv1d, x.double().cpu(), w.double().cpu(),
                                   b.double().cpu() if bias else None, args, grad_out.double().cpu())
        rtol, atol = (2e-2, 2e-2) if dtype in (torch.float16, torch.bfloat16) else tolerances(dtype)
        for name, o, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], ours, ref):
            assert o.dtype == dtype, name
            torch.testing.assert_close(o.double().cpu(), r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()),
                                       msg=lambda m: f"{name} (length {length}, padding {padding}): {m}")
        again, _ = forward_and_grads(pyops.conv1d, x, w, b, args, grad_out)
        assert all(torch.equal(a, o) for a, o in zip(again, ours))


@pytest.mark.cuda
def test_bad_depthwise_layout_env_is_an_error(monkeypatch):
    monkeypatch.setenv("PYOPS_CONV1D_DEPTHWISE", "vectorized")
    x, w = torch.randn(1, 4, 32, device="cuda"), torch.randn(4, 1, 3, device="cuda")
    with pytest.raises(ValueError, match="PYOPS_CONV1D_DEPTHWISE must be elementwise or runs"):
        pyops.conv1d(x, w, groups=4)


def test_homework_network_gradients_equal_closed_form(device):
    """Problem 4: y_l = sigma(A_{w_l} y_{l-1} + b_l), last layer linear; gradients in explicit Toeplitz matrices."""
    g = torch.Generator().manual_seed(8)
    kernel_sizes, paddings, length = [5, 3, 4, 3], [2, 0, 1, 1], 40
    filters = [rand((k,), gen=g) for k in kernel_sizes]
    biases = [rand((), gen=g) for _ in kernel_sizes]
    x = rand((length,), gen=g)
    out_len = length
    for k, p in zip(kernel_sizes, paddings):
        out_len = out_len + 2 * p - k + 1
    u = rand((out_len,), gen=g)
    grad_w, grad_b, grad_x = reference.conv_net_gradients(x, filters, biases, paddings, u)

    ws = [f.view(1, 1, -1).to(device).requires_grad_() for f in filters]
    bs = [b.view(1).to(device).requires_grad_() for b in biases]
    xt = x.view(1, 1, -1).to(device).requires_grad_()
    y = xt
    for l, (w, b, p) in enumerate(zip(ws, bs, paddings)):
        y = pyops.conv1d(y, w, b, padding=p)
        if l < len(ws) - 1:
            y = torch.sigmoid(y)
    (y.view(-1) * u.to(device)).sum().backward()
    for l in range(len(ws)):
        torch.testing.assert_close(ws[l].grad.view(-1).cpu(), grad_w[l], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bs[l].grad.view(()).cpu(), grad_b[l], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xt.grad.view(-1).cpu(), grad_x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_nn_conv1d_trains_like_torch(device, padding_mode):
    torch.manual_seed(9)
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=2, dilation=2, groups=2,
                  padding_mode=padding_mode)
    ref = torch.nn.Conv1d(**kwargs, dtype=torch.float64).to(device)
    ours = pyops.nn.Conv1d(**kwargs, dtype=torch.float64).to(device)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, torch.nn.Conv1d) and ours.state_dict().keys() == ref.state_dict().keys()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        x, target = rand((3, 4, 25), device=device, gen=g), rand((3, 6, 25), device=device, gen=g)
        losses = []
        for m, opt in zip((ref, ours), opts):
            opt.zero_grad()
            out = m(x)
            loss = ((out - target) ** 2).mean()
            loss.backward()
            losses.append((out, m.weight.grad.clone(), m.bias.grad.clone()))
            opt.step()
        for a, c in zip(*losses):
            torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    for a, c in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def test_swap_conv1d_puts_ours_in_place_of_a_models_layers(device):
    """swap_conv1d: every nn.Conv1d of a model (nested too) becomes a pyops.nn.Conv1d sharing its parameters; same
    outputs, gradients and state_dict keys; the original is untouched unless inplace."""
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Conv1d(8, 8, 5, padding=2, groups=8, bias=False,
                                                                    padding_mode="circular")),
                                pyops.nn.Conv1d(8, 2, 1)).double().to(device)
    swapped = pyops.nn.swap_conv1d(model)
    assert all(type(m) is not torch.nn.Conv1d for m in swapped.modules())
    assert sum(type(m) is pyops.nn.Conv1d for m in swapped.modules()) == 3
    assert type(model[0]) is torch.nn.Conv1d  # not modified
    assert swapped.state_dict().keys() == model.state_dict().keys()
    x = rand((2, 4, 30), device=device).requires_grad_()
    y_ref, y = model(x), swapped(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    grads_ref = torch.autograd.grad(y_ref.sum(), [x, *model.parameters()])
    grads = torch.autograd.grad(y.sum(), [x, *swapped.parameters()])
    for a, c in zip(grads_ref, grads):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    assert pyops.nn.swap_conv1d(model, inplace=True) is model and type(model[0]) is pyops.nn.Conv1d
    layer = torch.nn.Conv1d(3, 3, 2).eval()
    ours = pyops.nn.Conv1d.from_module(layer)
    assert ours.weight is layer.weight and ours.bias is layer.bias and not ours.training
    with pytest.raises(TypeError, match="conv"):
        pyops.nn.Conv1d.from_module(torch.nn.Conv2d(3, 3, 2))
    # a computed weight has no Parameter to share: named (nn.Module's own "cannot assign" error came out)
    for reparametrize in (torch.nn.utils.parametrizations.weight_norm, torch.nn.utils.weight_norm,
                          torch.nn.utils.spectral_norm):
        with pytest.raises(TypeError, match="argument 'conv' computes its weight"):
            pyops.nn.Conv1d.from_module(reparametrize(torch.nn.Conv1d(3, 6, 3)))
    # an uninitialized lazy layer has no channel count yet (it became a Conv1d(0, ...) with unset parameters)
    with pytest.raises(ValueError, match="lazy layer"):
        pyops.nn.Conv1d.from_module(torch.nn.LazyConv1d(8, 3))


def test_swap_conv1d_keeps_everything_but_the_kernel():
    """The layers change class only: hooks, attributes, an old-style weight_norm, sharing between parents; a
    LazyConv1d becomes ours when its first input initializes it."""
    torch.manual_seed(13)
    hooked, shared = torch.nn.Conv1d(4, 4, 3, padding=1), torch.nn.Conv1d(4, 4, 1)
    calls = []
    hooked.register_forward_hook(lambda module, inputs, output: calls.append(type(module)))
    hooked.tag = "kept"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style weight_norm is deprecated, still in use
        normed = torch.nn.utils.weight_norm(torch.nn.Conv1d(4, 4, 3, padding=1))
    model = torch.nn.Sequential(hooked, shared, normed, shared).double()
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    expected = model(x)
    calls.clear()
    assert pyops.nn.swap_conv1d(model, inplace=True) is model
    y = model(x)
    assert [type(m) for m in model] == [pyops.nn.Conv1d] * 4 and model[1] is model[3]
    assert calls == [pyops.nn.Conv1d] and model[0].tag == "kept"
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    (grad_g,) = torch.autograd.grad(y.sum(), normed.weight_g)
    assert grad_g.abs().sum() > 0  # the weight is still recomputed from weight_g and weight_v at each call

    lazy = pyops.nn.swap_conv1d(torch.nn.Sequential(torch.nn.LazyConv1d(2, 3, dtype=torch.float64)))
    assert type(lazy[0]) is torch.nn.LazyConv1d  # until its first input initializes it
    lazy(x)
    assert type(lazy[0]) is pyops.nn.Conv1d
    torch.testing.assert_close(lazy(x), F.conv1d(x, lazy[0].weight, lazy[0].bias), rtol=1e-10, atol=1e-12)


def test_int_arguments_take_integer_likes():
    """numpy integers, as F.conv1d takes them; bools and floats are refused by name."""
    np = pytest.importorskip("numpy")
    x, w = torch.randn(1, 2, 9, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(pyops.conv1d(x, w, stride=np.int64(2), padding=(np.int32(1),)),
                               F.conv1d(x, w, stride=2, padding=1), rtol=1e-12, atol=1e-12)
    for bad in (True, 2.0):
        with pytest.raises(TypeError, match="'stride' must be an int"):
            pyops.conv1d(x, w, stride=bad)
    with pytest.raises(ValueError, match="'input' has length 0"):
        pyops.conv1d(x[:, :, :0], w[:, :, :2], padding="same")



def test_opcheck_all_ops(device):
    g = torch.Generator().manual_seed(11)
    # (C_in, C_out, K, L, stride, padding, dilation, groups): general, strided grouped, depthwise (the fused CUDA
    # kernels), pointwise at stride 1 and 2 (the CPU's matrix products)
    for cin, cout, k, length, stride, padding, dilation, groups in [
            (4, 6, 3, 23, 1, 1, 1, 1), (4, 6, 3, 23, 2, 3, 2, 2), (4, 4, 3, 23, 1, 2, 1, 4),
            (20, 6, 1, 70, 1, 0, 1, 1), (20, 6, 1, 140, 2, 0, 1, 1)]:
        x = rand((2, cin, length), device=device, gen=g).requires_grad_()
        w = rand((cout, cin // groups, k), device=device, gen=g).requires_grad_()
        b = rand((cout,), device=device, gen=g).requires_grad_()
        hyper = (stride, padding, dilation, groups)
        y = ops.conv1d(x, w, b, *hyper)
        gy = rand(y.shape, device=device, gen=g).requires_grad_()
        torch.library.opcheck(ops.conv1d, (x, w, b, *hyper))
        torch.library.opcheck(ops.conv1d, (x, w, None, *hyper))
        torch.library.opcheck(ops.conv1d_backward_input, (gy, w, length, *hyper))
        torch.library.opcheck(ops.conv1d_backward_weight, (gy, x, k, *hyper))
        torch.library.opcheck(ops.conv1d_backward_weight_bias, (gy, x, k, *hyper))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,dilation,padding", [(2, 1, 1), (3, 1, 1), (4, 1, 3), (5, 1, 2), (7, 1, 0), (3, 2, 2),
                                                (8, 1, 7), (9, 1, 4)])
def test_backward_weight_bias_is_both_gradients_in_one_call(device, dtype, k, dilation, padding):
    """grad_weight exactly as conv1d_backward_weight gives it (same kernel, same order), grad_bias the sum of
    grad_output over batch and length; depthwise layers of every filter width the CUDA kernels specialize, a
    single-channel one, and a grouped one."""
    g = torch.Generator().manual_seed(k)
    for n, cin, cout, groups, length in [(3, 16, 16, 16, 1500), (2, 1, 1, 1, 2100), (2, 4, 6, 2, 40)]:
        x = rand((n, cin, length), dtype, device, g)
        gy = rand((n, cout, (length + 2 * padding - dilation * (k - 1) - 1) + 1), dtype, device, g)
        hyper = (1, padding, dilation, groups)
        grad_weight, grad_bias = ops.conv1d_backward_weight_bias(gy, x, k, *hyper)
        assert torch.equal(grad_weight, ops.conv1d_backward_weight(gy, x, k, *hyper))
        rtol, atol = tolerances(dtype)
        torch.testing.assert_close(grad_bias.double(), gy.double().sum((0, 2)), rtol=rtol, atol=atol * length)
        assert grad_bias.dtype == dtype and grad_bias.shape == (cout,)


def test_torch_compile_forward_backward(device):
    g = torch.Generator().manual_seed(12)
    x = rand((2, 4, 30), device=device, gen=g).requires_grad_()
    w = rand((4, 2, 3), device=device, gen=g).requires_grad_()
    b = rand((4,), device=device, gen=g).requires_grad_()

    def step(x, w, b):
        return torch.sigmoid(pyops.conv1d(x, w, b, stride=2, padding=1, groups=2)).sum()

    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(step(x, w, b), (x, w, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_torch_compile_dynamic_lengths_share_one_graph(device):
    """With dynamic shapes, one compiled forward+backward serves every input length: the backward ops take the input
    length and kernel size as SymInts (an int would specialize the length and recompile for each). Strided, so the
    input length is not a function of grad_output's length and must reach conv1d_backward_input as it is."""
    from torch._dynamo.testing import CompileCounterWithBackend
    g = torch.Generator().manual_seed(13)
    w = rand((6, 2, 3), device=device, gen=g).requires_grad_()
    b = rand((6,), device=device, gen=g).requires_grad_()

    def step(x, w, b):
        return torch.sigmoid(pyops.conv1d(x, w, b, stride=2, padding=1, groups=2)).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    for length in (17, 18, 31, 64):
        x = rand((2, 4, length), device=device, gen=g).requires_grad_()
        got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
        want = torch.autograd.grad(step(x, w, b), (x, w, b))
        for a, c in zip(got, want):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1


def test_flop_counter_counts_every_op():
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 4, 30, requires_grad=True)
    w = torch.randn(6, 2, 3, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        pyops.conv1d(x, w, None, 2, 1, 1, 2).sum().backward()
    macs = 2 * 6 * 15 * 2 * 3  # N * C_out * L_out * C_in/groups * K
    flops = counter.get_flop_counts()["Global"]
    assert flops[ops.conv1d] == 2 * macs
    assert flops[ops.conv1d_backward_input] == 2 * macs
    assert flops[ops.conv1d_backward_weight] == 2 * macs
    b = torch.randn(6, requires_grad=True)
    with FlopCounterMode(display=False) as counter:  # with a bias, one op gives the weight and bias gradients
        pyops.conv1d(x, w, b, 2, 1, 1, 2).sum().backward()
    assert counter.get_flop_counts()["Global"][ops.conv1d_backward_weight_bias] == 2 * macs


BAD_INPUTS = [
    ("weight of the wrong rank", lambda d: (rand((2, 4, 10), device=d), rand((3, 4), device=d), None, {}),
     ValueError, "weight"),
    ("channel mismatch", lambda d: (rand((2, 4, 10), device=d), rand((3, 5, 3), device=d), None, {}),
     ValueError, "channel mismatch"),
    ("bias of the wrong length", lambda d: (rand((2, 4, 10), device=d), rand((3, 4, 3), device=d),
                                            rand((4,), device=d), {}), ValueError, "bias"),
    ("stride 0", lambda d: (rand((2, 4, 10), device=d), rand((3, 4, 3), device=d), None, {"stride": 0}),
     ValueError, "stride"),
    ("negative padding", lambda d: (rand((2, 4, 10), device=d), rand((3, 4, 3), device=d), None, {"padding": -1}),
     ValueError, "padding"),
    ("dtype mismatch", lambda d: (rand((2, 4, 10), device=d), rand((3, 4, 3), torch.float32, d), None, {}),
     TypeError, "dtype"),
    ("integer input", lambda d: (torch.ones(2, 4, 10, dtype=torch.long, device=d), rand((3, 4, 3), device=d),
                                 None, {}), TypeError, "input"),
    ("same with stride", lambda d: (rand((2, 4, 10), device=d), rand((3, 4, 3), device=d), None,
                                    {"padding": "same", "stride": 2}), ValueError, "same"),
    ("groups not dividing", lambda d: (rand((2, 4, 10), device=d), rand((3, 2, 3), device=d), None, {"groups": 2}),
     ValueError, "divisible"),
    ("no input channels", lambda d: (rand((2, 0, 8), device=d), rand((4, 0, 3), device=d), rand((4,), device=d),
                                     {"padding": 1}), ValueError, "'input' has 0 channels"),
    ("length 0", lambda d: (rand((2, 4, 0), device=d), rand((3, 4, 3), device=d), None, {"padding": 2}),
     ValueError, "length 0"),
    ("padding past int64", lambda d: (rand((2, 4, 10), device=d), rand((3, 4, 3), device=d), None,
                                      {"padding": 2**62}), ValueError, "'padding' = 4611686018427387904 is too large"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_problem(device, case):
    _, make, exc, pattern = case
    x, w, b, kwargs = make(device)
    with pytest.raises(exc, match=pattern):
        pyops.conv1d(x, w, b, **kwargs)
    # the op itself checks again (padding strings are the wrapper's business)
    if kwargs.get("padding") == "same":
        return
    hyper = (kwargs.get("stride", 1), kwargs.get("padding", 0), 1, kwargs.get("groups", 1))
    with pytest.raises(exc, match=pattern):
        ops.conv1d(x, w, b, *hyper)


def test_device_mismatch_is_an_error():
    x, w = rand((2, 4, 10)), rand((3, 4, 3)).to("meta")
    with pytest.raises(ValueError, match="weight"):
        pyops.conv1d(x, w)


def test_backward_ops_check_their_arguments():
    gy, w, x = rand((2, 3, 8)), rand((3, 4, 3)), rand((2, 4, 10))
    with pytest.raises(ValueError, match="input_length"):
        ops.conv1d_backward_input(gy, w, 11, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="channel mismatch"):
        ops.conv1d_backward_input(rand((2, 5, 8)), w, 10, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.conv1d_backward_weight(gy, x, 0, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="length"):
        ops.conv1d_backward_weight(gy, x, 4, 1, 0, 1, 1)
    # strided: several input lengths give the same output length; the explicit length makes them round-trip
    for length in (9, 10):
        assert ops.conv1d_backward_input(rand((2, 3, 4)), w, length, 2, 0, 1, 1).shape == (2, 4, length)


def test_meta_tensor_among_real_ones_is_an_error():
    """A meta argument sends the call to the fake kernels, which returned an uninitialized CPU tensor."""
    x, w, gy = rand((2, 4, 10)), rand((6, 2, 3)), rand((2, 6, 10))
    meta = lambda t: t.to("meta")  # noqa: E731
    for call, name in [(lambda: ops.conv1d(x, meta(w), None, 1, 1, 1, 2), "weight"),
                       (lambda: ops.conv1d(x, w, meta(rand((6,))), 1, 1, 1, 2), "bias"),
                       (lambda: ops.conv1d_backward_input(gy, meta(w), 10, 1, 1, 1, 2), "weight"),
                       (lambda: ops.conv1d_backward_weight(meta(gy), x, 3, 1, 1, 1, 2), "grad_output")]:
        with pytest.raises(ValueError, match=f"'{name}' is on meta"):
            call()


@pytest.mark.parametrize("path", ["direct", "gemm", "library"])
@pytest.mark.parametrize("channels", [2, 40])
def test_strides_past_the_input_give_one_window(monkeypatch, path, channels):
    """A stride past the padded input gives one output position, as the padded length itself does: the backward's
    index arithmetic overflowed at 2**63 - 1 (a zero input gradient, a negative tap count), the library's transposed
    convolution failed from 2**31 on, and the GEMM weight gradient split the input into `stride` phases (12 s and
    1.3 GB at 10**7)."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    x, w = rand((1, channels, 5)).requires_grad_(), rand((channels, channels, 2)).requires_grad_()
    want = F.conv1d(x, w, None, 7, 1)  # 5 + 2 padded: one window from stride 6 on
    want_grads = torch.autograd.grad(want.sum(), [x, w])
    for stride in (2**31, 10**7, 2**63 - 1):
        got = pyops.conv1d(x, w, None, stride, 1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, e in zip(torch.autograd.grad(got.sum(), [x, w]), want_grads):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels", [4, 8])
def test_paddings_and_dilations_near_int64_range(monkeypatch, dtype, batch, channels):
    """Strides, paddings and dilations near 2**62 are valid arguments: the staging rule's products overflowed int64
    (a null staging buffer written at offsets near 2**60: segfault, or vector::_M_default_append), and a short-row
    batch laid its samples end to end with the padding written out as zeros (padding 5e6: +0.6 GB, 10x slower).
    With 8 channels the weight gradient would be the tiled product's, which holds the padded positions: padding
    wider than the input keeps it on the correlation kernel."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    g = torch.Generator().manual_seed(3)
    x, w = rand((batch, channels, 10), dtype, gen=g), rand((channels, channels, 3), dtype, gen=g)
    near = 2**62 - 1
    # (stride, padding, dilation), on inputs of 10 and of 1: two windows, one window, the padding's zeros only
    for length, args in [(10, (2**61, 2**60, 1)), (1, (2, near, near)), (1, (1, near, near)),
                         (10, (2 * 5 * 10**6 + 5, 5 * 10**6, 1))]:
        xl = x[..., :length]
        ours, grad_out = forward_and_grads(pyops.conv1d, xl, w, None, args)
        ref, _ = forward_and_grads(F.conv1d, xl.double(), w.double(), None, args, grad_out.double())
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


def test_bad_path_env_is_an_error(monkeypatch):
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "fastest")
    with pytest.raises(ValueError, match="PYOPS_CONV1D_PATH"):
        pyops.conv1d(torch.randn(1, 2, 8), torch.randn(2, 2, 3))


def test_conv_forward_overrides_run_as_in_nn_conv1d():
    """pyops.nn.Conv1d.forward bypassed _conv_forward, so a subclass standardizing its weight there computed the
    plain convolution (off by 7.7)."""
    def standardized(base):
        class WSConv1d(base):
            def _conv_forward(self, x, weight, bias):
                mean, std = weight.mean((1, 2), keepdim=True), weight.std((1, 2), keepdim=True)
                return super()._conv_forward(x, (weight - mean) / std, bias)
        return WSConv1d
    ours, theirs = standardized(pyops.nn.Conv1d)(3, 4, 3), standardized(torch.nn.Conv1d)(3, 4, 3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(ours(x), theirs(x))


def test_swap_conv1d_keeps_parametrizations():
    """Layers under parametrizations (weight_norm, spectral_norm: TCNs, vocoders) were left on torch's kernel."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm
    torch.manual_seed(0)
    model = torch.nn.Sequential(weight_norm(torch.nn.Conv1d(2, 3, 3)), torch.nn.ReLU(),
                                spectral_norm(torch.nn.Conv1d(3, 3, 3)).eval(), torch.nn.Conv1d(3, 2, 1))
    x = torch.randn(2, 2, 20, requires_grad=True)
    want = model(x)
    for inplace in (False, True):
        swapped = pyops.nn.swap_conv1d(model, inplace=inplace)
        assert all(isinstance(swapped[i], pyops.nn.Conv1d) for i in (0, 2, 3))
        assert parametrize.is_parametrized(swapped[0], "weight") and parametrize.is_parametrized(swapped[2], "weight")
        got = swapped(x)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        for a, e in zip(torch.autograd.grad(got, [x, swapped[0].parametrizations.weight.original0], g),
                        torch.autograd.grad(want, [x, model[0].parametrizations.weight.original0], g,
                                            retain_graph=True)):
            torch.testing.assert_close(a, e)
    parametrize.remove_parametrizations(swapped[0], "weight")
    assert type(swapped[0]) is pyops.nn.Conv1d
    torch.testing.assert_close(swapped(x), want)


def test_short_rows_of_a_batch_sum_only_existing_pairs():
    """Short rows are laid end to end only where every value is finite: an inf in grad_output met a neighbour's
    zero padding (NaN in the weight gradient for a batch of 2, [0, -inf, inf] for the sample alone)."""
    x = torch.randn(2, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gy = torch.randn(2, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gy[1, 0, 0] = math.inf
    both = ops.conv1d_backward_weight(gy, x, 3, 1, 1, 1, 1)
    alone = [ops.conv1d_backward_weight(gy[i:i + 1], x[i:i + 1], 3, 1, 1, 1, 1) for i in range(2)]
    torch.testing.assert_close(both, alone[0] + alone[1])
    assert not both.isnan().any()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_weight_gradient_sums_only_existing_pairs(stride, dtype, monkeypatch):
    """The tiled product (dense layers' weight gradient) reads zero rows where a tap reads padding: an inf in
    grad_output there made NaN where the sum of the existing pairs is -inf or 0. Such a result is recomputed by
    correlate_weight_cpu. With x all ones and grad_output zero but one -inf at the first position of channel 3, tap 0
    reads the padding there (no pair) and taps 1 and 2 read x[0] and x[1]: -inf at [3, :, 1:], zero elsewhere."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    x = torch.ones(2, 16, 40, dtype=dtype)
    gy = torch.zeros(2, 16, (40 + 2 - 3) // stride + 1, dtype=dtype)
    gy[1, 3, 0] = -math.inf
    want = torch.zeros(16, 16, 3, dtype=dtype)
    want[3, :, 1:] = -math.inf
    torch.testing.assert_close(ops.conv1d_backward_weight(gy, x, 3, stride, 1, 1, 1), want)


@pytest.mark.parametrize("path", ["gemm", "auto"])
def test_gemm_weight_gradient_sums_only_existing_pairs(path, monkeypatch):
    """The matrix product multiplies grad_output by the zeros its columns hold where a tap reads padding: an inf
    there made NaN where the sum of the existing pairs is -inf or finite. Such a result is recomputed by our kernel,
    so the weight gradient equals the direct path's, NaN where it has NaN only."""
    g = torch.Generator().manual_seed(5)
    x, gy = rand((2, 8, 50), torch.float32, gen=g), rand((2, 16, 50), torch.float32, gen=g)  # (auto's GEMM: float32)
    gy[0, 3, 0] = -math.inf  # read with the left padding by tap 0 only
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    want = ops.conv1d_backward_weight(gy, x, 3, 1, 1, 1, 1)
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    got = ops.conv1d_backward_weight(gy, x, 3, 1, 1, 1, 1)
    assert not want.isnan().any() and want.isinf().any()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_precisions_take_the_weight_gradients_product(dtype, monkeypatch):
    """float64 runs the weight gradient's matrix product by float32's rule (on 240 random float64 layers it was the
    fastest path on 152; the previous rule, which kept float64 off it, was 1.50x the fastest geomean). A keyword-
    spotting layer with 4 input channels (outside the tiled product): the product where it runs on this CPU, our
    kernel elsewhere; values equal F.conv1d's."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "auto")
    g = torch.Generator().manual_seed(9)
    x, gy = rand((32, 4, 101), dtype, gen=g), rand((32, 64, 101), dtype, gen=g)
    with torch.profiler.profile() as prof:
        got = ops.conv1d_backward_weight(gy, x, 3, 1, 1, 1, 1)
    assert ("aten::addmm_" in {e.name for e in prof.events()}) == blas_runs_full_width()
    want = torch.ops.aten.convolution_backward(gy.double(), x.double(), torch.zeros(64, 4, 3, dtype=torch.float64),
                                               None, [1], [1], [1], False, [0], 1, [False, True, False])[1]
    # (sums of 3232 products of magnitude ~57: float32 to 1e-3, float64 to 1e-10)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), want, rtol=tolerance / 100, atol=tolerance)


# (N, C_in, C_out, L, K, stride, groups) and where auto runs each op (forward, input gradient, weight gradient):
# "library" (ATen's convolution), "direct" (our kernels) or "gemm" (a matrix product through BLAS); a pair where it
# depends on the CPU: (where the products run as wide as oneDNN, elsewhere), or ("avx512", where our kernels run
# their AVX-512 build, elsewhere)
ROUTES = [
    # dense layers' weight gradients: our tiled product (dense_weight_gradient: 1-4 groups, >= 8 channels each way)
    # the dense TCN: wide products (reductions of 384: ours forward and back where they run AVX-512), long rows
    ((4, 128, 128, 1024, 3, 1, 1), (("avx512", "direct", "library"), ("avx512", "direct", "library"), "direct")),
    ((2, 256, 256, 200, 3, 2, 1), ("library", "library", "direct")),  # wide, strided (wav2vec2), shorter rows
    ((4, 256, 2, 256, 3, 1, 1), ("direct", "direct", "direct")),  # few outputs forward, a short reduction back
    ((2, 8, 256, 1024, 9, 1, 1), ("direct", "direct", "direct")),  # short reductions, long rows (> 1 image)
    ((8, 64, 64, 6, 3, 1, 1), ("direct", "direct", "direct")),  # < 1M multiply-adds
    # keyword spotting: short rows, batch 32 (its weight gradient the tiled product's); with 4 input channels, outside
    # the tiled product: the matrix product where it runs as wide as oneDNN
    ((32, 40, 64, 101, 3, 1, 1), ("direct", ("avx512", "direct", "library"), "direct")),
    ((64, 4, 128, 100, 5, 1, 1), ("direct", "direct", ("gemm", "direct"))),
    ((8, 256, 16, 300, 3, 1, 1), ("library", "direct", "direct")),  # few outputs from a long reduction
    ((8, 1024, 512, 9, 5, 5, 8), ("library", "library", "library")),  # 8 groups of 128->64: 655k multiply-adds each
    ((1, 8, 256, 1024, 9, 1, 1), ("library", "library", "direct")),  # one small image: ATen's im2col GEMM
    # wav2vec2's first layer on one clip (its weight gradient ours since our kernel reads grad_output once at any
    # stride: 0.23 vs ATen's 0.49 ms)
    ((1, 1, 512, 16000, 10, 5, 1), ("direct", "library", "direct")),
    ((1, 24, 384, 273, 5, 2, 1), ("library", "library", "direct")),  # one small image at stride 2
    ((1, 16, 32, 1000, 3, 1, 1), ("direct", "library", "direct")),  # one small image at stride 1, a narrow product
    # pointwise layers: products outright (forward from >= 16 input channels; the weight gradient per sample from
    # rows of >= 64 positions, else by the rule above; where products run narrower, oneDNN's weight gradient into at
    # most 4/3 as many outputs as inputs from >= 1000 positions, pointwise_weight_gradient_is_onednns)
    ((8, 256, 256, 400, 1, 1, 1), (("gemm", "library"), ("gemm", "library"), ("gemm", "library"))),  # QuartzNet's
    ((32, 96, 32, 1000, 1, 1, 1), (("gemm", "direct"), ("gemm", "direct"), ("gemm", "library"))),  # few outputs
    ((16, 64, 128, 300, 1, 2, 1), (("gemm", "direct"), ("gemm", "library"), ("gemm", "direct"))),  # a strided shortcut
    ((4, 8, 64, 500, 1, 1, 1), ("direct", ("gemm", "direct"), ("gemm", "direct"))),  # a short reduction forward
    ((64, 32, 32, 20, 1, 1, 1), (("gemm", "direct"), ("gemm", "direct"), "direct")),  # short rows
    ((4, 64, 64, 300, 1, 1, 2), ("direct", "direct", "direct")),  # grouped: not a product
]

# the ATen op that reveals each path of each pyops op (none: our kernels)
PATH_OPS = {"forward": {"library": "aten::convolution", "gemm": "aten::bmm"},
            "input": {"library": "aten::convolution_backward", "gemm": "aten::bmm"},
            "weight": {"library": "aten::convolution_backward", "gemm": "aten::addmm_"}}


@pytest.mark.parametrize("config,routes", ROUTES, ids=str)
def test_each_op_takes_aten_where_its_own_product_is_wide(config, routes, monkeypatch):
    """Under auto on the CPU, each op goes to ATen's convolution by its own product (conv1d_use_library): forward
    and weight gradient by the layer's output channels and input channels x taps, the input gradient the other way
    round; with lower bars for the backward ops where ATen's kernel is its im2col GEMM (one image of <= 20480
    values), a multiply-add floor where it is oneDNN (and for the forward and input gradient, where our kernels run
    AVX-512, reductions of >= 512 unless the filter is pointwise or the groups more than 4), and the weight gradient
    of few positions. The weight gradient of dense layers (1-4 groups of >= 8 channels each way, >= 12 outputs x
    taps) is our tiled product whatever the rest; elsewhere it runs as one matrix product (aten::addmm_) where that is
    faster (cpu_weight_gradient_path): short rows that would be ours, and all but few outputs from long reductions
    that would be oneDNN's. A pointwise layer's ops are matrix products (pointwise_as_product: aten::bmm, the weight
    gradient's aten::addmm_); where those run narrower than oneDNN, its weight gradient into at most 4/3 as many
    outputs as inputs is oneDNN's (pointwise_weight_gradient_is_onednns). Checked by the ATen ops each pyops op calls (torch.profiler); values equal F.conv1d's
    in float64 either way."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "auto")
    n, cin, cout, length, k, stride, groups = config
    g = torch.Generator().manual_seed(8)
    x, w = rand((n, cin, length), torch.float32, "cpu", g), rand((cout, cin // groups, k), torch.float32, "cpu", g)
    b = rand((cout,), torch.float32, "cpu", g)
    args = (stride, k // 2, 1, groups)
    grad_out = rand(tuple(torch.nn.functional.conv1d(x, w, b, *args).shape), torch.float32, "cpu", g)
    here, avx512 = blas_runs_full_width(), pyops._C.cpu_kernel_isa() == "avx512"
    expected = {op: route if isinstance(route, str) else route[2 - avx512] if route[0] == "avx512" else
                route[0 if here else 1] for op, route in zip(("forward", "input", "weight"), routes)}
    calls = {"forward": lambda: torch.ops.pyops.conv1d(x, w, b, *args),
             "input": lambda: torch.ops.pyops.conv1d_backward_input(grad_out, w, length, *args),
             "weight": lambda: torch.ops.pyops.conv1d_backward_weight(grad_out, x, k, *args)}
    for op, call in calls.items():
        with torch.profiler.profile() as prof:
            call()
        names = {e.name for e in prof.events()}
        for path, name in PATH_OPS[op].items():
            assert (name in names) == (expected[op] == path), (config, op, name)
    ours, _ = forward_and_grads(pyops.conv1d, x, w, b, args, grad_out)
    want, _ = forward_and_grads(torch.nn.functional.conv1d, x.double(), w.double(), b.double(), args,
                                grad_out.double())
    for a, e in zip(ours, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * max(cin, cout) * k)


# --- conv1d_bias_act: the residual added and the activation applied as each path stores its output --------------

ACTIVATIONS = ACTIVATION_REFERENCES
# Every forward path: the ROUTES layers (library, direct, pointwise products) and short rows laid end to end, a
# strided staged window, a single channel, a depthwise layer, one position past a row's tiles.
ACT_LAYERS = [config for config, _ in ROUTES] + [(64, 8, 8, 20, 3, 1, 1), (4, 16, 16, 2000, 4, 2, 1),
                                                 (2, 1, 1, 4000, 9, 1, 1), (2, 32, 32, 301, 5, 1, 32),
                                                 (3, 5, 7, 25, 3, 1, 1), (4, 2, 64, 150, 33, 1, 1),
                                                 (2, 16, 16, 200, 31, 1, 16)]


def outputs_and_grads(fn, tensors, grad_out=None):
    """fn(*tensors) and the gradients of every tensor (x, w, b, residual), for grad_out (random if None)."""
    tensors = [t.detach().requires_grad_() for t in tensors]
    y = fn(*tensors)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    return [y, *torch.autograd.grad(y, tensors, grad_out)], grad_out


@pytest.mark.parametrize("activation,residual", [("relu", False), ("relu6", False), ("relu", True), ("relu6", True),
                                                 ("none", True), ("silu", False), ("hardswish", True),
                                                 ("hardsigmoid", True), ("sigmoid", False)])
@pytest.mark.parametrize("path", ["auto", "direct", "library", "gemm"])
def test_conv1d_bias_act_is_the_activation_of_the_same_convolution(device, activation, residual, path, monkeypatch):
    """Bit for bit act(pyops.conv1d(...) + residual) on the same path, forward and gradients: the residual is added
    to the finished sums and the activation applied wherever the output is stored (the direct kernel's tiles and
    edge loop, rows laid end to end with the residual laid alike, the pointwise products' bias pass, a pass after
    the library's call), and the backward is the same convolution backward of gy·act'(output), which is the
    residual's gradient too (ReLU6 clamps a fair share of these outputs: their scale is ~4); SiLU and Hardswish are
    ATen's pass after the op without them, forward and backward. On CUDA with cuDNN's deterministic algorithms: its
    default backward ones may sum with atomics, and the two sides are two calls."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    g = torch.Generator().manual_seed(21)
    act = ACTIVATIONS[activation]
    with deterministic_cudnn():
        for n, cin, cout, length, k, stride, groups in ACT_LAYERS:
            x = rand((n, cin, length), torch.float32, device, g)
            w = rand((cout, cin // groups, k), torch.float32, device, g) * (4 / math.sqrt(cin // groups * k))
            b = rand((cout,), torch.float32, device, g)
            args = (stride, k // 2, 1, groups)
            tensors = [x, w, b]
            if residual:
                tensors.append(rand(tuple(F.conv1d(x[:1], w, None, *args).shape[1:]), torch.float32, device, g)
                               .expand(n, -1, -1).contiguous() * 2)
            ours, gy = outputs_and_grads(lambda x, w, b, *r: pyops.conv1d_bias_act(
                x, w, b, *args, activation=activation, residual=r[0] if r else None), tensors)
            same, _ = outputs_and_grads(lambda x, w, b, *r: act(pyops.conv1d(x, w, b, *args) + (r[0] if r else 0)),
                                        tensors, gy)
            if activation in ("relu", "relu6"):
                assert (ours[0] == 0).any() and (activation == "relu" or (ours[0] == 6).any())
            for name, a, e in zip(["output", "grad_input", "grad_weight", "grad_bias", "grad_residual"], ours, same):
                assert torch.equal(a, e), (path, (n, cin, cout, length, k, stride, groups), name)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", random_configs(12, seed=22), ids=str)
def test_conv1d_bias_act_matches_torch(device, dtype, activation, config):
    """Against the float64 reference, with a residual on every other layer (and its gradient)."""
    n, cin, cout, length, k, stride, padding, dilation, groups, bias = config
    g = torch.Generator().manual_seed(hash(config) % 10000)
    x, w = rand((n, cin, length), dtype, device, g), rand((cout, cin // groups, k), dtype, device, g) * 3
    b = rand((cout,), dtype, device, g) if bias else None
    hyper = (stride, padding, dilation, groups)
    assert_matches_torch(x, w, b, hyper, dtype, ours=lambda *a: pyops.conv1d_bias_act(*a, activation=activation),
                         reference=lambda *a: reference.conv1d_bias_act(*a, activation=activation))
    r = rand(tuple(F.conv1d(x.cpu().double(), w.cpu().double(), None, *hyper).shape), dtype, device, g)
    ours, gy = outputs_and_grads(lambda x, w, r: pyops.conv1d_bias_act(x, w, None, *hyper, activation, r), [x, w, r])
    want, _ = outputs_and_grads(lambda x, w, r: reference.conv1d_bias_act(x, w, None, *hyper, activation, r),
                                [t.cpu().double() for t in (x, w, r)], gy.cpu().double())
    rtol, atol = tolerances(dtype)
    for name, o, e in zip(["output", "grad_input", "grad_weight", "grad_residual"], ours, want):
        assert o.dtype == dtype and o.device == x.device, name
        torch.testing.assert_close(o.double().cpu(), e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", ["auto", "direct", "library", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_bias_act_keeps_nan_and_half_precision(device, path, dtype, monkeypatch):
    """NaN stays NaN, and -0 stays -0, through every activation (as torch.relu, F.relu6, F.silu, ... keep them), with
    and without a residual; in bfloat16 (computed in float32 on the CPU) the activation of the rounded result is the
    rounded activation (the activations but ReLU and ReLU6 are a pass after the convolution: the same ATen kernels).
    Dense, pointwise, small, depthwise and single-channel layers: each kind of the direct path's tiles."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", path)
    g = torch.Generator().manual_seed(23)
    negative_zeros = 0
    for n, cin, cout, length, k, groups in [(2, 64, 64, 300, 3, 1), (4, 32, 32, 200, 1, 1), (8, 4, 4, 30, 3, 1),
                                            (2, 16, 16, 300, 4, 16), (3, 1, 1, 500, 9, 1)]:
        x, w = rand((n, cin, length), dtype, device, g), rand((cout, cin // groups, k), dtype, device, g)
        b = rand((cout,), dtype, device, g)
        x[0, 0, 17] = float("nan")
        x[-1], b[0] = -0.0, -0.0  # (-0 inputs times the weights sum to -0 where the bias is -0)
        plain = pyops.conv1d(x, w, b, 1, k // 2, 1, groups)
        negative_zeros += ((plain == 0) & plain.signbit()).sum().item()
        residual = rand(plain.shape, dtype, device, g)
        residual[-1] = -0.0
        for activation, act in ACTIVATIONS.items():
            # (a bfloat16 residual is added after rounding by the reference, before it by the op)
            for r in (None, residual) if dtype == torch.float32 else (None,):
                got = pyops.conv1d_bias_act(x, w, b, 1, k // 2, 1, groups, activation=activation, residual=r)
                want = act(plain if r is None else plain + r)
                assert got.dtype == dtype and got[0, :cout // groups, 17].isnan().all()
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
                assert torch.equal(got.signbit(), want.signbit())
    # (our kernels sum from the bias, which keeps -0; a library's sums may start from +0)
    assert negative_zeros > 0 or path in ("library", "gemm")


def test_conv1d_bias_act_gradcheck_opcheck_compile(device):
    g = torch.Generator().manual_seed(24)
    for activation, code in [(a, c) for a, c in pyops.activations.ACTIVATIONS.items() if a != "none"]:
        for cin, cout, k, length, stride, padding, groups in [(4, 6, 3, 23, 1, 1, 1), (4, 4, 3, 23, 2, 2, 4),
                                                             (20, 6, 1, 70, 1, 0, 1)]:
            x = rand((2, cin, length), device=device, gen=g).requires_grad_()
            w = (rand((cout, cin // groups, k), device=device, gen=g) * 3).requires_grad_()
            b = rand((cout,), device=device, gen=g).requires_grad_()
            hyper = (stride, padding, 1, groups)
            r = rand(tuple(F.conv1d(x, w, b, *hyper).shape), device=device, gen=g).requires_grad_()
            torch.library.opcheck(ops.conv1d_bias_act, (x, w, b, *hyper, code))
            torch.library.opcheck(ops.conv1d_bias_act, (x, w, None, *hyper, code, r))
            fn = lambda x, w, b, r: pyops.conv1d_bias_act(x, w, b, *hyper, activation, r)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x, w, b, r))
            gradgradcheck_like_torch(fn, (x, w, b, r), activation)
            assert torch.autograd.gradcheck(lambda x, w: fn(x, w, None, None), (x, w))
        compiled = torch.compile(lambda x, w, b, r: fn(x, w, b, r).sin().sum(), fullgraph=True)
        got = torch.autograd.grad(compiled(x, w, b, r), (x, w, b, r))
        want = torch.autograd.grad(fn(x, w, b, r).sin().sum(), (x, w, b, r))
        # (ATen's eager hardsigmoid_backward multiplies by 1/6 rounded to float32 also in float64, inductor's
        # decomposition by the double 1/6: F.hardsigmoid compiled alone differs from eager by as much, ~3e-8)
        rtol = 1e-7 if activation == "hardsigmoid" else 1e-10
        for a, c in zip(got, want):
            torch.testing.assert_close(a, c, rtol=rtol, atol=rtol / 100)


def test_conv1d_bias_act_names_a_bad_activation(device):
    x, w = rand((2, 4, 10), device=device), rand((3, 4, 3), device=device)
    with pytest.raises(ValueError, match="'activation' must be one of"):
        pyops.conv1d_bias_act(x, w, activation="gelu")
    with pytest.raises(ValueError, match="argument 'activation' must be 0"):
        ops.conv1d_bias_act(x, w, None, 1, 0, 1, 1, len(pyops.activations.ACTIVATIONS))
    with pytest.raises(ValueError, match="channel mismatch"):  # the convolution's checks, as pyops.conv1d's
        pyops.conv1d_bias_act(x, rand((3, 5, 3), device=device))
    with pytest.raises(ValueError, match=r"'residual' must have the output's shape \(2, 3, 8\), got \(2, 3, 10\)"):
        pyops.conv1d_bias_act(x, w, residual=rand((2, 3, 10), device=device))
    with pytest.raises(ValueError, match=r"'residual' must have the output's shape \(3, 8\)"):
        pyops.conv1d_bias_act(x[0], w, residual=rand((2, 3, 8), device=device))
    with pytest.raises(TypeError, match="'residual' has dtype torch.float32"):
        pyops.conv1d_bias_act(x, w, residual=rand((2, 3, 8), torch.float32, device))
    with pytest.raises(TypeError, match="'residual' must be a torch.Tensor"):
        pyops.conv1d_bias_act(x, w, residual=1.0)
    with pytest.raises(ValueError, match="argument 'residual' must have the output's shape"):  # the op's own check
        ops.conv1d_bias_act(x, w, None, 1, 0, 1, 1, 1, rand((2, 3, 1), device=device))
    unbatched = pyops.conv1d_bias_act(x[0], w, residual=rand((3, 8), device=device))
    assert unbatched.shape == (3, 8)
