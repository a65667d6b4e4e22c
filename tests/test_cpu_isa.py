"""The CPU kernels' instruction sets (csrc/common/cpu_isa.h): the kernel files are built twice, for the base vectors
(AVX2 or portable) and, where setup.py can, for AVX-512, chosen at run time. The rest of the suite runs whichever this
CPU selects; here every instruction set this build and CPU can run computes randomized layers on our own kernels
(PYOPS_CONV1D_PATH / PYOPS_CONV_PATH = direct) and smooth_max against float64 references, and the built library is
checked for AVX-512 code reachable from the base build (an illegal instruction on CPUs without it)."""
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyops
from pyops import _C
from pyops.conv_bn_relu import conv2d_bias_act
from conftest import tolerances

ISAS = _C.cpu_kernel_isas().split(",")


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.cpu_kernel_isa()
    _C.set_cpu_kernel_isa(request.param)
    yield request.param
    _C.set_cpu_kernel_isa(before)


def test_isa_choices():
    assert ISAS[0] in ("avx2", "default") and set(ISAS) <= {ISAS[0], "avx512"}
    assert _C.cpu_kernel_isa() in ISAS
    with pytest.raises(ValueError, match="sse4.*choose one of"):
        _C.set_cpu_kernel_isa("sse4")
    info = _C.build_info()
    assert info["cpu_vector"] == ISAS[0]
    if "avx512" in ISAS:
        assert info["cpu_avx512_kernels"]


