"""Deployment paths: torch.export and torch.jit.trace of models that use pyops (the ops survive as pyops ops in the
exported graph, the program saves, loads and computes what the eager model does) and torch.compile of the sliding
classifier."""

import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.utils.prune
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import pyops
from pyops import reference
from pyops.demo.conv_bn_relu import randomize_batchnorms_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def randomize_bn(model, seed=1):
    return randomize_batchnorms_(model, torch.Generator().manual_seed(seed))


def export_roundtrip(model, args, dynamic_shapes=None):
    """torch.export.export, then save and load: the program a deployment would ship."""
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def call_targets(program):
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def test_export_fused_resnet18_with_dynamic_batch():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    fused = pyops.fuse(model)
    batch = torch.export.Dim("batch", min=1, max=16)
    program = export_roundtrip(fused, (rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    targets = call_targets(program)
    assert "pyops.conv2d_bias_act.default" in targets
    assert not any("batch_norm" in t for t in targets)
    with torch.no_grad():
        for n in (2, 5):
            x = rand(n, 3, 64, 64, seed=n)
            expected = model(x)
            got = program.module()(x)
            assert (got - expected).norm() <= 1e-5 * expected.norm()


@pytest.mark.parametrize("strict", [False, True])
def test_export_fused_strided_layers_with_dynamic_image_sizes(strict):
    """Dynamic H and W with a minimum above an output side of 1 (README: PyTorch's conv2d specializes there)."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))).eval()
    side = {2: torch.export.Dim("H", min=3, max=64), 3: torch.export.Dim("W", min=3, max=64)}
    program = torch.export.export(pyops.fuse(model), (rand(2, 3, 16, 16),), dynamic_shapes=(side,), strict=strict)
    assert call_targets(program) == {"pyops.conv2d_bias_act.default"}
    with torch.no_grad():
        for h, w in ((3, 4), (17, 9), (33, 64)):
            x = rand(2, 3, h, w, seed=h)
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_export_keeps_dynamic_shapes_of_layers_with_inference_paths(dtype, layout):
    """A widening stem, a 1×1 layer and a packing 3×3 layer, float32 and float16: the eager inference paths ask the
    input's layout and shape (the packing and conversion rules), which under torch.export specialized a dynamic
    batch to a constant (UserError); their rules ask only after the call's own (not tracing)."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                       nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                       nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64))).eval().to(dtype)
    fused = pyops.fuse(model)
    batch, side = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("side", min=4, max=64)
    x = rand(2, 3, 16, 16).to(dtype).contiguous(memory_format=layout)
    program = torch.export.export(fused, (x,), dynamic_shapes=({0: batch, 2: side, 3: side},))
    with torch.no_grad():
        for n, s in ((2, 16), (5, 9)):
            x = rand(n, 3, s, s, seed=n).to(dtype).contiguous(memory_format=layout)
            tol = 1e-4 if dtype == torch.float32 else 1e-2  # (eager may take another path: packed, GEMM)
            torch.testing.assert_close(program.module()(x), fused(x), rtol=tol, atol=tol)


class FunctionalOps(nn.Module):
    """Each functional op once: conv2d_bn_relu with a residual, conv1d, smooth_max, lse_pool2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = randomize_bn(nn.BatchNorm2d(4)).eval()
        self.filters = nn.Parameter(rand(4, 1, 3, seed=2))

    def forward(self, x):
        bn = self.bn
        y = pyops.conv2d_bn_relu(x, self.conv.weight, self.conv.bias, bn.weight, bn.bias, bn.running_mean,
                                 bn.running_var, bn.eps, padding=1, residual=x)
        z = pyops.conv1d(y.flatten(2), self.filters, padding="same", groups=4)  # (B, 4, H*W)
        return pyops.smooth_max(z, 3.0, dim=-1) + pyops.lse_pool2d(y, beta=2.0)


def test_export_functional_ops():
    model = FunctionalOps().eval()
    x = rand(2, 4, 6, 7, seed=3)
    program = export_roundtrip(model, (x,))
    assert {"pyops.conv2d_bn_relu.default", "pyops.conv1d.default", "pyops.smooth_max.default"} <= call_targets(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)


def test_export_conv1d_module():
    torch.manual_seed(0)
    model = nn.Sequential(pyops.nn.Conv1d(8, 16, 5, padding=2, padding_mode="reflect"), nn.ReLU(),
                          pyops.nn.Conv1d(16, 16, 3, groups=16, padding="same")).eval()
    x = rand(3, 8, 50, seed=4)
    program = export_roundtrip(model, (x,))
    assert "pyops.conv1d.default" in call_targets(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
    # fused Conv1d → BatchNorm1d (→ add) → ReLU chains: conv1d_bias_act ops, the second with the residual
    fused = pyops.fuse(Residual1d().eval())
    program = export_roundtrip(fused, (x,))
    assert "pyops.conv1d_bias_act.default" in call_targets(program)
    assert not {"aten.add.Tensor", "aten.relu.default"} & call_targets(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), fused(x), rtol=0, atol=0)


class Residual1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.conv2, self.bn2 = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def crop_classifier():
    """Total stride 2 (the pool), so stride 1 needs shift-and-stitch over four residues."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("stride", [1, 2, 3])  # stitched residues, the FCN's own grid, a stride past it
def test_export_sliding_classifier(stride):
    clf = crop_classifier()
    model = pyops.nn.SlidingClassifier(clf, 16, stride=stride)
    x = rand(2, 3, 23, 21, seed=5)
    with torch.no_grad():
        program = export_roundtrip(model, (x,))
        got = program.module()(x)
        expected = reference.crop_loop(clf, x, 16, stride)
    assert "pyops.sliding_head.default" in call_targets(program)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("algorithm", ["direct", "fft"])
def test_export_fully_convolutional_strict_and_by_fft(strict, algorithm):
    """Strict export traces with Dynamo, which cannot trace the lock of pyops' flag blocks (the cuDNN TF32 flag
    around the features, the matmul one in the FFT layer); the FFT head's spectra are made inside the trace, never
    cached from its fake tensors (both raised). The converted model's map is every 16x16 crop's scores."""
    clf = crop_classifier()
    fcn = pyops.convolutionalize(clf, 16)

    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.fcn = fcn

        def forward(self, images):
            return self.fcn(images, algorithm=algorithm)

    x = rand(1, 3, 22, 21, seed=7)
    with torch.no_grad():
        program = torch.export.export(Scores(), (x,), strict=strict)
        assert fcn._derived is None  # nothing derived from the trace's fake tensors was kept
        expected = reference.crop_loop(clf, x, 16, 2)  # the FCN's own grid: stride 2 (one 2x2 pool)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fcn(x, algorithm=algorithm), expected, rtol=1e-5, atol=1e-5)


def test_export_sliding_classifier_by_fft():
    clf = crop_classifier()
    model = pyops.nn.SlidingClassifier(clf, 16, stride=1)
    x = rand(1, 3, 22, 21, seed=8)
    with torch.no_grad():
        program = torch.export.export(model, (x,), kwargs={"algorithm": "fft"})
        got = program.module()(x, algorithm="fft")
    torch.testing.assert_close(got, reference.crop_loop(clf, x, 16, 1), rtol=1e-5, atol=1e-5)


def test_export_sliding_classifier_refuses_a_dynamic_image_size():
    model = pyops.nn.SlidingClassifier(crop_classifier(), 16, stride=1)
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad(), pytest.raises(Exception, match="batch"):  # the tiling plan specializes on the sizes
        torch.export.export(model, (rand(2, 3, 23, 21),), dynamic_shapes=({0: batch},))


def test_compiled_sliding_classifier_plans_outside_the_graph():
    """The tiling plan runs the features on fake tensors. Traced by dynamo, that call became a compiled graph
    that then ran on the fake input (a segfault with inductor's C++ kernels): planning must stay eager."""
    calls = []

    def backend(gm, example_inputs):
        def run(*args):
            calls.append(any(isinstance(a, FakeTensor) for a in args))
            return gm(*args)
        return run

    clf = crop_classifier()
    model = pyops.nn.SlidingClassifier(clf, 16, stride=1)
    x = rand(2, 3, 23, 21, seed=6)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
        expected = reference.crop_loop(clf, x, 16, 1)
    assert calls and not any(calls)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_jit_trace_as_a_processs_first_call():
    """The bf16 capability query (Python and C++) made first inside torch.jit.trace was recorded, and the tracer
    cannot record its bool output: tracing a bf16 fused model, or any in a bf16 autocast region, as a process's first
    pyops call raised. A fresh process, so that nothing has asked before."""
    code = textwrap.dedent("""
        import torch, warnings
        from torch import nn
        import pyops
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.Conv2d(64, 96, 3), nn.BatchNorm2d(96), nn.ReLU()).eval()
        x = torch.randn(1, 64, 8, 8)
        with torch.no_grad():
            torch.jit.trace(pyops.fuse(model).bfloat16(), x.bfloat16(), check_trace=False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.jit.trace(pyops.fuse(model), x, check_trace=False)
        print("traced")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "traced" in run.stdout, run.stderr[-2000:]


def test_jit_trace_keeps_the_pyops_ops():
    """TorchScript tracing (a libtorch deployment loads the library and the saved module): the fused network, a
    conv1d layer and the sliding classifier trace to graphs of our ops, save, load and compute the same."""
    torch.manual_seed(0)
    clf = crop_classifier()
    cases = [(pyops.fuse(randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()), rand(2, 3, 64, 64),
              "pyops::conv2d_bias_act"),
             (nn.Sequential(pyops.nn.Conv1d(4, 6, 3), nn.ReLU()).eval(), rand(2, 4, 20), "pyops::conv1d"),
             (pyops.nn.SlidingClassifier(clf, 16, stride=1), rand(1, 3, 23, 21), "pyops::sliding_head")]
    for model, x, op in cases:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # sizes baked in: the trace is for this shape
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.14 deprecates TorchScript for torch.export
            traced = torch.jit.trace(model, x)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
            assert op in {n.kind() for n in loaded.inlined_graph.nodes()}
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)  # eager may take the packed path


def test_jit_trace_of_a_fused_resnet_warns_nothing_of_ours():
    """The residual's shape test (the kernel's add or PyTorch's broadcasting one) gave a TracerWarning per block:
    64 alarming lines for a trace that is right at every input size (the op checks the shape itself)."""
    model = pyops.fuse(randomize_bn(torchvision.models.resnet18(num_classes=10)).eval())
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, rand(1, 3, 64, 64), check_trace=False)
    ours = [w for w in caught if "pyops" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours[:3]]
    x = rand(3, 3, 80, 72)  # another batch and size
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


class _UsesFunctionalOps(nn.Module):
    """pyops' functions called from a user's forward, as a model would: FX must record each as one call."""

    def __init__(self):
        super().__init__()
        self.conv = pyops.nn.Conv1d(4, 6, 3, padding="same", padding_mode="reflect")
        self.weight = nn.Parameter(rand(6, 6, 3, seed=3))
        self.bn = (rand(6, seed=4), rand(6, seed=5), rand(6, seed=6), rand(6, seed=7).abs() + 0.5)

    def forward(self, x):
        y = pyops.conv1d(self.conv(x), self.weight, None, padding=1)             # (N, 6, L)
        scores = pyops.conv2d_bn_relu(y.unsqueeze(1), self.weight[:, :2].unsqueeze(1), None, *self.bn,
                                      padding=(0, 1))                             # (N, 6, 5, L)
        return pyops.smooth_max(y, 2.0, dim=-1), pyops.lse_pool2d(scores, 3.0)


def test_jit_script_names_the_pyops_module_it_cannot_compile():
    """TorchScript cannot compile pyops' forwards; its own errors pointed into pyops internals (wrong file names,
    a false 'undefined value'). Scripting a pyops module, or a model holding one, names it and the alternatives."""
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    modules = [pyops.nn.Conv1d(4, 4, 3), pyops.nn.ConvBNReLU2d(4, 4, 3), pyops.nn.LinearBNReLU(4, 4),
               pyops.fuse(nn.Sequential(conv, bn, nn.ReLU()).eval()),
               nn.Sequential(nn.ReLU(), pyops.nn.SlidingClassifier(crop_classifier(), 16)),
               pyops.fft_conv.FFTConv2d(torch.randn(2, 3, 3, 3), None, 8)]
    for module, name in zip(modules, ["pyops.nn.Conv1d", "pyops.nn.ConvBNReLU2d", "pyops.nn.LinearBNReLU",
                                      "pyops.nn.ConvBNReLU2d", "pyops.nn.SlidingClassifier", "FFTConv2d"]):
        with pytest.raises(RuntimeError, match=f"{name} does not support torch.jit.script: use torch.jit.trace"):
            torch.jit.script(module)


def test_fx_symbolic_trace_of_models_using_pyops():
    """torch.fx.symbolic_trace (FX quantization and graph rewriting start there) of a fused torchvision network, of
    a model calling pyops' functions and of the sliding classifier: each pyops function or fused layer is one call
    in the graph, the GraphModule computes what the model does, and it survives pickling (torch.save)."""
    torch.manual_seed(0)
    cases = [(pyops.fuse(randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()), rand(2, 3, 64, 64),
              {"_conv_bn_relu2d_forward"}),
             (pyops.fuse(nn.Sequential(nn.Linear(8, 5), randomize_bn(nn.BatchNorm1d(5)), nn.ReLU()).eval()),
              rand(3, 8), {"_linear_bn_relu_forward"}),
             (_UsesFunctionalOps(), rand(2, 4, 20), {"conv1d", "conv2d_bn_relu", "smooth_max", "lse_pool2d"}),
             (pyops.nn.SlidingClassifier(crop_classifier(), 16, stride=2), rand(1, 3, 23, 21), {"classify_fcn"})]
    for model, x, functions in cases:
        with torch.no_grad():
            traced = torch.fx.symbolic_trace(model)
            called = {getattr(n.target, "__name__", None) for n in traced.graph.nodes if n.op == "call_function"}
            assert functions <= called, (functions, called)
            buffer = io.BytesIO()
            torch.save(traced, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
            expected = model(x)
            for got in (traced(x), loaded(x)):
                for g, e in zip(got if isinstance(got, tuple) else (got,),
                                expected if isinstance(expected, tuple) else (expected,)):
                    torch.testing.assert_close(g, e, rtol=0, atol=0)


class _Wraps(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def test_fx_symbolic_trace_keeps_the_fused_layers_pre_hooks():
    """Pruning and old-style weight_norm recompute layer.weight in a forward pre-hook. Symbolic tracing runs the hook
    (its ops go into the graph) and then the fused layer's forward function, which read module.weight when the
    graph ran, past the hook: the tracer's Proxy right after tracing (an error, or a Proxy returned), a stale weight
    after an update of the hook's inputs. The forwards now pass on the weight they read."""
    torch.manual_seed(0)
    layers = [(torch.nn.utils.prune.l1_unstructured(pyops.nn.ConvBNReLU2d(8, 8, 3).eval(), "weight", 0.3),
               rand(1, 8, 6, 6), "weight_orig"),
              (torch.nn.utils.weight_norm(pyops.nn.ConvBNReLU2d(8, 8, 3).eval()), rand(2, 8, 6, 6), "weight_g"),
              (torch.nn.utils.weight_norm(pyops.nn.ConvBNReLU2d(8, 8, 3).eval()), rand(8, 6, 6), "weight_g"),
              (torch.nn.utils.weight_norm(pyops.nn.LinearBNReLU(4, 5).eval()), rand(3, 4), "weight_g"),
              (torch.nn.utils.prune.l1_unstructured(pyops.nn.LinearBNReLU(4, 5).eval(), "weight", 0.3), rand(3, 4),
               "weight_orig"),
              (torch.nn.utils.weight_norm(pyops.nn.FoldedConv1d(4, 4, 3)), rand(2, 4, 10), "weight_g")]
    for layer, x, source in layers:
        net = _Wraps(layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (old-style weight_norm's deprecation)
            traced = torch.fx.symbolic_trace(net)
        for step in range(2):
            with torch.no_grad():
                got = traced(x)
                assert type(got) is torch.Tensor
                torch.testing.assert_close(got, net(x), rtol=0, atol=0)
                getattr(layer, source).mul_(2.0)  # an optimizer's step on what the hook reads


def test_public_functions_follow_the_torch_function_protocol():
    """A tensor subclass with __torch_function__ sees each public pyops function called on it (as it sees
    torch.nn.functional's), and gets its result back as that subclass."""
    class Tracked(torch.Tensor):
        seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = rand(2, 4, 20).as_subclass(Tracked)
    weight, bn = rand(6, 4, 3, seed=1), [rand(6, seed=s) for s in (2, 3, 4)] + [rand(6, seed=5).abs() + 0.5]
    calls = [(pyops.conv1d, (x, weight)),
             (pyops.conv1d_bias_act, (x, weight)),
             (pyops.smooth_max, (x, 2.0)),
             (pyops.lse_pool2d, (x.unsqueeze(0), 2.0)),
             (pyops.conv2d_bn_relu, (x.unsqueeze(0), weight[:, :2, None], None, *bn)),
             (pyops.sliding_head, (x.unsqueeze(0), [weight[:, :2, None]]))]
    for function, args in calls:
        Tracked.seen.clear()
        with torch.no_grad():
            out = function(*args)
        assert Tracked.seen[0] is function and isinstance(out, Tracked), function.__name__
        plain = function(*[a.as_subclass(torch.Tensor) if isinstance(a, Tracked) else a for a in args])
        torch.testing.assert_close(out.as_subclass(torch.Tensor), plain, rtol=0, atol=0)


def test_each_public_function_compiles_under_its_own_code_object():
    """torch.compile keeps compiled entries per code object, at most recompile_limit (8) of them: the public
    functions once shared one wrapper code, and compiling a ninth entry across them with fullgraph=True failed."""
    torch._dynamo.reset()
    w, mean, var = rand(3, 4, 3, 3, seed=1), rand(3, seed=2), rand(3, seed=3).abs() + 1
    cases = [(pyops.smooth_max, lambda x: (x, 2.0)), (pyops.lse_pool2d, lambda x: (x, 2.0)),
             (pyops.conv1d, lambda x: (x[:, :, 0], w[:, :, 0])), (pyops.conv1d_bias_act, lambda x: (x[:, :, 0], w[:, :, 0])),
             (pyops.conv_bn_relu.conv2d_bias_act, lambda x: (x, w)),
             (pyops.conv2d_bn_relu, lambda x: (x, w, None, None, None, mean, var))]
    assert len({fn.__code__ for fn, _ in cases}) == len(cases)
    assert all(fn.__code__.co_name == fn.__name__ for fn, _ in cases)
    with torch.no_grad():
        for size in (8, 9):  # a static and a dynamic entry each: ten in all
            x = rand(2, 4, size, size, seed=size)
            for fn, args in cases:
                torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(*args(x)),
                                           fn(*args(x)), rtol=1e-6, atol=1e-6)
