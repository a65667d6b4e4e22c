"""pyops.conv2d_bn_relu and conv2d_bias_act against float64 references, on every main loop (PYOPS_CONV_PATH)."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import pyops
from pyops import reference
from pyops.conv_bn_relu import ACTIVATIONS, conv2d_bias_act
from conftest import blas_runs_full_width, tolerances

ISAS = pyops._C.cpu_kernel_isas().split(",")

PATHS = {"cpu": ["direct", "library"], "cuda": ["ours", "cudnn"]}


@pytest.fixture(params=[0, 1], ids=["path0", "path1"])
def path(request, device, monkeypatch):
    """Forces each main loop of the device in turn (CPU: direct, library; CUDA: ours, cudnn)."""
    name = PATHS[device][request.param]
    monkeypatch.setenv("PYOPS_CONV_PATH", name)
    return name


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale


def assert_close_float32(out, ref):
    """A float32 result within float32 tolerance of its float64 reference (sums of a few hundred products: an atol
    of 50 units of rtol), NaN where the reference has NaN."""
    rtol, atol = tolerances(torch.float32)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=max(atol, rtol * 50.0), equal_nan=True)


def random_case(seed):
    """A seeded random convolution: stride, padding, dilation, groups (incl. depthwise), optional parts."""
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 3, "depthwise"])
    cin_g = 1 if groups == "depthwise" else rng.randint(1, 5)
    groups = rng.randint(2, 6) if groups == "depthwise" else groups
    cout_g = 1 if cin_g == 1 and rng.random() < 0.5 else rng.randint(1, 6)
    k = (rng.randint(1, 5), rng.randint(1, 5))
    stride, padding, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(0, 2), rng.randint(0, 2)), \
        (rng.randint(1, 2), rng.randint(1, 2))
    size = [max(rng.randint(3, 14), dilation[i] * (k[i] - 1) + 1 - 2 * padding[i]) for i in range(2)]
    cin, cout = cin_g * groups, cout_g * groups
    t = dict(
        x=randn((rng.randint(1, 3), cin, *size), seed), weight=randn((cout, cin_g, *k), seed + 1, 0.5),
        bias=randn((cout,), seed + 2) if rng.random() < 0.6 else None,
        bn_weight=randn((cout,), seed + 3) if rng.random() < 0.7 else None,
        running_mean=randn((cout,), seed + 5), running_var=torch.rand(cout, generator=gen(seed + 6), dtype=torch.float64) + 0.3)
    t["bn_bias"] = randn((cout,), seed + 4) if t["bn_weight"] is not None else None
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out_shape = reference.conv2d_bias_act(t["x"], t["weight"], None, activation="none", **conv).shape
    t["residual"] = randn(out_shape, seed + 7) if rng.random() < 0.5 else None
    return t, dict(conv, eps=rng.choice([1e-5, 1e-3]), relu=rng.random() < 0.8)


def cast(tensors, dtype, device):
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in tensors.items()}


def magnitude(t, kw):
    """Largest Σ|term| of any output: the scale fp rounding errors are relative to."""
    ab = {k: (v.abs() if v is not None else None) for k, v in t.items()}
    scale = (ab["bn_weight"] if ab["bn_weight"] is not None else 1) / (t["running_var"] + kw["eps"]).sqrt()
    w = ab["weight"] * torch.as_tensor(scale).reshape(-1, 1, 1, 1)
    conv = {k: kw[k] for k in ("stride", "padding", "dilation", "groups")}
    return float(F.conv2d(ab["x"], w, None, **conv).abs().max()) + 10.0


def check_close(out, ref, dtype, mag):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=rtol, atol=max(atol, rtol * mag))


@pytest.mark.parametrize("seed", range(24))
def test_conv2d_bn_relu_matches_float64_reference(device, path, seed):
    t, kw = random_case(seed)
    ref = reference.conv2d_bn_relu(**t, **kw)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        # reduced precision: the reference sees the same rounded inputs; the statistics stay float32
        td = cast(t, dtype, device)
        for k in ("bn_weight", "bn_bias", "running_mean", "running_var"):
            if td[k] is not None and dtype in (torch.float16, torch.bfloat16):
                td[k] = t[k].to(device=device, dtype=torch.float32)
        out = pyops.conv2d_bn_relu(**td, **kw)
        assert out.shape == ref.shape and out.dtype == dtype and out.device.type == device
        ref_d = reference.conv2d_bn_relu(**{k: (v.double().cpu() if v is not None else None) for k, v in td.items()},
                                         **kw)
        check_close(out, ref_d, dtype, magnitude(t, kw))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "silu"])
def test_one_by_one_layers_as_a_matrix_product(threads, activation, monkeypatch):
    """A float32 1×1 layer runs as a matrix product under PYOPS_CONV_PATH=auto where that beats oneDNN's call
    (pyops._C.one_by_one_runs_as_gemm: few positions or a small product, NCHW images of >= 196 positions, 1×1 maps;
    the packed op too), the epilogue after it in one pass: bias (or none), residual (NCHW, channels_last or a
    strided view), activation, a NaN kept as torch.relu keeps it (oneDNN's fused ReLU makes it 0, so a case that
    went to oneDNN fails), strided inputs and weights; the op's layout rule kept (the packed op: always
    channels_last)."""
    monkeypatch.setenv("PYOPS_CONV_PATH", "auto")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # (n, cin, cout, h, w)
        shapes = [(1, 116, 116, 12, 13), (1, 5, 7, 1, 2), (1, 64, 32, 1, 1), (3, 24, 58, 9, 10),
                  (1, 116, 116, 14, 15), (8, 64, 32, 1, 1), (32, 64, 32, 1, 1), (2, 1, 16, 8, 8), (16, 8, 12, 14, 14)]
        for n, cin, cout, h, w_ in shapes:
            x, w = randn((n, cin, h, w_), 31, 2.0), randn((cout, cin, 1, 1), 32, 0.3)
            b, r = randn((cout,), 33), randn((n, cout, h, w_), 34)
            x[0, 0, 0, 0] = float("nan")
            strided_residual = torch.zeros(n, cout, h, 2 * w_, dtype=r.dtype)
            strided_residual[..., ::2] = r
            strided_residual = strided_residual[..., ::2]
            for bias, residual in [(b, r), (None, None), (b, r.contiguous(memory_format=torch.channels_last)),
                                   (None, strided_residual)]:
                ref = reference.conv2d_bias_act(x, w, bias, activation=activation, residual=residual)
                f32 = lambda t: None if t is None else t.float()  # noqa: E731
                spread = torch.zeros(n, cin, h, 2 * w_)
                spread[..., ::2] = x.float()
                transposed_weight = w.float().reshape(cout, cin).t().contiguous().t().reshape(cout, cin, 1, 1)
                channels_last = x.float().contiguous(memory_format=torch.channels_last)
                packed = torch.ops.pyops.conv2d_pack_weight(channels_last, w.float(), [1, 1], [0, 0], [1, 1], 1)
                for xi, wi in [(x.float(), w.float()), (spread[..., ::2], transposed_weight),
                               (channels_last, w.float()), (channels_last, packed)]:
                    if wi.is_mkldnn:
                        out = torch.ops.pyops.conv2d_bias_act_packed(
                            xi, w.float(), wi, f32(bias), [1, 1], [0, 0], [1, 1], 1, ACTIVATIONS[activation],
                            f32(residual))
                        assert out.is_contiguous(memory_format=torch.channels_last)
                    else:
                        out = conv2d_bias_act(xi, wi, f32(bias), activation=activation, residual=f32(residual))
                        cl = xi.is_contiguous(memory_format=torch.channels_last) and not xi.is_contiguous()
                        assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                    assert_close_float32(out, ref)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "hardswish"])
def test_small_images_never_reach_onednn(threads, activation, monkeypatch):
    """Under PYOPS_CONV_PATH=auto a float32 image that ATen's own convolution gives to its im2col GEMM (one image of
    at most 20480 values (channels_last: 10240), one group, a kernel up to 3 wide in some dimension; dilated ones
    with at most 64 output positions, either layout up to 20480 values) runs that GEMM with our epilogue after it, or
    our direct kernel where its rule takes the layer: never oneDNN, whose ~40 µs a call made such layers 2-3x slower
    than eager. Each input has a NaN, kept by ours as torch.relu keeps it (oneDNN's fused ReLU makes it 0, so a case
    that went to oneDNN fails); bias or none, residual in any layout, strided inputs, the layout rule kept."""
    monkeypatch.setenv("PYOPS_CONV_PATH", "auto")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # (cin, cout, (kh, kw), (h, w), stride, padding, dilation)
        cases = [(16, 16, (3, 3), (4, 4), 1, 1, 1), (32, 32, (3, 3), (7, 7), 1, 1, 1),
                 (48, 40, (3, 3), (14, 14), 1, 1, 1), (8, 16, (3, 3), (14, 14), 2, 1, 1),
                 (64, 64, (3, 3), (7, 7), 1, 1, 1), (10, 8, (1, 5), (32, 32), 1, (0, 2), 1),
                 (5, 7, (3, 2), (2, 3), 1, 2, 1), (3, 16, (3, 3), (32, 32), 1, 1, 1), (512, 24, (3, 3), (2, 2), 1, 1, 1),
                 (24, 128, (3, 3), (8, 8), 1, 0, 2), (48, 48, (3, 3), (5, 5), 2, 0, 2), (8, 128, (3, 3), (14, 14), 3, 0, 2),
                 (384, 16, (3, 3), (2, 2), 1, 4, 4), (128, 8, (3, 3), (8, 8), 1, 2, 2),
                 (80, 16, (3, 3), (16, 16), 2, 2, 2), (256, 32, (3, 1), (8, 8), 1, (2, 0), (2, 1))]
        for i, (cin, cout, k, (h, w_), stride, padding, dilation) in enumerate(cases):
            x, w, b = randn((1, cin, h, w_), 60 + i, 2.0), randn((cout, cin, *k), 70 + i, 0.3), randn((cout,), 80 + i)
            x[0, cin // 2, h // 2, w_ // 2] = float("nan")
            conv = dict(stride=stride, padding=padding, dilation=dilation)
            ref_shape = reference.conv2d_bias_act(x, w, None, **conv, activation="none").shape
            r = randn(ref_shape, 90 + i)
            spread = torch.zeros(1, cin, h, 2 * w_)
            spread[..., ::2] = x.float()
            for xi in (x.float(), x.float().contiguous(memory_format=torch.channels_last), spread[..., ::2]):
                for bias, residual in [(b, None), (None, r), (b, r.contiguous(memory_format=torch.channels_last))]:
                    f32 = lambda t: None if t is None else t.float()  # noqa: E731
                    out = conv2d_bias_act(xi, w.float(), f32(bias), **conv, activation=activation,
                                          residual=f32(residual))
                    ref = reference.conv2d_bias_act(x, w, bias, **conv, activation=activation, residual=residual)
                    cl = xi.is_contiguous(memory_format=torch.channels_last) and not xi.is_contiguous()
                    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                    assert out.isnan().any()
                    assert_close_float32(out, ref)
    finally:
        torch.set_num_threads(before)


def test_grouped_short_reductions_on_nchw_take_the_direct_kernel(monkeypatch):
    """Grouped layers with fewer than 32 taps a reduction on NCHW inputs run our direct kernel under auto (oneDNN's
    NCHW grouped convolution was 2.5-2.8x slower on them), where the CPU's rule would otherwise call oneDNN (seen by
    the profiler); channels_last inputs keep oneDNN. Values equal the float64 reference, a NaN kept (oneDNN's fused
    ReLU makes it 0: documented)."""
    monkeypatch.setenv("PYOPS_CONV_PATH", "auto")
    # (n, cin, cout, k, stride, groups, h)
    # (more than 3.1M multiply-adds: the rule for small products would take them either way)
    for n, cin, cout, k, stride, groups, h in [(8, 24, 128, 3, 2, 8, 38), (4, 64, 128, 3, 1, 32, 23),
                                               (8, 64, 64, 1, 1, 4, 24)]:
        x, w = randn((n, cin, h, h), 95, 2.0), randn((cout, cin // groups, k, k), 96, 0.3)
        b = randn((cout,), 97)
        x[0, 0, h // 2, h // 2] = float("nan")
        conv = dict(stride=stride, padding=k // 2, groups=groups)
        ref = reference.conv2d_bias_act(x, w, b, **conv)
        for fmt in (torch.contiguous_format, torch.channels_last):
            with torch.profiler.profile() as prof:
                out = conv2d_bias_act(x.float().contiguous(memory_format=fmt), w.float(), b.float(), **conv)
            onednn = any(e.name == "mkldnn::_convolution_pointwise" for e in prof.events())
            assert onednn == (fmt == torch.channels_last)
            if fmt == torch.contiguous_format:
                assert out.isnan().any()
                assert_close_float32(out, ref)


@pytest.mark.skipif("avx512" not in ISAS,
                    reason="the rule of CPUs whose kernels run AVX-512 (this one's cannot)")
def test_stride_one_layers_take_the_avx512_direct_kernel(monkeypatch):
    """Where our kernels run AVX-512, NCHW layers at stride 1 take the direct kernel under auto by its own rule
    (conv_bn_relu_cpu.cpp, flat_avx512_direct_is_faster), 1×1 layers ahead of the GEMM's rule: ResNet-50's 64→64 1×1
    on 56×56, a small 1×1 product the GEMM took, a 3×3 layer above stop 35's sizes, a layer into 104 channels (oneDNN's
    blocks of 16 part empty); small maps where under 60 % of the kernel's columns are outputs, large products on 67 %
    (a 7×7 kernel's padding on a 16×16 map) and on 91 % (ResNet's 128→128 3×3 on 28×28), wider layers and
    channels_last inputs keep oneDNN, and so does 64→64 1×1 with the AVX2 build selected (seen by the profiler).
    Values equal the float64 reference, a NaN kept on the direct kernel."""
    monkeypatch.setenv("PYOPS_CONV_PATH", "auto")
    before, isa = torch.get_num_threads(), pyops._C.cpu_kernel_isa()
    torch.set_num_threads(2)  # (the rule's sizes are per thread, up to 2)
    try:
        # (n, cin, cout, k, h, isa, direct)
        for n, cin, cout, k, h, kernels, direct in [(8, 64, 64, 1, 56, "avx512", True),
                                                    (1, 116, 116, 1, 14, "avx512", True),
                                                    (2, 16, 48, 3, 40, "avx512", True),
                                                    (8, 256, 104, 1, 14, "avx512", True),
                                                    (2, 64, 96, 7, 16, "avx512", False),
                                                    (4, 128, 128, 3, 28, "avx512", False),
                                                    (8, 64, 256, 3, 7, "avx512", False),
                                                    (1, 256, 512, 3, 14, "avx512", False),
                                                    (8, 64, 64, 1, 56, ISAS[0], False)]:
            pyops._C.set_cpu_kernel_isa(kernels)
            x, w = randn((n, cin, h, h), 101, 2.0), randn((cout, cin, k, k), 102, 0.3)
            b = randn((cout,), 103)
            x[0, 0, h // 2, h // 2] = float("nan")
            ref = reference.conv2d_bias_act(x, w, b, padding=k // 2)
            for fmt in (torch.contiguous_format, torch.channels_last):
                with torch.profiler.profile() as prof:
                    out = conv2d_bias_act(x.float().contiguous(memory_format=fmt), w.float(), b.float(),
                                          padding=k // 2)
                names = {e.name for e in prof.events()}
                ours = not names & {"mkldnn::_convolution_pointwise", "aten::bmm", "aten::mm"}
                assert ours == (direct and fmt == torch.contiguous_format), (n, cin, cout, k, h, kernels, fmt)
                if ours:
                    assert out.isnan().any()
                    assert_close_float32(out, ref)
    finally:
        torch.set_num_threads(before)
        pyops._C.set_cpu_kernel_isa(isa)


def test_tiny_dilated_layers_take_the_direct_kernel(monkeypatch):
    """Dilated layers whose output rows are narrower than 16 columns and whose product is small (<= 192 taps a
    reduction, < 1M multiply-adds) run our direct kernel under auto, in either layout and through ConvBNReLU2d's
    packed weight: oneDNN's call made them 2-5x slower (seen by the profiler); a longer reduction into more channels
    (>= 4M multiply-adds a thread, not one of the direct kernel's other cases) keeps oneDNN.
    Values equal the float64 reference, a NaN kept (oneDNN's fused ReLU makes it 0: documented)."""
    monkeypatch.setenv("PYOPS_CONV_PATH", "auto")
    # (n, cin, cout, (kh, kw), dilation, h, direct)
    for n, cin, cout, k, d, h, direct in [(1, 16, 16, (3, 1), 2, 12, True), (1, 16, 8, (3, 3), 2, 9, True),
                                          (2, 32, 16, (1, 3), 6, 14, True), (1, 8, 16, (1, 3), 4, 14, True),
                                          (2, 128, 64, (1, 3), 4, 14, False)]:
        x, w = randn((n, cin, h, h), 98, 2.0), randn((cout, cin, *k), 99, 0.3)
        b = randn((cout,), 100)
        x[0, 0, h // 2, h // 2] = float("nan")
        conv = dict(padding=(d * (k[0] // 2), d * (k[1] // 2)), dilation=d)
        ref = reference.conv2d_bias_act(x, w, b, **conv)
        layer = torch.nn.Conv2d(cin, cout, k, **conv)
        with torch.no_grad():
            layer.weight.copy_(w.float())
            layer.bias.copy_(b.float())
        bn = torch.nn.BatchNorm2d(cout).eval()  # (identity statistics: the fused layer computes conv + bias + ReLU)
        bn.eps = 0.0
        module = pyops.nn.ConvBNReLU2d.from_modules(layer, bn)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.float().contiguous(memory_format=fmt)
            for run in (lambda: conv2d_bias_act(xf, w.float(), b.float(), **conv), lambda: module(xf)):
                with torch.profiler.profile() as prof, torch.no_grad():
                    out = run()
                names = {e.name for e in prof.events()}
                assert bool(names & {"mkldnn::_convolution_pointwise", "aten::mkldnn_convolution"}) != direct
                if direct:
                    assert out.isnan().any()
                    assert_close_float32(out, ref)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
def test_residuals_onednn_cannot_fuse_are_added_after_it(activation, monkeypatch):
    """oneDNN's fused call adds a residual only for one group on channels_last tensors; elsewhere (NCHW, groups) it
    fell back to at::convolution, which adds the bias one channel at a time on small dilated images, and ATen's
    add_relu, whose scalar tail makes a NaN 0 (the last values of an output whose size is not a multiple of the
    vector's). Now oneDNN convolves and our pass adds the residual and activates: equal to the float64 reference,
    NaNs at the start and at the end kept, as torch.relu keeps them. The activations other than ReLU and ReLU6 are a
    pass after the convolution and its residual add on every CPU path, so in one group on channels_last tensors
    (oneDNN's fused add) too."""
    monkeypatch.setenv("PYOPS_CONV_PATH", "library")
    # (n, cin, cout, h, groups, dilation, channels_last); the outputs' sizes are not multiples of 16
    cases = [(2, 64, 63, 7, 1, 1, False), (2, 48, 47, 9, 1, 2, False), (3, 32, 60, 7, 4, 1, True),
             (2, 16, 18, 9, 2, 2, False)]
    if activation not in ("relu", "relu6"):
        cases.append((2, 32, 33, 7, 1, 1, True))
    for n, cin, cout, h, groups, dilation, cl in cases:
        x, w = randn((n, cin, h, h), 91, 2.0), randn((cout, cin // groups, 3, 3), 92, 0.3)
        b = randn((cout,), 93)
        x[0, 0, h // 2, h // 2] = x[-1, :, -1, -1] = float("nan")
        conv = dict(padding=dilation, dilation=dilation, groups=groups)
        r = randn((n, cout, h, h), 94)
        ref = reference.conv2d_bias_act(x, w, b, **conv, activation=activation, residual=r)
        fmt = torch.channels_last if cl else torch.contiguous_format
        out = conv2d_bias_act(x.float().contiguous(memory_format=fmt), w.float(), b.float(), **conv,
                              activation=activation, residual=r.float())
        assert out.is_contiguous(memory_format=fmt) and out[-1, :, -1, -1].isnan().all()
        assert_close_float32(out, ref)


@pytest.mark.parametrize("k", [1, 3])
def test_packed_op_returns_channels_last_for_an_empty_batch(k):
    """The packed op's output is channels_last whatever the input; an empty batch too (it came back with NCHW
    strides: an empty tensor counts as NCHW-contiguous, which the plain op's layout rule then chose)."""
    x, w = randn((2, 64, 5, 5), 51).float(), randn((8, 64, k, k), 52).float()
    packed = torch.ops.pyops.conv2d_pack_weight(x, w, [1, 1], [k // 2] * 2, [1, 1], 1)
    out = torch.ops.pyops.conv2d_bias_act_packed(x[:0], w, packed, None, [1, 1], [k // 2] * 2, [1, 1], 1, 1, None)
    assert out.shape == (0, 8, 5, 5)
    assert out.stride() == torch.empty(0, 8, 5, 5, memory_format=torch.channels_last).stride()


@pytest.mark.parametrize("threads", [1, 2])
def test_strided_one_by_one_layers_as_a_matrix_product(threads, monkeypatch):
    """A strided 1×1 layer (ResNet's downsampling shortcut) runs as the matrix product over the input's subsampled
    positions where the rule takes its output positions: NCHW, channels_last and strided-view inputs, bias, residual
    and ReLU, odd sizes and strides, a 1×1 output map, against the float64 reference; a NaN at a sampled position is
    kept (oneDNN's fused ReLU, which ran these layers before, makes it 0)."""
    monkeypatch.setenv("PYOPS_CONV_PATH", "auto")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # (n, cin, cout, h, w, stride)
        for n, cin, cout, h, w_, stride in [(1, 64, 32, 13, 9, (2, 2)), (2, 24, 40, 14, 14, (2, 3)),
                                             (1, 128, 256, 14, 14, (2, 2)), (3, 8, 16, 2, 2, (2, 2))]:
            oh, ow = (h - 1) // stride[0] + 1, (w_ - 1) // stride[1] + 1
            assert pyops._C.one_by_one_runs_as_gemm(n, cin, cout, oh, ow, False)
            x, w = randn((n, cin, h, w_), 41, 2.0), randn((cout, cin, 1, 1), 42, 0.3)
            b, r = randn((cout,), 43), randn((n, cout, oh, ow), 44)
            x[0, 0, 0, 0] = float("nan")
            ref = reference.conv2d_bias_act(x, w, b, stride, activation="relu", residual=r)
            assert ref[0, :, 0, 0].isnan().all()
            spread = torch.zeros(n, cin, h, 2 * w_)
            spread[..., ::2] = x.float()
            for xi in (x.float(), x.float().contiguous(memory_format=torch.channels_last), spread[..., ::2]):
                out = conv2d_bias_act(xi, w.float(), b.float(), stride, activation="relu", residual=r.float())
                cl = xi.is_contiguous(memory_format=torch.channels_last) and not xi.is_contiguous()
                assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                assert_close_float32(out, ref)
    finally:
        torch.set_num_threads(before)


def test_one_by_one_rule():
    """Where the GEMM runs (measured: bench/NOTES-conv_bn_relu.md, stops 25 and 34), any thread count: the rule of a
    CPU where MKL runs as wide as oneDNN, and of one where it runs narrower (AMD AVX-512), each asked for by name;
    and this CPU's."""
    def gemm(*shape, wide=True):
        return pyops._C.one_by_one_runs_as_gemm(*shape, full_width_blas=wide)

    assert gemm(256, 256, 256, 1, 1, False) and gemm(256, 256, 256, 1, 1, True)  # 1×1 maps: a Linear
    assert gemm(8, 64, 64, 56, 56, False) and gemm(32, 256, 64, 56, 56, False)  # NCHW: one product per image
    assert not gemm(16, 512, 2048, 7, 7, False) and not gemm(4, 2048, 512, 7, 7, False)  # ... but not several
    assert gemm(2, 2048, 512, 7, 7, False) and gemm(8, 96, 576, 7, 7, False)  # images of few positions, many channels
    assert gemm(1, 72, 24, 28, 28, True) and gemm(1, 96, 96, 56, 56, True)  # channels_last: a small product ...
    assert gemm(1, 512, 2048, 7, 7, True)  # ... or few positions
    assert gemm(8, 2048, 512, 7, 7, True)  # (392 positions)
    assert not gemm(1, 64, 256, 56, 56, True) and not gemm(8, 1024, 256, 14, 14, True)
    assert not gemm(1, 16, 96, 112, 112, True)  # a small product, but a large output: oneDNN fuses its epilogue
    assert not gemm(0, 64, 64, 7, 7, False) and not gemm(1, 0, 64, 7, 7, True)
    # MKL narrower than oneDNN: 1×1 maps and small products only (up to 2^22 multiply-adds), either layout
    for cl in (False, True):
        assert gemm(256, 256, 256, 1, 1, cl, wide=False)
        assert gemm(1, 116, 116, 14, 14, cl, wide=False) and gemm(1, 72, 24, 28, 28, cl, wide=False)
        assert not gemm(1, 64, 64, 56, 56, cl, wide=False) and not gemm(8, 64, 64, 56, 56, cl, wide=False)
        assert not gemm(8, 1024, 256, 14, 14, cl, wide=False) and not gemm(8, 2048, 512, 7, 7, cl, wide=False)
        assert not gemm(1, 4, 96, 112, 112, cl, wide=False)  # (a small product, but a large output)
    here = pyops._C.one_by_one_runs_as_gemm(8, 1024, 256, 14, 14, False)
    assert here == gemm(8, 1024, 256, 14, 14, False, wide=blas_runs_full_width())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
def test_channels_last_image_with_an_odd_batch_stride(dtype, k):
    """vmap's per-sample fallback hands the op one channels_last image whose batch stride is not C·H·W
    (x.unsqueeze(1)[i]): oneDNN's layout query took it for NCHW and added the residual with ATen's add_relu, which
    has no bfloat16 kernel (INTERNAL ASSERT)."""
    batch = randn((3, 256, 8, 8), 41).to(dtype).contiguous(memory_format=torch.channels_last)
    x = batch.unsqueeze(1)[1]
    assert x.stride(0) != 256 * 8 * 8 and x.is_contiguous(memory_format=torch.channels_last)
    w, b = (randn((256, 256, k, k), 42) / (16 * k)).to(dtype), randn((256,), 43).to(dtype)
    residual = randn((3, 256, 8, 8), 44).to(dtype).contiguous(memory_format=torch.channels_last).unsqueeze(1)[2]
    out = conv2d_bias_act(x, w, b, padding=k // 2, residual=residual)
    ref = reference.conv2d_bias_act(x.double(), w.double(), b.double(), padding=k // 2, residual=residual.double())
    check_close(out, ref, dtype, ref.abs().max().item())


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv2d_bias_act_matches_float64_reference(device, path, activation, with_residual):
    x, w, b = randn((2, 6, 9, 8), 1, 3.0), randn((8, 3, 3, 3), 2), randn((8,), 3, 3.0)  # relu6 clips often
    r = randn((2, 8, 9, 8), 4, 3.0) if with_residual else None
    ref = reference.conv2d_bias_act(x, w, b, 1, 1, 1, 2, activation, r)
    for dtype in (torch.float32, torch.float64):
        c = lambda v: v.to(device=device, dtype=dtype) if v is not None else None  # noqa: E731
        out = conv2d_bias_act(c(x), c(w), c(b), 1, 1, 1, 2, activation, c(r))
        check_close(out, ref, dtype, 200.0)


def test_homework_and_resnet_shapes(device, path):
    """The homework's 3→16 and 16→16 layers on 32×32 and a ResNet-50 3×3 64→64 layer with its residual."""
    for seed, (cin, cout, k, h, res) in enumerate([(3, 16, 3, 32, False), (16, 16, 3, 32, False),
                                                    (64, 64, 3, 20, True), (64, 64, 1, 12, False)]):
        x, w = randn((2, cin, h, h), seed), randn((cout, cin, k, k), seed + 1, (cin * k * k) ** -0.5)
        stats = [randn((cout,), seed + i) for i in (2, 3, 4)] + [torch.rand(cout, dtype=torch.float64) + 0.5]
        r = randn((2, cout, h, h), seed + 5) if res else None
        ref = reference.conv2d_bn_relu(x, w, None, *stats, padding=k // 2, residual=r)
        out = pyops.conv2d_bn_relu(x.float().to(device), w.float().to(device), None,
                                   *[s.float().to(device) for s in stats], padding=k // 2,
                                   residual=r.float().to(device) if res else None)
        check_close(out, ref, torch.float32, 50.0)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(device, path, layout):
    base = randn((2, 6, 13, 22), 3)
    w, b, r = randn((4, 6, 3, 3), 4), randn((4,), 5), randn((2, 4, 13, 11), 6)
    if layout == "channels_last":
        x, res = base[:, :, :, :11].contiguous(memory_format=torch.channels_last), r.contiguous(
            memory_format=torch.channels_last)
    else:  # non-contiguous views of input and residual
        x, res = base[:, :, :, ::2], torch.cat([r, r], 2)[:, :, ::2]
    ref = reference.conv2d_bias_act(x.contiguous(), w, b, 1, 1, activation="relu", residual=res.contiguous())
    for dtype in (torch.float32, torch.float64):
        out = conv2d_bias_act(x.to(device, dtype), w.to(device, dtype), b.to(device, dtype), 1, 1,
                              activation="relu", residual=res.to(device, dtype))
        check_close(out, ref, dtype, 50.0)
        # the output keeps the input's memory format, as F.conv2d does
        assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert out.is_contiguous() == (layout != "channels_last")


def test_empty_batch(device, path):
    x, w = torch.randn(0, 4, 8, 8, device=device), torch.randn(6, 4, 3, 3, device=device)
    stats = [torch.randn(6, device=device) for _ in range(3)] + [torch.rand(6, device=device) + 1]
    out = pyops.conv2d_bn_relu(x, w, None, *stats, padding=1)
    assert out.shape == (0, 6, 8, 8)
    out = conv2d_bias_act(x, w, None, 2, 1, residual=torch.empty(0, 6, 4, 4, device=device))
    assert out.shape == (0, 6, 4, 4)


def test_one_tap_kernel_dimensions_ignore_dilation(device, path):
    """Dilation along a kernel dimension of size 1 changes nothing; oneDNN crashed on one (1×1 kernel, dilation
    2×3, padding 2×3, a channels_last 31×1 input), so the geometry makes it 1 there."""
    torch.manual_seed(0)
    x = torch.randn(1, 31, 31, 1, device=device).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 31, 1, 1, device=device), torch.randn(4, device=device)
    out = conv2d_bias_act(x, w, b, stride=2, padding=(2, 3), dilation=(2, 3))
    expected = F.conv2d(x.double(), w.double(), b.double(), 2, (2, 3), (2, 3)).relu()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_dilated_dimension_read_only_in_padding(device, path):
    """Every window along W lies in the padding (a 1x2 kernel dilated 1x2, padding 0x3, on an 8x1 input): the output
    is the bias there; oneDNN crashed on it (with post-ops), so it takes our kernel."""
    torch.manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 4, 8, 1, device=device).contiguous(memory_format=layout)
        w, b = torch.randn(4, 4, 1, 2, device=device), torch.randn(4, device=device)
        out = conv2d_bias_act(x, w, b, stride=(1, 2), padding=(0, 3), dilation=(1, 2))
        expected = F.conv2d(x.double(), w.double(), b.double(), (1, 2), (0, 3), (1, 2)).relu()
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_double_backward_through_the_activation(device):
    """A gradient penalty (create_graph=True) through the fused op equals the unfused chain's: the backward is then
    recorded with ATen ops (the fused backward op has no derivative of its own)."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, device=device)
    x, w = torch.randn(2, 3, 8, 8, **d, requires_grad=True), torch.randn(4, 3, 3, 3, **d, requires_grad=True)
    stats = [torch.rand(4, **d) + 0.5 for _ in range(4)]

    def penalty(f):
        (gx,) = torch.autograd.grad((f(x, w) ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), w)[0]

    for activation in ("relu", "relu6"):
        ours = penalty(lambda x, w: conv2d_bias_act(x, w, None, 1, 1, activation=activation))
        ref = penalty(lambda x, w: F.hardtanh(F.conv2d(x, w, None, 1, 1), 0, 6) if activation == "relu6"
                      else F.conv2d(x, w, None, 1, 1).relu())
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    ours = penalty(lambda x, w: pyops.conv2d_bn_relu(x, w, None, *stats, padding=1))
    ref = penalty(lambda x, w: F.batch_norm(F.conv2d(x, w, None, 1, 1), stats[2], stats[3], stats[0], stats[1]).relu())
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradgradcheck(lambda x, w: conv2d_bias_act(x, w, None, 1, 1), (x[:1, :, :5, :5], w))


def grad_inputs(device):
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 4, 7, 6, **d)
    w = torch.randn(6, 2, 3, 3, **d)
    b, g, beta = torch.randn(6, **d), torch.randn(6, **d), torch.randn(6, **d)
    mean, var = torch.randn(6, **d), torch.rand(6, **d) + 0.5
    r = torch.randn(2, 6, 4, 6, **d)
    return x, w, b, g, beta, mean, var, r


def test_gradients_match_autograd_reference(device, path):
    """Every gradient (input, weight, bias, γ, β, residual) equals autograd through the unfused reference."""
    x, w, b, g, beta, mean, var, r = grad_inputs(device)
    conv = dict(stride=(2, 1), padding=1, dilation=1, groups=2)
    leaves = [t.requires_grad_() for t in (x, w, b, g, beta, r)]
    gy = torch.randn(2, 6, 4, 6, dtype=torch.float64, device=device)
    for relu in (True, False):
        out = pyops.conv2d_bn_relu(x, w, b, g, beta, mean, var, 1e-3, relu=relu, residual=r, **conv)
        ref = reference.conv2d_bn_relu(x, w, b, g, beta, mean, var, 1e-3, relu=relu, residual=r, **conv)
        got = torch.autograd.grad(out, leaves, gy)
        want = torch.autograd.grad(ref, leaves, gy)
        for a, e, name in zip(got, want, ["x", "weight", "bias", "bn_weight", "bn_bias", "residual"]):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")
    for act in ACTIVATIONS:
        leaves3 = [x, w, b, r]
        out = conv2d_bias_act(x * 3, w, b, activation=act, residual=r, **conv)
        ref = reference.conv2d_bias_act(x * 3, w, b, activation=act, residual=r, **conv)
        for a, e in zip(torch.autograd.grad(out, leaves3, gy), torch.autograd.grad(ref, leaves3, gy)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_activation_backward_pass_equals_torch_rules(device, dtype, channels_last):
    """conv_act_backward, the backward's one pass: grad·act'(output)·scale[c] and grad·act'(output), against
    torch's select rules computed in float32 from the same values (so equal to the bit): rows of 35 positions and 19
    channels, which end in partial vectors; inf and NaN gradients where the mask is 0 give 0, as in
    threshold_backward (the CPU kernel multiplied by the mask: NaN); a NaN output passes the gradient, as in torch's
    decompositions of threshold_backward and hardtanh_backward and its CUDA kernels (ReLU6's stopped it before stop
    39, as the vectorized body of torch's CPU hardtanh_backward does, unlike its scalar tail)."""
    torch.manual_seed(0)
    shape = (2, 19, 5, 7)
    output = (torch.randn(shape) * 4).to(dtype)
    grad = torch.randn(shape).to(dtype)
    output[0, 0, 0, :3] = torch.tensor([-1.0, 7.0, float("nan")])
    grad[0, 0, 0, :3] = torch.tensor([float("inf"), float("nan"), 2.0])
    scale = torch.rand(19) + 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    output, grad = (t.to(device=device, memory_format=fmt) for t in (output, grad))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g, y = grad.to(acc), output.to(acc)
    # (torch/_decomp/decompositions.py: threshold_backward, hardtanh_backward)
    torch_rules = {0: g, 1: torch.where(y <= 0, 0, g), 2: torch.where((y <= 0) | (y >= 6), 0, g)}
    for code, masked in torch_rules.items():
        for sc in (None, scale):
            scaled, unscaled = torch.ops.pyops.conv_act_backward(grad, output, None if sc is None else sc.to(device),
                                                                code, True)
            s = 1 if sc is None else sc.to(device=device, dtype=acc).view(1, -1, 1, 1)
            torch.testing.assert_close(scaled, (masked * s).to(dtype), rtol=0, atol=0, equal_nan=True)
            assert scaled.is_contiguous(memory_format=fmt)
            if sc is not None:
                torch.testing.assert_close(unscaled, masked.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("present", list(itertools.product([True, False], repeat=4)), ids=str)
def test_gradients_with_absent_arguments_and_partial_requires_grad(device, present):
    """bias, γ, β and residual each present or None, and only some tensors requiring grad: each gradient asked for
    equals autograd through the reference (the C++ autograd maps tensor arguments to input edges, which skip the
    absent ones)."""
    x, w, b, g, beta, mean, var, r = grad_inputs(device)
    has_b, has_g, has_beta, has_r = present
    b, g, beta, r = (t if keep else None for t, keep in zip((b, g, beta, r), present))
    conv = dict(stride=(2, 1), padding=1, dilation=1, groups=2)
    gy = torch.randn(2, 6, 4, 6, dtype=torch.float64, device=device)
    optional = [t for t in (b, g, beta, r) if t is not None]
    for wanted in ([x] + optional, optional[-1:] or [w]):  # everything but the weight; only the last present one
        for t in (x, w, *optional):
            t.requires_grad_(any(t is u for u in wanted))
        out = pyops.conv2d_bn_relu(x, w, b, g, beta, mean, var, 1e-3, residual=r, **conv)
        ref = reference.conv2d_bn_relu(x, w, b, g, beta, mean, var, 1e-3, residual=r, **conv)
        for a, e in zip(torch.autograd.grad(out, wanted, gy), torch.autograd.grad(ref, wanted, gy)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        if has_g or has_beta:
            continue  # conv2d_bias_act takes no BN
        out = conv2d_bias_act(x, w, b, residual=r, **conv)
        ref = reference.conv2d_bias_act(x, w, b, residual=r, **conv)
        for a, e in zip(torch.autograd.grad(out, wanted, gy), torch.autograd.grad(ref, wanted, gy)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_by_one_gradients_are_a_pointwise_conv1ds(device, dtype, monkeypatch):
    """A 1×1 layer at stride 1 without padding (one group, NCHW) is a pointwise conv1d over its H·W positions: on the
    CPU its input and weight gradients come from pyops' conv1d backward ops under PYOPS_CONV_PATH=auto (matrix
    products where faster: oneDNN converts such a layer's tensors to its blocked layout and back), from ATen's
    convolution_backward when a path is forced. Every gradient equals the reference's either way, with the weight's
    alone, with a bias's alone, and in a double backward."""
    torch.manual_seed(0)
    d = dict(dtype=dtype, device=device)
    x, w, b = torch.randn(3, 40, 9, 11, **d), torch.randn(24, 40, 1, 1, **d), torch.randn(24, **d)
    g, beta, mean, var = torch.randn(24, **d), torch.randn(24, **d), torch.randn(24, **d), torch.rand(24, **d) + 0.5
    r, gy = torch.randn(3, 24, 9, 11, **d), torch.randn(3, 24, 9, 11, **d)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for path in ("auto", "library"):
        monkeypatch.setenv("PYOPS_CONV_PATH", path)
        for wanted in ((x, w, b, g, beta, r), (w,), (b,)):
            for t in (x, w, b, g, beta, r):
                t.requires_grad_(any(t is u for u in wanted))
            with torch.profiler.profile() as prof:
                out = pyops.conv2d_bn_relu(x, w, b, g, beta, mean, var, 1e-3, residual=r)
                got = torch.autograd.grad(out, wanted, gy)
            ref = reference.conv2d_bn_relu(*(t.double() for t in (x, w, b, g, beta, mean, var)), 1e-3,
                                           residual=r.double())
            for a, e in zip(got, torch.autograd.grad(ref, wanted, gy.double())):
                torch.testing.assert_close(a.double(), e.double(), **tol)
            names = {e.name for e in prof.events()}
            conv1d_ops = any(n.startswith("pyops::conv1d_backward") for n in names)
            assert conv1d_ops == (device == "cpu" and path == "auto" and wanted[0] is not b), (path, len(wanted))
    monkeypatch.setenv("PYOPS_CONV_PATH", "auto")
    if dtype == torch.float64:
        xs, ws = x[:1, :3, :3, :4].detach().requires_grad_(), w[:5, :3].detach().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda x, w: conv2d_bias_act(x, w, None), (xs, ws))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_strided_one_by_one_gradients_gather_the_sampled_positions(device, dtype, channels_last, monkeypatch):
    """A strided 1×1 layer without padding is a pointwise conv1d over the positions its stride samples: on the CPU,
    on every path, its gradients come from pyops' conv1d backward ops on the gathered positions (grad_input zero
    elsewhere, in the input's layout) for NCHW inputs, and for channels_last ones of under 16 input channels, where
    oneDNN's strided 1×1 weight gradient wrote outside its buffers in torch 2.14.1 (heap corruption: stop 38);
    channels_last inputs of more channels keep ATen's backward (oneDNN's layout, faster there). Sizes the strides do
    not divide, with bias, residual and ReLU, against the float64 reference."""
    torch.manual_seed(0)
    d = dict(dtype=dtype, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for cin, stride in ((3, (2, 1)), (3, (2, 2)), (20, (2, 2)), (5, (3, 2))):
        x = torch.randn(3, cin, 9, 11, **d).contiguous(memory_format=fmt)
        w, b = torch.randn(6, cin, 1, 1, **d), torch.randn(6, **d)
        oh, ow = (8 // stride[0] + 1, 10 // stride[1] + 1)
        r, gy = torch.randn(3, 6, oh, ow, **d), torch.randn(3, 6, oh, ow, **d)
        ours = device == "cpu" and (not channels_last or cin < 16)
        for path in ("auto", "library"):
            monkeypatch.setenv("PYOPS_CONV_PATH", path)
            for wanted in ((x, w, b, r), (x,), (w,)):
                for t in (x, w, b, r):
                    t.requires_grad_(any(t is u for u in wanted))
                with torch.profiler.profile() as prof:
                    got = torch.autograd.grad(conv2d_bias_act(x, w, b, stride, residual=r), wanted, gy)
                ref = reference.conv2d_bias_act(x.double(), w.double(), b.double(), stride,
                                                residual=r.double())
                for a, e in zip(got, torch.autograd.grad(ref, wanted, gy.double())):
                    torch.testing.assert_close(a.double(), e.double(), **tol)
                names = {e.name for e in prof.events()}
                assert any(n.startswith("pyops::conv1d_backward") for n in names) == ours, (cin, stride, path)
                if wanted[0] is x:
                    assert got[0].is_contiguous(memory_format=fmt)


def test_gradcheck(device):
    x, w, b, g, beta, mean, var, r = grad_inputs(device)
    # small slices keep gradcheck's numerical Jacobian cheap on this 2-core CPU
    x, w, b, g, beta, mean, var, r = x[:1, :, :5, :4], w[:4], b[:4], g[:4], beta[:4], mean[:4], var[:4], r[:1, :4, :3, :4]
    x, w, b, g, beta, r = (t.detach().clone().requires_grad_() for t in (x, w, b, g, beta, r))
    assert torch.autograd.gradcheck(
        lambda *a: pyops.conv2d_bn_relu(a[0], a[1], a[2], a[3], a[4], mean, var, 1e-5, (2, 1), 1, 1, 2, True, a[5]),
        (x, w, b, g, beta, r))
    assert torch.autograd.gradcheck(
        lambda *a: conv2d_bias_act(*a[:3], (2, 1), 1, 1, 2, "relu6", a[3]), (x * 4, w, b, r))


def test_opcheck(device):
    x, w, b, g, beta, mean, var, r = grad_inputs(device)
    x, w, b, g, beta = (t.requires_grad_() for t in (x, w, b, g, beta))
    ops = torch.ops.pyops
    cases = [
        (ops.conv2d_bn_relu, (x, w, b, g, beta, mean, var, 1e-5, [2, 1], [1, 1], [1, 1], 2, True, r)),
        (ops.conv2d_bn_relu, (x.float().contiguous(memory_format=torch.channels_last), w.float(), None, None, None,
                              mean.float(), var.float(), 1e-5, [1, 1], [0, 0], [1, 1], 1 if w.shape[1] == 4 else 2,
                              False, None)),
        (ops.conv2d_bias_act, (x, w, b, [1, 1], [1, 1], [1, 1], 2, 2, None)),
        (ops.conv2d_bias_act, (x, w, None, [2, 1], [1, 1], [1, 1], 2, 1, r.requires_grad_())),
        (ops.conv_bn_fold, (w.detach(), b.detach(), g.detach(), None, mean, var, 1e-5)),
        (ops.conv_act_backward, (r.detach(), r.detach() * 2, g.detach(), 1, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_flop_counter_counts_the_convolution(device):
    x, w, b, g, beta, mean, var, r = grad_inputs(device)
    with FlopCounterMode(display=False) as ours:
        pyops.conv2d_bn_relu(x, w, b, g, beta, mean, var, stride=(2, 1), padding=1, groups=2, residual=r)
        conv2d_bias_act(x, w, b, (2, 1), 1, 1, 2, "relu", r)
    with FlopCounterMode(display=False) as theirs:
        F.conv2d(x, w, b, (2, 1), 1, 1, 2)
    assert ours.get_total_flops() == 2 * theirs.get_total_flops() == 2 * 2 * (2 * 6 * 4 * 6) * (2 * 3 * 3)


def test_torch_compile_fullgraph(device):
    x, w, b, g, beta, mean, var, r = (t.float() for t in grad_inputs(device))

    def block(x, w, b, r):
        return pyops.conv2d_bn_relu(x, w, b, g, beta, mean, var, 1e-5, stride=(2, 1), padding=1, groups=2,
                                    residual=r) * 2

    compiled = torch.compile(block, fullgraph=True)
    want = block(x, w, b, r)
    torch.testing.assert_close(compiled(x, w, b, r), want, rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_backward(device):
    """AOTAutograd traces the C++ autograd Function: compiled gradients equal eager ones (BN statistics frozen)."""
    x, w, b, g, beta, mean, var, r = (t.float() for t in grad_inputs(device))
    leaves = [t.requires_grad_() for t in (x, w, b, g, beta, r)]

    def step(x, w, b, g, beta, r):
        y = pyops.conv2d_bn_relu(x, w, b, g, beta, mean, var, 1e-5, stride=(2, 1), padding=1, groups=2, residual=r)
        return (y * y).sum()

    got = torch.autograd.grad(torch.compile(step, fullgraph=True)(*leaves), leaves)
    want = torch.autograd.grad(step(*leaves), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ---- bad input: a Python exception that names the problem ----

def bad_cases():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    stats = dict(bn_weight=torch.ones(6), bn_bias=torch.zeros(6), running_mean=torch.zeros(6),
                 running_var=torch.ones(6))
    return [
        ("wrong rank", dict(x=torch.randn(4, 8, 8)), ValueError, "'x' must be 4-D"),
        ("weight rank", dict(weight=torch.randn(6, 4, 3)), ValueError, "'weight' must be 4-D"),
        ("channel mismatch", dict(x=torch.randn(2, 5, 8, 8)), ValueError, "expects 4 input channels"),
        ("stats length", dict(running_var=torch.ones(5)), ValueError, "'running_var' must have shape \\(6,\\)"),
        ("mean length", dict(running_mean=torch.ones(7)), ValueError, "'running_mean'"),
        ("bn_weight length", dict(bn_weight=torch.ones(3)), ValueError, "'bn_weight'"),
        ("bias length", dict(bias=torch.ones(4)), ValueError, "'bias'"),
        ("dtype mismatch", dict(weight=w.double()), TypeError, "'weight' has dtype torch.float64"),
        ("integer input", dict(x=torch.ones(2, 4, 8, 8, dtype=torch.int64)), TypeError, "'x' must be a floating"),
        ("device mismatch", dict(weight=w.to("meta")), ValueError, "'weight' is on meta"),
        ("stride 0", dict(stride=0), ValueError, "'stride' must be >= 1"),
        ("negative padding", dict(padding=(1, -1)), ValueError, "'padding' must be >= 0"),
        ("dilation 0", dict(dilation=0), ValueError, "'dilation' must be >= 1"),
        ("groups not dividing", dict(groups=3), ValueError, "'groups' = 3 must divide"),
        ("residual shape", dict(residual=torch.randn(2, 6, 7, 8)), ValueError, "'residual' must have the output"),
        ("residual dtype", dict(residual=torch.randn(2, 6, 6, 6, dtype=torch.float64)), TypeError, "'residual'"),
        ("kernel too large", dict(x=torch.randn(2, 4, 2, 2)), ValueError, "smaller than the dilated kernel"),
        ("negative eps", dict(eps=-1.0), ValueError, "'eps'"),
        ("tensor eps", dict(eps=torch.tensor(1e-5)), TypeError, "'eps' must be a number"),
        ("padding past int64's count", dict(padding=2 ** 40), ValueError, "'padding' .* gives an output of"),
        ("unknown padding string", dict(padding="full"), ValueError, "'padding' has padding='full'"),
        ("strided same", dict(padding="same", stride=2), ValueError, "not supported for strided"),
        ("asymmetric same", dict(padding="same", weight=torch.randn(6, 4, 2, 2)), ValueError, "asymmetrically"),
    ], dict(x=x, weight=w, bias=None, **stats)


@pytest.mark.parametrize("padding,dilation", [("same", 1), ("same", (2, 1)), ("valid", 1)])
def test_string_padding_as_f_conv2d(padding, dilation):
    """padding='same' / 'valid' as F.conv2d takes them (ConvBNReLU2d took them; the functions refused them)."""
    x, w, b = randn((2, 4, 9, 8), 61), randn((6, 4, 3, 5), 62, 0.3), randn((6,), 63)
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    conv = F.conv2d(x, w, b, padding=padding, dilation=dilation)
    out = pyops.conv2d_bn_relu(x, w, b, ones, zeros, zeros, ones, 0.0, padding=padding, dilation=dilation)
    torch.testing.assert_close(out, conv.relu())
    residual = conv.clone()
    out = conv2d_bias_act(x, w, b, padding=padding, dilation=dilation, activation="none", residual=residual)
    torch.testing.assert_close(out, conv + residual)


BAD_CASE_DEVICES = [(i, device) for i, case in enumerate(bad_cases()[0]) for device in ("cpu", "meta")
                    if not (device == "meta" and case[0] == "device mismatch")]  # (that one is a meta tensor)


@pytest.mark.parametrize("case,device", BAD_CASE_DEVICES,
                         ids=[f"{bad_cases()[0][i][0]}-{d}" for i, d in BAD_CASE_DEVICES])
def test_bad_input_names_the_problem(case, device):
    """On the CPU and on the meta device (the shape-only kernels torch.compile and torch.export run)."""
    (_, change, exc, match), args = bad_cases()[0][case], bad_cases()[1]
    args.update(change)
    if device == "meta":  # (eps as a 0-d tensor stays: it is the bad argument, not an operand)
        args = {k: v.to("meta") if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in args.items()}
    with pytest.raises(exc, match=match):
        pyops.conv2d_bn_relu(**args)


def test_bad_input_in_cpp_too():
    """The op itself (no Python wrapper) checks again, naming the argument."""
    x, w, m, v = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.zeros(6), torch.ones(6)
    op = torch.ops.pyops.conv2d_bn_relu
    with pytest.raises(ValueError, match="'running_var'"):
        op(x, w, None, None, None, m, torch.ones(5), 1e-5, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(ValueError, match="'stride'"):
        op(x, w, None, None, None, m, v, 1e-5, [0, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(ValueError, match="'padding'"):
        op(x, w, None, None, None, m, v, 1e-5, [1, 1], [-1, 1], [1, 1], 1, True)
    with pytest.raises(ValueError, match="'groups'"):
        op(x, w, None, None, None, m, v, 1e-5, [1, 1], [1, 1], [1, 1], 3, True)
    with pytest.raises(TypeError, match="'weight' has dtype"):
        op(x, w.double(), None, None, None, m, v, 1e-5, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(ValueError, match="'activation'"):
        torch.ops.pyops.conv2d_bias_act(x, w, None, [1, 1], [1, 1], [1, 1], 1, len(pyops.activations.ACTIVATIONS), None)
    with pytest.raises(ValueError, match="'activation'"):
        conv2d_bias_act(x, w, activation="gelu")


def test_raw_fold_and_backward_ops_check_every_argument():
    """conv_bn_fold read `bias` unchecked (a 1-element bias read past its end, an empty one crashed); a meta tensor
    among CPU ones reached the fake kernels, which returned uninitialized CPU tensors; integer tensors went to the
    kernels' dtype dispatch (an error naming no argument)."""
    w, m, v, o = torch.randn(6, 2, 3, 3), torch.zeros(6), torch.ones(6), torch.randn(2, 3, 4, 4)
    fold, act_backward = torch.ops.pyops.conv_bn_fold, torch.ops.pyops.conv_act_backward
    for bias in (torch.randn(1), torch.empty(0), torch.randn(6, 6)):
        with pytest.raises(ValueError, match="'bias' must have shape \\(6,\\)"):
            fold(w, bias, None, None, m, v, 1e-5)
    with pytest.raises(TypeError, match="'bias' must be a floating"):
        fold(w, torch.ones(6, dtype=torch.int32), None, None, m, v, 1e-5)
    with pytest.raises(ValueError, match="'bias' is on meta but 'weight' is on cpu"):
        fold(w, torch.randn(6, device="meta"), None, None, m, v, 1e-5)
    with pytest.raises(TypeError, match="'weight' must be a floating"):
        fold(w.int(), None, None, None, m, v, 1e-5)
    with pytest.raises(ValueError, match="'scale' is on meta but 'output' is on cpu"):
        act_backward(o, o, torch.ones(3, device="meta"), 1, True)
    with pytest.raises(TypeError, match="'scale' must be a floating"):
        act_backward(o, o, torch.ones(3, dtype=torch.int32), 1, True)
    with pytest.raises(TypeError, match="'output' must be a floating"):
        act_backward(o.int(), o.int(), None, 1, True)
    for code in (3, 4, 5, 6):  # (ATen's autograd differentiates these: autograd never calls the pass for them)
        with pytest.raises(ValueError, match=f"'activation' = {code}: it differentiates the identity and the clamps"):
            act_backward(o, o, None, code, False)


@pytest.mark.parametrize("path", ["direct", "library"])
def test_geometry_past_int64_and_strides_past_the_image(monkeypatch, path):
    """2·padding and the dilated span are refused where they overflow int64 (padding 2**63 - 1 wrapped and gave a
    4-row output; F.conv2d refuses both); a stride past the padded image gives its one output row, as F.conv2d does
    (oneDNN's 32-bit strides failed past 2**31); an empty image is refused, as by F.conv2d (padded, the op returned
    the bias alone)."""
    monkeypatch.setenv("PYOPS_CONV_PATH", path)
    x, w, b = torch.randn(2, 4, 8, 8), torch.randn(6, 2, 3, 3), torch.randn(6)
    op = torch.ops.pyops.conv2d_bias_act
    with pytest.raises(ValueError, match="'padding' = 9223372036854775807 is too large"):
        op(x, w, b, [1, 1], [2**63 - 1, 1], [1, 1], 2, 0, None)
    with pytest.raises(ValueError, match="'dilation' = 4611686018427387904 is too large"):
        op(x, w, b, [1, 1], [1, 1], [2**62, 1], 2, 0, None)
    want = F.conv2d(x, w, b, (10, 1), 1, 1, 2).relu()  # 8 + 2 rows padded: one output row from stride 10 on
    for stride in (2**31, 2**63 - 1):
        torch.testing.assert_close(op(x, w, b, [stride, 1], [1, 1], [1, 1], 2, 1, None), want, rtol=1e-5,
                                   atol=1e-5)
    for args in [(torch.randn(2, 4, 0, 8), w, b, 1, 2, 1, 2), (torch.randn(2, 4, 8, 0), w, b, 1, 2, 1, 2)]:
        with pytest.raises(ValueError, match="empty spatial size"):
            conv2d_bias_act(*args)
        with pytest.raises(ValueError, match="empty spatial size"):
            op(args[0], w, b, [1, 1], [2, 2], [1, 1], 2, 0, None)
    # an empty batch of empty images gives its empty output, as F.conv2d does
    empty = torch.randn(0, 4, 0, 5)
    assert conv2d_bias_act(empty, w, b, 1, 2, 1, 2).shape == F.conv2d(empty, w, b, 1, 2, 1, 2).shape == (0, 6, 2, 7)
    # the backward too: ATen's convolution backward takes the stride the op computed with (2**31 - 1 crashed it)
    x1, w1 = torch.randn(2, 1, 5, 5, requires_grad=True), torch.randn(1, 1, 3, 3, requires_grad=True)
    for stride in (2**31 - 1, 2**63 - 1):
        got = torch.autograd.grad(conv2d_bias_act(x1, w1, None, stride, 0, 1, 1, "none").sum(), [x1, w1])
        want = torch.autograd.grad(F.conv2d(x1, w1, None, 5).sum(), [x1, w1])
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def test_backward_at_a_huge_stride_under_dynamic_shapes():
    """torch.compile(dynamic=True): the image sizes are symbolic, and the backward kept the raw stride, which killed
    the process in oneDNN's convolution backward (SIGFPE at 2**31 - 1); such a stride specializes the sizes."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 5, 4, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
    compiled = torch.compile(lambda x, w: conv2d_bias_act(x, w, None, 2**31 - 1, 1), dynamic=True)
    got = torch.autograd.grad(compiled(x, w).sum(), [x, w])
    want = torch.autograd.grad(F.conv2d(x, w, None, (7, 6), 1).relu().sum(), [x, w])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_packed_op_is_inference_only():
    """The packed op has no backward: a call autograd would record is refused by name (PyTorch's fallback warned
    and returned a result without gradients)."""
    x, w = torch.randn(1, 64, 8, 8), torch.randn(64, 64, 3, 3) / 24
    packed = torch.ops.pyops.conv2d_pack_weight(x, w, [1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.pyops.conv2d_bias_act_packed
    for name, args in [("input", (x.requires_grad_(), w)), ("weight", (x.detach(), w.requires_grad_()))]:
        with pytest.raises(NotImplementedError, match=f"inference only .* argument '{name}' requires grad"):
            op(*args, packed, None, [1, 1], [1, 1], [1, 1], 1, 0, None)
    with torch.no_grad():
        torch.testing.assert_close(op(x, w, packed, None, [1, 1], [1, 1], [1, 1], 1, 0, None),
                                   F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)


def test_bad_path_env(monkeypatch):
    monkeypatch.setenv("PYOPS_CONV_PATH", "fastest")
    with pytest.raises(ValueError, match="PYOPS_CONV_PATH"):
        conv2d_bias_act(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 1, 1))
    with pytest.raises(ValueError, match="PYOPS_CONV_PATH"):
        pyops._C.conv_path()


@pytest.mark.parametrize("value, path", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("direct", "direct"),
                                         ("ours", "direct"), ("library", "library"), ("cudnn", "library")])
def test_conv_path_reads_the_env_as_the_ops_do(monkeypatch, value, path):
    """pyops._C.conv_path(), which ConvBNReLU2d's CUDA forward asks per call, names the path the ops take."""
    if value is None:
        monkeypatch.delenv("PYOPS_CONV_PATH", raising=False)
    else:
        monkeypatch.setenv("PYOPS_CONV_PATH", value)
    assert pyops._C.conv_path() == path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("activation,with_residual",
                         [("relu", True), ("none", True), ("relu6", False), ("relu6", True)])
def test_reduced_precision_accumulates_in_fp32(device, path, dtype, layout, groups, activation, with_residual):
    """float16/bfloat16 inputs accumulate in fp32 on every path: on the CPU oneDNN's bfloat16 where the CPU has its
    instructions (it fuses a residual only for groups 1 on channels_last tensors; the op adds it elsewhere: ATen's
    add_relu, oneDNN's own fallback, has no half-precision kernel; and after ReLU6), else float32 kernels on
    converted values; on CUDA ours and cuDNN's."""
    x, w, b = randn((2, 8, 10, 9), 11), randn((12, 8 // groups, 3, 3), 12, 0.3), randn((12,), 13)
    r = randn((2, 12, 10, 9), 14) if with_residual else None
    q = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (the reference sees the same rounded inputs)
    as64 = lambda t: None if t is None else q(t).double()  # noqa: E731
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    on = lambda t: None if t is None else q(t).to(device).contiguous(memory_format=fmt)  # noqa: E731
    ref = reference.conv2d_bias_act(as64(x), as64(w), as64(b), 1, 1, 1, groups, activation, as64(r))
    out = conv2d_bias_act(on(x), q(w).to(device), q(b).to(device), 1, 1, 1, groups, activation, on(r))
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    check_close(out, ref, dtype, 20.0)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_our_epilogues_keep_nan_as_torch_relu_does(device, activation, layout, dtype, monkeypatch):
    """torch.relu/relu6 keep a NaN; our kernels' epilogues do too, on each of their code paths (NCHW rows, the
    scalar channels_last path, half types). Only ours: oneDNN's and cuDNN's fused ReLU are theirs (module docs)."""
    monkeypatch.setenv("PYOPS_CONV_PATH", {"cpu": "direct", "cuda": "ours"}[device])
    x, w, b = randn((2, 3, 9, 9), 21), randn((4, 3, 3, 3), 22, 0.5), randn((4,), 23)
    x[0, 1, 4, 4], x[1, 2, 0, 8] = float("nan"), float("inf")  # (the inf gives ±inf outputs: 0, inf or 6 after)
    q = lambda t: t.to(dtype).double()  # noqa: E731  (the reference sees the same rounded inputs)
    ref = reference.conv2d_bias_act(q(x), q(w), q(b), padding=1, activation=activation)
    assert ref.isnan().any() and not ref.isnan().all() and ref.isinf().any() == (activation == "relu")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = conv2d_bias_act(x.to(device, dtype).contiguous(memory_format=fmt), w.to(device, dtype), b.to(device, dtype),
                          padding=1, activation=activation)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=rtol, atol=max(atol, rtol * 20.0), equal_nan=True)