def test_bad_environment_value_names_the_variable():
    script = "import torch, pyops; pyops.conv1d(torch.randn(2, 3, 50), torch.randn(4, 3, 3))"
    env = {"PYOPS_CPU_ISA": "neon", "PYOPS_CONV1D_PATH": "direct", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "PYOPS_CPU_ISA" in run.stderr and "neon" in run.stderr


# One row per group on long rows, where the weight gradient takes the AVX-512 build (conv1d_cpu.cpp):
# (batch, cin, length, cout, k, stride, padding, dilation, groups)
LONG_ROWS = [(3, 16, 1000, 16, 4, 1, 3, 1, 16), (5, 1, 2000, 1, 9, 1, 4, 1, 1), (2, 8, 1500, 8, 5, 2, 2, 1, 8),
             (4, 24, 777, 24, 3, 1, 2, 2, 24)]


def conv1d_configs(count, seed):
    if seed == 0:
        yield from LONG_ROWS
    rng = random.Random(seed)
    for _ in range(count):
        groups = rng.choice([1, 1, 2, 4, "depthwise"])
        cin = rng.choice([1, 4, 8, 12, 16]) if groups != "depthwise" else rng.choice([3, 16, 40])
        groups = cin if groups == "depthwise" else (groups if cin % groups == 0 else 1)
        cout = cin if groups == cin else groups * rng.choice([1, 3, 5, 8, 17])
        k, stride, dilation = rng.choice([1, 2, 3, 4, 5, 9]), rng.choice([1, 1, 2, 3, 5]), rng.choice([1, 1, 2])
        padding = rng.randrange(0, dilation * (k - 1) + 2)
        length = dilation * (k - 1) + 1 - 2 * padding + rng.choice([0, 1, 7, 33, 100, 257, 700])
        batch = rng.choice([1, 3, 40])
        yield batch, cin, max(length, 1 + max(0, dilation * (k - 1) - 2 * padding)), cout, k, stride, padding, \
            dilation, groups


def assert_conv1d_matches(config, dtype, gen, isa):
    """pyops.conv1d's output and three gradients vs F.conv1d's in float64 for one layer
    (batch, cin, length, cout, k, stride, padding, dilation, groups)."""
    n, cin, length, cout, k, stride, padding, dilation, groups = config
    rtol, atol = tolerances(dtype)
    x = torch.randn(n, cin, length, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, k, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    args = (stride, padding, dilation, groups)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = F.conv1d(xr, wr, br, *args)
    gy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (xr, wr, br), gy)
    xo, wo, bo = (t.to(dtype).requires_grad_() for t in (x, w, b))
    out = pyops.conv1d(xo, wo, bo, *args)
    grads = torch.autograd.grad(out, (xo, wo, bo), gy.to(dtype))
    label = f"{isa} {dtype} x{tuple(x.shape)} w{tuple(w.shape)} s/p/d/g {args}"
    # (sums of up to cin*k*n*length products: the tolerance scales with their magnitude)
    scale = (cin // groups) * k * max(1, n * ref.shape[-1] // 64)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol * scale, msg=label)
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale, msg=f"grad_{name} {label}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_conv1d_kernels(isa, seed, dtype, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    gen = torch.Generator().manual_seed(seed)
    for config in conv1d_configs(12, seed):
        assert_conv1d_matches(config, dtype, gen, isa)


# Dense layers, whose weight gradient is the tiled product (conv1d_cpu_weight_dense.cpp; dense_weight_gradient: 1-4
# groups of >= 8 channels each way, >= 12 outputs x taps): output channels that leave a partial block of the tile's 6
# rows (13, 20, 9), input channels that are not whole vectors (its zero channels: 12, 20, 40, 9 a group), rows 1 KB
# apart (256 channels: the pitch's extra vector), strides 2 and 3, dilation, padding wider than the filter (taps
# reading only zeros), 1-3 groups, several chunks of positions (> 256 outputs) and of samples (a sample of > 1 MB),
# one output position, short rows.
# (batch, cin, length, cout, k, stride, padding, dilation, groups)
DENSE_WEIGHT = [(3, 24, 300, 13, 3, 1, 1, 1, 1), (2, 40, 517, 20, 5, 2, 4, 2, 1), (3, 256, 1100, 16, 3, 1, 1, 1, 1),
                (4, 64, 90, 48, 4, 3, 6, 1, 2), (2, 27, 33, 27, 7, 1, 9, 1, 3), (5, 12, 20, 9, 2, 1, 0, 1, 1),
                (2, 32, 5, 64, 5, 1, 0, 1, 1), (64, 16, 12, 32, 3, 2, 1, 3, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv1d_dense_weight_kernel(isa, dtype, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "direct")
    gen = torch.Generator().manual_seed(37)
    for config in DENSE_WEIGHT:
        assert_conv1d_matches(config, dtype, gen, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_conv2d_direct_kernel(isa, dtype, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV_PATH", "direct")
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    rtol, atol = tolerances(dtype)
    for _ in range(16):
        groups = rng.choice([1, 1, 2, "depthwise"])
        cin = rng.choice([3, 4, 8, 16])
        groups = cin if groups == "depthwise" else (groups if cin % groups == 0 else 1)
        cout = groups * rng.choice([1, 2, 5, 8])
        k, stride, padding = rng.choice([1, 3, 5]), rng.choice([1, 2]), rng.choice([0, 1, 2])
        h, w = rng.choice([5, 17, 32]), rng.choice([7, 31, 32, 45])
        x = torch.rand(rng.choice([1, 2]), cin, h, w, generator=gen, dtype=torch.float64)
        wt = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=torch.float64) * 0.3
        b, g, beta = (torch.randn(cout, generator=gen, dtype=torch.float64) for _ in range(3))
        mean, var = torch.randn(cout, generator=gen, dtype=torch.float64), torch.rand(cout, generator=gen,
                                                                                     dtype=torch.float64) + 0.5
        ref = F.batch_norm(F.conv2d(x, wt, b, stride, padding, 1, groups), mean, var, g, beta, False, 0.0, 1e-5)
        residual = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        ref = torch.relu(ref + residual)
        cast = [t.to(dtype) for t in (x, wt, b, g, beta)]
        out = pyops.conv2d_bn_relu(cast[0], cast[1], cast[2], cast[3], cast[4], mean.to(dtype), var.to(dtype),
                                   1e-5, stride, padding, 1, groups, residual=residual.to(dtype))
        scale = (cin // groups) * k * k
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * scale,
                                   msg=f"{isa} {dtype} x{tuple(x.shape)} w{tuple(wt.shape)} s{stride} p{padding}")


# Layers that reach each register tile of the 2-D direct kernel (direct_tile in conv_bn_relu.h: 1×4, 4×3 and, in the
# AVX-512 build, 8×3, with and without padding channels in the last block) and each way its tasks run: flat along the
# padded copy (stride 1; output rows narrower than a vector, so one vector spans several rows and their padding
# columns; dilation; a kernel (1, 5)), one output row each (row stride 2 on the padded copy; column stride 2
# gathered; a padding too wide for the copy), channels_last outputs and a residual view that is not contiguous.
# (batch, cin, cout, kernel, stride, padding, dilation, groups, h, w, channels_last, residual_view)
DIRECT_LAYERS = [
    (1, 96, 24, (3, 3), 1, 1, 1, 1, 9, 11, False, False),       # 8×3 / 4×3 on a reduction of 864
    (2, 800, 36, (1, 1), 1, 0, 1, 1, 5, 6, False, False),       # 8×3 with 4 padding channels / 4×3
    (3, 5, 12, (3, 3), 1, 1, 1, 1, 4, 3, False, True),          # 4×3; padded rows of 5 columns
    (2, 6, 16, (3, 3), 1, (2, 3), (2, 3), 1, 13, 17, False, False),  # 8×3 (AVX-512); dilated
    (2, 8, 9, (1, 5), 1, (0, 2), 1, 1, 6, 20, False, True),
    (2, 8, 16, (3, 3), (2, 1), 1, 1, 1, 11, 19, False, False),  # padded copy, one row a task
    (2, 8, 16, (3, 3), (1, 2), 1, 1, 1, 11, 19, False, True),   # gathered
    (2, 12, 24, (3, 3), 1, 1, 1, 3, 15, 15, False, False),
    (2, 16, 32, (3, 3), 1, 1, 1, 1, 10, 10, True, False),
    (1, 4, 8, (3, 3), 1, 4, 1, 1, 3, 3, False, False),          # padding too wide for the copy: gathered
    (5, 3, 16, (3, 3), 1, 1, 1, 1, 32, 32, False, True),
    (2, 6, 6, (3, 3), 1, 1, 1, 6, 9, 40, False, True),          # depthwise: 1×4
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_conv2d_direct_tiles_and_tasks(isa, dtype, monkeypatch):
    monkeypatch.setenv("PYOPS_CONV_PATH", "direct")
    gen = torch.Generator().manual_seed(7)
    rtol, atol = tolerances(dtype)
    for n, cin, cout, kernel, stride, padding, dilation, groups, h, w, channels_last, view in DIRECT_LAYERS:
        x = torch.rand(n, cin, h, w, generator=gen, dtype=torch.float64)
        wt = torch.randn(cout, cin // groups, *kernel, generator=gen, dtype=torch.float64) / (cin // groups) ** 0.5
        b = torch.randn(cout, generator=gen, dtype=torch.float64)
        ref = F.conv2d(x, wt, b, stride, padding, dilation, groups)
        # (a residual view: every other column of a wider tensor)
        residual = torch.randn(*ref.shape[:3], 2 * ref.shape[3], generator=gen, dtype=torch.float64)
        residual = residual[..., ::2] if view else residual[..., :ref.shape[3]].contiguous()
        ref = torch.relu(ref + residual)
        xo = x.to(dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out = conv2d_bias_act(xo, wt.to(dtype), b.to(dtype), stride, padding, dilation, groups, "relu",
                              residual=residual.to(dtype))
        label = f"{isa} {dtype} x{tuple(x.shape)} w{tuple(wt.shape)} s{stride} p{padding} d{dilation} g{groups}"
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last, label
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * wt[0].numel() ** 0.5, msg=label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_smooth_max_kernels(isa, dtype, dim):
    gen = torch.Generator().manual_seed(5)
    rtol, atol = tolerances(dtype)
    for shape, beta in (((37, 1000, 3), 2.5), ((5, 17, 300), -0.7), ((2, 4099, 1), 40.0)):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype).double()
        ref = torch.logsumexp(beta * x, dim=dim) / beta
        xo = x.to(dtype).requires_grad_()
        out = pyops.smooth_max(xo, beta, dim=dim)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, xo, grad_out.to(dtype))
        ref_grad = torch.softmax(beta * x, dim=dim) * grad_out.unsqueeze(dim)
        label = f"{isa} {dtype} {shape} dim={dim} beta={beta}"
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * 10, msg=label)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol * 10, msg=f"grad {label}")


def functions_with_evex_code(library):
    """Demangled names of the library's functions that hold EVEX-encoded (AVX-512) instructions."""
    listing = subprocess.run(["objdump", "-d", "-C", library], capture_output=True, text=True, check=True).stdout
    names, current = set(), None
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = head.group(1)
        elif current and re.match(r"^\s*[0-9a-f]+:\t62 ", line):  # (0x62 opens an EVEX prefix in 64-bit code)
            names.add(current)
    return names


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump (present wherever pyops builds)")
def test_avx512_code_only_in_the_avx512_build():
    evex = functions_with_evex_code(_C.__file__)
    if not _C.build_info()["cpu_avx512_kernels"]:
        assert not evex
        return
    # AVX-512 code belongs to the twins' namespace, to at::vec's AVX512 one, or to a clone local to a twin's object
    # ("[clone .constprop.0]" and the like: only that object calls it). An inline function both builds emit
    # out of line (std::vector's constructor) with AVX-512 code here means the linker kept the twin's copy.
    assert any("cpu_avx512" in name for name in evex)
    stray = sorted(n for n in evex if "cpu_avx512" not in n and "AVX512" not in n and "[clone ." not in n)
    assert not stray, f"AVX-512 code outside the AVX-512 kernels (link order, setup.py): {stray[:10]}"
