"""convolutionalize: a crop classifier (features → flatten → Linear head) as a fully convolutional network.

The model is traced with torch.fx. The node that flattens the feature map (torch.flatten, nn.Flatten, Tensor.view /
reshape / flatten) splits it: everything before is the feature extractor, kept as is; after it may only come Linear,
ReLU, Dropout, BatchNorm1d and Identity. The first Linear becomes a Conv2d whose kernel is the feature map of one
window (weights reshaped, not retrained), later Linears 1×1 convs; BatchNorm1d layers (eval statistics) fold into
the neighbouring Linear. The converted module runs its head as one pyops::sliding_head op.
"""
import contextlib
import copy

import torch
import torch.fx
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
from torch.utils._python_dispatch import _disable_current_modes

from ._checks import as_int, convolution_autocast_dtype, in_autocast_region, int_tuple
from ._derived import DerivedWeights
from ._flags import autocast_cache_disabled, autocast_off, eval_mode, jit_tracing_paused, tf32
from ._hooks import has_hooks
from .fft_conv import FFTConv2d
from .sliding_head import DEFAULT_WORKSPACE, PRECISIONS, sliding_head

ALGORITHMS = ("auto", "direct", "fft")
# algorithm="auto" takes the FFT for first head layers at least this large on CUDA (fp32 / float64 at precision
# "fp32"). Measured on an H200 with Net1's 18x18 layer (bench/NOTES-sliding.md): the FFT head 19.8x the direct
# layer on a 34x34 map, 2.6x our direct head and 1.55x cuDNN's Net2 at 64x64 B=4, 9.4x Net2 at 128x128, with a
# relative error of 3.7e-7 (cuDNN's fp32 convolution: 1.8e-7). Smaller kernels save fewer operations and were not
# measured. On the CPU the direct head stays the default: the FFT also wins there (4.4-5.6x on the layer), but its
# weight spectra take ~35 s to make on a 2-core machine and ~4x the layer's weight memory.
_AUTO_FFT_MIN_KERNEL = 16

_FLATTEN_METHODS = ("view", "reshape", "flatten")
_RELUS = (torch.relu, nn.functional.relu)
_DROPOUTS = (nn.functional.dropout,)
# The growth used to measure the total stride S: a window grown by it gives a feature map about it / S larger.
_STRIDE_PROBE = 2 ** 20
_NO_STRIDE = ("argument 'model': the features have no integer total stride (their map does not grow by one position "
              "per fixed step of the input: a layer fixes its size, e.g. an adaptive pool, a LayerNorm or Linear over "
              "H or W, or a permute before the flatten); cannot convolutionalize")


class FullyConvolutional(DerivedWeights):
    """features → head, where head = Conv2d(kernel = one window's feature map) → [ReLU/Dropout] → 1×1 Conv2d …

    Attributes: window (h, w); stride (Sy, Sx): the features' total downsampling (output (i, j) is the window at
    offset (i·Sy, j·Sx)); in_channels; padded: the features pad somewhere (then output ≠ per-crop evaluation near
    the crop borders). forward: (B, C, H, W) → (B, classes, ⌊(H−h)/Sy⌋+1, ⌊(W−w)/Sx⌋+1).

    forward(x, precision="fp32", workspace_bytes, algorithm="auto"): the head's first (large-kernel) layer by the
    direct convolution (algorithm="direct": im2col + GEMM in the sliding_head op) or by pyops.fft_conv.FFTConv2d
    (algorithm="fft": far fewer operations, fp32 or float64 only, error of the order of fp32's own direct sum; its
    weight spectra, ~T²/(kh·kw) times the layer's weight memory, are made on first use and kept until the weight
    changes or the module is moved). "auto" (see resolve_algorithm) takes the FFT on CUDA for kernels of at least
    16×16 at precision "fp32", else the direct head. The 1×1 layers after it run in the sliding_head op either way.
    """

    _transient = ("_derived", "_cast_cache")

    def __init__(self, features, head, window, stride, in_channels, padded):
        super().__init__()
        self.features, self.head = features, head
        self.window, self.stride, self.in_channels, self.padded = window, stride, in_channels, padded
        self._cast_cache = None  # a derived() slot: the head's bf16 weights and biases

    def forward(self, x, precision="fp32", workspace_bytes=DEFAULT_WORKSPACE, algorithm="auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"argument 'precision' must be one of {PRECISIONS}, got {precision!r}")
        algorithm = self.resolve_algorithm(algorithm, precision, x)
        with _cudnn_tf32(precision == "tf32"):
            f = self.features(x)
        if self.training or (torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in self.head.parameters()))):
            # training / gradients: plain modules (the op is inference only), computing as the op does: in a CPU
            # autocast region whose dtype the CPU does not compute natively, in the head's dtype, float32 (autocast
            # ran the modules in bfloat16: another dtype and other values than the same call without gradients)
            if f.device.type == "cpu" and in_autocast_region(f.device) and \
                    convolution_autocast_dtype(f.device) is torch.float32:
                with autocast_off(f.device):
                    return self.head(f.to(next(self.head.parameters()).dtype))
            return self.head(f)
        weights, biases, relu = self._head_operands(precision, f.dtype)
        if algorithm == "direct":
            return sliding_head(f, weights, biases, relu, precision, workspace_bytes)
        region = in_autocast_region(f.device)
        if f.dtype in (torch.float16, torch.bfloat16) and region:
            f = f.float()  # features autocast to half precision: the FFT layer computes in float32 all the same
        if f.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"argument 'algorithm' = 'fft' takes float32 or float64 inputs, got {f.dtype}")
        with torch.no_grad():
            y = self._fft_layer(weights[0])(f).add_(biases[0].view(1, -1, 1, 1))
            if relu[0]:
                y.relu_()
        if len(weights) == 1:  # (in a region: the dtype the direct head returns there, whatever the head's depth)
            return y.to(convolution_autocast_dtype(f.device)) if region and f.dtype is not torch.float64 else y
        return sliding_head(y, weights[1:], biases[1:], relu[1:], precision, workspace_bytes)

    def resolve_algorithm(self, algorithm, precision, x):
        """"direct" or "fft" for input x: algorithm itself once checked, or what "auto" picks (the FFT on CUDA for
        float32/float64 at precision "fp32" when the first head layer's kernel is at least 16×16)."""
        check_algorithm(algorithm, precision)
        if algorithm != "auto":
            return algorithm
        first = next(m for m in self.head if isinstance(m, nn.Conv2d))
        fft = (x.is_cuda and precision == "fp32" and x.dtype in (torch.float32, torch.float64)
               and min(first.kernel_size) >= _AUTO_FFT_MIN_KERNEL)
        return "fft" if fft else "direct"

    def _fft_layer(self, weight):
        """FFTConv2d(weight) (no bias: a bias-free head gets a fresh zero bias each call), made once and kept while
        the weight stays the same tensor (data pointer and version): one set of spectra at a time."""
        return self.derived("fft", (weight,), lambda: FFTConv2d(weight.detach()))

    def _head_operands(self, precision, dtype):
        convs, relu = [], []  # relu[i]: a ReLU follows conv i (Dropout between is the identity in eval)
        for m in self.head:
            if isinstance(m, nn.Conv2d):
                convs.append(m)
                relu.append(False)
            elif isinstance(m, nn.ReLU):
                relu[-1] = True
        weights = [c.weight for c in convs]
        biases = [c.bias if c.bias is not None else torch.zeros_like(c.weight[:, 0, 0, 0]) for c in convs]
        if precision != "bf16" or dtype == torch.bfloat16:
            return weights, biases, relu
        # bf16: the operands are cast once and kept until a weight or bias changes (replaced, or updated in place;
        # the zero biases made above for bias-free layers are not part of the key).
        sources = weights + [c.bias for c in convs if c.bias is not None]
        cast_weights, cast_biases = self.derived(
            "bf16", sources, lambda: ([w.detach().to(torch.bfloat16) for w in weights],
                                      [b.detach().to(torch.bfloat16) for b in biases]), slot="_cast_cache")
        return cast_weights, cast_biases, relu


def check_algorithm(algorithm, precision):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"argument 'algorithm' must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "fft" and precision != "fp32":
        raise ValueError(f"argument 'algorithm' = 'fft' computes in the input's precision (fp32 or float64); "
                         f"argument 'precision' must be 'fp32', got {precision!r}")


def _cudnn_tf32(allow):
    """cuDNN's convolutions in TF32 (allow) or exact fp32 inside a block, for the features: precision="tf32" on,
    otherwise off."""
    return tf32("conv", allow)


def convolutionalize(model, window, in_channels=None):
    """A fully convolutional copy of a crop classifier (the input model is not modified).

    Args:
        model: nn.Module mapping (B, C, h, w) crops to (B, classes): features, a flatten, then Linear layers with
            ReLU/Dropout/BatchNorm1d between (BatchNorm uses its running statistics, i.e. eval semantics). Hooks on
            modules of the features are kept (those modules run as they are); hooks on the model itself or on the
            head's layers are refused (the converted head cannot run them).
        window: int or (h, w), the crop size the classifier takes.
        in_channels: C, the crops' channels; default: those of the first conv-like layer or BatchNorm2d the
            features call (give it where forward changes the channels first: a PixelUnshuffle, a grayscale mean).
    Returns:
        FullyConvolutional in eval mode: (B, C, H, W) → (B, classes, ⌊(H−h)/Sy⌋+1, ⌊(W−w)/Sx⌋+1), with no
        nn.Linear left. Raises ValueError naming the layer it cannot convert, and for features that do not slide:
        the conversion is checked on a probe image (see _check_slides), which catches what no layer list can
        (a GroupNorm, a mean over the map, an F.pad or transpose in forward). Features that pad in a layer (a conv,
        a pool, a padding layer; or pool with ceil_mode) are known to differ near the crop borders: `padded`, and
        sliding_classify warns; they are not probed (no exact comparison exists), so a GroupNorm among padded
        features is not caught: evaluate such models with sliding_classify(exact=True).
    """
    return _convolutionalize(model, window, in_channels, "in_channels")


def _convolutionalize(model, window, in_channels, channels_from):
    """convolutionalize; channels_from: what in_channels came from, for errors ("in_channels", "images")."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    window = _window(window)
    if in_channels is not None:
        in_channels = as_int(in_channels, "in_channels", 1)
    if has_hooks(model):
        raise ValueError(f"argument 'model' has hooks on {type(model).__name__} itself, which the converted network "
                         "cannot run (torch.fx traces its forward, not its call); put them on a submodule of the "
                         "features or remove them")
    # Traced in eval mode: the trace records what forward reads of self.training (F.dropout(x, p, self.training)
    # ran dropout in the converted features of a train-mode model); features shares model's modules, and a
    # train-mode BatchNorm would count the fake runs. Whatever forward stores on the modules during the trace and
    # the runs below (`self.last = x`: a Proxy, a probe's tensor) is undone.
    with _attributes_kept(model), eval_mode(model):
        try:
            traced = _SlidingTracer.trace_module(model)
        except Exception as e:  # noqa: BLE001  (any tracing failure is reported as what it is)
            raise ValueError(f"argument 'model': torch.fx cannot trace {type(model).__name__} ({e}); "
                             "convolutionalize needs a traceable features → flatten → Linear model") from e
        flatten = _find_flatten(traced)
        features = _features_module(traced, flatten)
        ops = _head_ops(traced, flatten)
        inferred = in_channels is None
        if inferred:
            in_channels = _input_channels(features)
        fmap, stride = _feature_geometry(features, in_channels, window, model,
                                         None if inferred else channels_from)
        head = _build_head(ops, fmap)
        fcn = FullyConvolutional(copy.deepcopy(features), head, window, stride, in_channels,
                                 _is_padded(features)).eval()
        if not fcn.padded:
            _check_slides(fcn, model)
    return fcn


class _SlidingTracer(torch.fx.Tracer):
    """torch.fx's default tracer, keeping modules with hooks as leaves: traced through, their hooks would never run
    in the converted features; as leaves they are called, hooks and all. A fused head layer (pyops.fuse's
    LinearBNReLU) is a leaf too: the head's conversion reads its weight and activation."""

    def is_leaf_module(self, m, qualname):
        return has_hooks(m) or _is_linear_bn_relu(m) or super().is_leaf_module(m, qualname)

    @classmethod
    def trace_module(cls, root):
        tracer = cls()
        graph = tracer.trace(root)
        return torch.fx.GraphModule(tracer.root, graph, type(root).__name__)


_MISSING = object()


@contextlib.contextmanager
def _attributes_kept(model):
    """model's modules keep their attributes: what forward stores during the block (`self.last = x`, e.g. kept
    for Grad-CAM: symbolic tracing left a torch.fx Proxy there, which made the model unpicklable) is undone. The
    attribute dicts are restored entry by entry (by identity: a tensor's == is elementwise)."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for m, before in saved:
            now = m.__dict__
            for name in [name for name in now if name not in before]:
                del now[name]
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    now[name] = value


def _check_slides(fcn, model):
    """ValueError unless fcn's scores on a probe image equal model's on the probe's crops, and the features' map of
    the probe equals their map of each crop.

    The probe holds 3×3 crops (one total stride apart), so that every crop has image pixels beyond its borders:
    features that look past a crop (an F.pad in forward, a transpose of H and W) or at the whole map (GroupNorm,
    InstanceNorm, a mean over H×W) give other scores there, which a list of allowed layers could not tell. Two of
    its corners hold the probe's largest and smallest values, each inside one crop only, and each crop runs on its
    own: a normalization by the image's (or the batch's) max or min then differs on every other crop (a probe whose
    extremes every crop shared, or a batch of all crops, let x / x.amax() through). The feature maps are compared
    element by element at the features' scale, the scores at the largest score's (a class scoring 1000 hid
    another's mismatch in the scores alone; a tolerance per class refused valid models, whose rounding follows the
    terms a class sums, not its score). A probe giving non-finite values (log or sqrt of its negative pixels) is
    made non-negative; non-finite values that remain are refused: nothing could be compared. It costs about twenty
    of the model's crop evaluations, once per conversion. Under a fake mode (torch.export, torch.compile tracing
    the conversion) there is no data to compare, and the check is skipped.
    """
    param = next(model.parameters(), None)
    if param is None or detect_fake_mode() is not None or isinstance(param, FakeTensor) \
            or param.device.type == "meta":
        return
    (h, w), (sy, sx) = fcn.window, fcn.stride
    probe = torch.randn(1, fcn.in_channels, h + 2 * sy, w + 2 * sx, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    peak = probe.abs().max()
    probe[..., 0, 0], probe[..., -1, -1] = 4 * peak, -4 * peak
    tolerance = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2}.get(param.dtype, 3e-2)
    for attempt in (probe, probe.abs()):
        runs = _probe_runs(fcn, model, attempt.to(param.device, param.dtype))
        if all(t.isfinite().all() for t in runs):
            break
    dense, per_crop, dense_map, crop_maps = runs
    if not all(t.isfinite().all() for t in runs):
        mismatch = "non-finite values, so nothing could be compared"
    elif per_crop.shape != dense.shape:
        mismatch = f"scores of shape {tuple(dense.shape)} where the crops give {tuple(per_crop.shape)}"
    else:
        mismatch = (_mismatch(dense, per_crop, tolerance, "scores", "score")
                    or _mismatch(dense_map, crop_maps, tolerance, "a feature map", "feature"))
    if mismatch is not None:
        raise ValueError(f"argument 'model': its features do not slide: on a probe image of 3x3 crops the converted "
                         f"network gives {mismatch}. Features that look past a crop (F.pad or a transpose in "
                         "forward) or at the whole map (GroupNorm, InstanceNorm, a mean, max or min over H and W) "
                         "are not a per-crop classifier run densely; sliding_classify(..., exact=True) evaluates the "
                         "crops themselves")


def _probe_runs(fcn, model, probe):
    """(dense scores (classes, 3, 3), the model's on each crop alone (classes, 3, 3), the features' map of the probe
    as windows (9, C', fh, fw), their map of each crop alone (9, C', fh, fw)) for a (1, C, h + 2Sy, w + 2Sx) probe.
    model is in eval mode already (convolutionalize's block)."""
    (h, w), (sy, sx) = fcn.window, fcn.stride
    # (both sides exact fp32, also inside a caller's autocast region, where the head op and the model's Linears
    # would compute in different dtypes)
    # (and unseen by the caller's dispatch modes, pyops.count_ops and FlopCounterMode: no work of the model's)
    with torch.no_grad(), jit_tracing_paused(), _cudnn_tf32(False), autocast_off(probe.device), \
            _disable_current_modes():
        dense = fcn(probe, algorithm="direct")[0]  # (no FFT spectra made for the probe)
        crops = probe.unfold(2, h, sy).unfold(3, w, sx)[0].permute(1, 2, 0, 3, 4).flatten(0, 1)  # (9, C, h, w)
        scores = [model(crop[None]) for crop in crops]
        for s in scores:
            if not isinstance(s, torch.Tensor):
                raise ValueError(f"argument 'model' returns {type(s).__name__}; convolutionalize needs a model "
                                 "returning the (B, classes) scores tensor")
        dense_map = fcn.features(probe)[0]  # (C', fh + 2, fw + 2)
        crop_maps = torch.cat([fcn.features(crop[None]) for crop in crops])
    fh, fw = crop_maps.shape[-2:]
    windows = dense_map.unfold(1, fh, 1).unfold(2, fw, 1).permute(1, 2, 0, 3, 4).flatten(0, 1)
    per_crop = torch.cat(scores).T.reshape(-1, 3, 3) if all(s.dim() == 2 for s in scores) else torch.stack(scores)
    return dense, per_crop, windows, crop_maps


def _mismatch(got, want, tolerance, what, item):
    """None if got is within tolerance of want at want's largest magnitude, else the mismatch described."""
    scale = want.abs().max().item()
    error = (got - want).abs().max().item()
    if error <= tolerance * max(scale, 1e-30):
        return None
    return f"{what} up to {error:.3g} away from the crops' own (largest {item} {scale:.3g})"


def _window(window):
    return int_tuple(window, "window", 2, 1)


def _node_label(traced, node):
    if node.op == "call_module":
        return f"'{node.target}' ({type(traced.get_submodule(node.target)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}' ({node.op} {name})"


def _is_flatten(traced, node):
    if node.op == "call_function":  # (pyops.fuse writes a model's `.view` as view_or_copy)
        from .fuse import view_or_copy  # (pyops.fuse imports pyops.nn, which imports this module)
        return node.target in (torch.flatten, torch.reshape, view_or_copy)
    if node.op == "call_method":
        return node.target in _FLATTEN_METHODS
    return node.op == "call_module" and isinstance(traced.get_submodule(node.target), nn.Flatten)


def _find_flatten(traced):
    for node in traced.graph.nodes:
        if _is_flatten(traced, node):
            return node
    raise ValueError("argument 'model' has no flatten (torch.flatten, nn.Flatten, view or reshape) followed by a "
                     "Linear head: there is nothing to convolutionalize")


def _first_input(node):
    """The tensor a call node takes first, positional or by keyword (torch.flatten(input=x, start_dim=1))."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _features_module(traced, flatten):
    """A GraphModule computing the flatten's input: the feature extractor."""
    graph, env = torch.fx.Graph(), {}
    for node in traced.graph.nodes:
        if node is flatten:
            graph.output(env[_first_input(flatten)])
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    features = torch.fx.GraphModule(traced, graph)
    features.graph.eliminate_dead_code()  # e.g. the x.size(0) that fed a view
    features.recompile()
    return features


def _head_ops(traced, flatten):
    """The chain after the flatten as [("linear"|"relu"|"dropout"|"bn", module or None, label)], checked."""
    ops, node = [], flatten
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise ValueError(f"argument 'model': {_node_label(traced, node)} after the flatten feeds {len(users)} "
                             "nodes; convolutionalize needs one chain of Linear/ReLU/Dropout/BatchNorm1d layers")
        nxt = users[0]
        if nxt.op == "output":
            if nxt.args[0] is not node:
                raise ValueError("argument 'model' returns its scores inside a tuple, list or dict; convolutionalize "
                                 "needs a model returning the (B, classes) scores tensor")
            break
        if _first_input(nxt) is not node:
            raise ValueError(f"argument 'model': cannot convert layer {_node_label(traced, nxt)}: it does not take "
                             "the previous layer's output as its input")
        label = _node_label(traced, nxt)
        mod = traced.get_submodule(nxt.target) if nxt.op == "call_module" else None
        if mod is not None and has_hooks(mod):
            raise ValueError(f"argument 'model': layer {label} after the flatten has hooks, which the converted head "
                             "cannot run")
        if isinstance(mod, nn.Linear):
            ops.append(("linear", mod, label))
        elif _is_linear_bn_relu(mod):  # a Linear with its activation
            if mod.activation not in ("none", "relu"):
                raise ValueError(f"argument 'model': cannot convert layer {label} after the flatten: its activation "
                                 f"{mod.activation!r} is not supported in the head (only ReLU)")
            ops += [("linear", mod, label)] + ([("relu", None, label)] if mod.activation == "relu" else [])
        elif isinstance(mod, nn.ReLU) or (nxt.op == "call_function" and nxt.target in _RELUS) or (
                nxt.op == "call_method" and nxt.target in ("relu", "relu_")):
            ops.append(("relu", None, label))
        elif isinstance(mod, nn.Dropout) or (nxt.op == "call_function" and nxt.target in _DROPOUTS):
            ops.append(("dropout", mod, label))
        elif isinstance(mod, nn.BatchNorm1d):
            ops.append(("bn", mod, label))
        elif not isinstance(mod, nn.Identity):
            raise ValueError(f"argument 'model': cannot convert layer {label} after the flatten: only Linear, ReLU, "
                             "Dropout, BatchNorm1d and Identity may follow it")
        node = nxt
    if not any(kind == "linear" for kind, _, _ in ops):
        raise ValueError("argument 'model' has no Linear layer after its flatten: there is nothing to convolutionalize")
    first_linear = next(i for i, op in enumerate(ops) if op[0] == "linear")
    for kind, _, label in ops[:first_linear]:
        if kind == "relu":
            raise ValueError(f"argument 'model': cannot convert layer {label}: a ReLU between the flatten and the "
                             "first Linear is not supported (move it before the flatten)")
    return ops


def _is_linear_bn_relu(module):
    from .nn import LinearBNReLU  # (pyops.nn imports this module)
    return isinstance(module, LinearBNReLU)


def _input_channels(features):
    """The channels the features take: those of the first conv-like module (Conv2d, pyops.nn.ConvBNReLU2d: any
    with in_channels) or BatchNorm2d the graph calls, or hands to a function (a fused layer's forward is recorded
    as a function of its module: pyops/_overrides.py)."""
    for node in features.graph.nodes:
        if node.op == "call_module":  # (a hooked container is a leaf: its first layer counts)
            mods = features.get_submodule(node.target).modules()
        elif node.op == "call_function":
            mods = [_attribute(features, a.target) for a in node.args
                    if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        else:
            continue
        for mod in mods:
            if isinstance(getattr(mod, "in_channels", None), int):
                return mod.in_channels
            if isinstance(mod, nn.BatchNorm2d):
                return mod.num_features
    raise ValueError("argument 'model': cannot infer the input channels (no Conv2d/BatchNorm2d in the features): "
                     "give them as in_channels")


def _attribute(module, target):
    for name in target.split("."):
        module = getattr(module, name)
    return module


@torch.compiler.disable  # never traced: a compiled graph of module, called on the fake input, would read its no data
def fake_run(module, shape, dtype, device):
    """module on a fake (B, C, H, W) input: shapes only, no memory, no compute. Under a fake mode already (torch.export
    traces with one, its fake parameters belong to it) the run uses that mode, and records nothing into the graph;
    nor into torch.jit.trace's. Autocast's cache is off meanwhile: in an autocast region, a weight cast during the
    fake run would be kept as a fake tensor and served to the real calls that follow."""
    active = detect_fake_mode()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if active is None else active
    # Outside a fake mode, the caller's dispatch modes (pyops.count_ops, FlopCounterMode) do not see the probe: it
    # is no work of the model (a 2^20-pixel stride probe was counted as 1e14 multiplications).
    untraced = _disable_current_modes() if active is None else disable_proxy_modes_tracing()
    with autocast_cache_disabled(), jit_tracing_paused(), untraced, mode:
        out = module(torch.empty(shape, dtype=dtype, device=device))
    if active is None:
        # Our mode's converter holds weak references to the parameters it faked until the garbage collector frees
        # the mode (fake tensors and mode form cycles), and torch.utils.swap_tensors refuses a tensor with a weak
        # reference: load_state_dict under set_swap_module_params_on_conversion(True) failed after a planned call.
        converter = mode.fake_tensor_converter.meta_converter
        converter.tensor_memo.clear()
        converter.describer.lookup_tensor.clear()
    return out


def _feature_geometry(features, in_channels, window, model, channels_from=None):
    """((C, fh, fw) of one window, (Sy, Sx) total stride), from fake runs of the features. channels_from: the
    argument in_channels came from, if given (named where the features cannot take that many channels)."""
    p = next(model.parameters(), None)
    dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
    h, w = window
    try:
        f = fake_run(features, (1, in_channels, h, w), dtype, device)
    except Exception as e:  # noqa: BLE001
        blamed = f"argument 'window' = {window}"
        if channels_from is not None:
            try:
                usual = _input_channels(features)
            except ValueError:
                usual = None
            if usual is not None and usual != in_channels:
                blamed = f"argument '{channels_from}' has {in_channels} channels, but the model's first layer " \
                         f"takes {usual}"
        raise ValueError(f"{blamed}: the features cannot run on a {h}x{w} crop of {in_channels} channels "
                         f"({e})") from e
    if f.dim() != 4:
        raise ValueError(f"argument 'model': the features give a {f.dim()}-d tensor {tuple(f.shape)} before the "
                         "flatten; convolutionalize needs a (B, C, h, w) feature map")
    try:
        g = fake_run(features, (1, in_channels, h + _STRIDE_PROBE, w + _STRIDE_PROBE), dtype, device)
    except Exception as e:  # noqa: BLE001  (the crop ran: a larger input did not)
        raise ValueError(f"{_NO_STRIDE} (an input larger than the window fails: {str(e).splitlines()[0]})") from e
    # Features of total stride S (floor-rounded convs and pools) satisfy size(x + S) = size(x) + 1 exactly: S is
    # the growth over _STRIDE_PROBE, rounded, and confirmed by runs grown by S and 7·S.
    steps = [grown - base for grown, base in ((g.shape[2], f.shape[2]), (g.shape[3], f.shape[3]))]
    stride = tuple(round(_STRIDE_PROBE / s) if s > 0 else 0 for s in steps)
    grows_by_one = min(stride) >= 1 and all(
        tuple(fake_run(features, (1, in_channels, h + k * stride[0], w + k * stride[1]), dtype, device).shape[2:])
        == (f.shape[2] + k, f.shape[3] + k) for k in (1, 7))
    if not grows_by_one:
        raise ValueError(_NO_STRIDE)
    return tuple(f.shape[1:]), stride


def _build_head(ops, fmap):
    """nn.Sequential of Conv2d / ReLU / Dropout equal to the Linear chain on a (C, fh, fw) map."""
    C, fh, fw = fmap
    layers, pending_in = [], None  # pending_in: an affine (scale, shift) of a BatchNorm waiting for its Linear
    first, last_conv = True, None
    for kind, mod, label in ops:
        if kind == "linear":
            W = mod.weight.detach()
            b = mod.bias.detach() if mod.bias is not None else torch.zeros_like(W[:, 0])
            if first and W.shape[1] != C * fh * fw:
                raise ValueError(f"argument 'window': layer {label} takes {W.shape[1]} inputs but the features give "
                                 f"{C}x{fh}x{fw} = {C * fh * fw} for this window")
            if pending_in is not None:  # Linear(scale·x + shift) = (W·diag(scale)) x + (W shift + b)
                scale, shift = pending_in
                b = b + W @ shift
                W = W * scale
                pending_in = None
            kernel = (fh, fw) if first else (1, 1)
            conv = nn.Conv2d(W.shape[1] // (kernel[0] * kernel[1]), W.shape[0], kernel).to(W.device, W.dtype)
            with torch.no_grad():
                conv.weight.copy_(W.reshape(conv.weight.shape))
                conv.bias.copy_(b)
            layers.append(conv)
            last_conv, first = conv, False
        elif kind == "bn":
            scale, shift = _bn_affine(mod)
            if last_conv is not None and all(isinstance(m, nn.Dropout) for m in layers[layers.index(last_conv) + 1:]):
                # right after a Linear (dropouts between are the identity in eval): fold into its output
                with torch.no_grad():
                    last_conv.weight.mul_(scale.view(-1, 1, 1, 1))
                    last_conv.bias.mul_(scale).add_(shift)
            elif pending_in is None:  # before a Linear: fold into its input
                pending_in = (scale, shift)
            else:
                raise ValueError(f"argument 'model': cannot convert layer {label}: two BatchNorm1d in a row")
        elif kind == "relu":
            if pending_in is not None:
                raise ValueError(f"argument 'model': cannot convert layer {label}: it separates a BatchNorm1d from "
                                 "the Linear it would fold into")
            layers.append(nn.ReLU())
        else:  # dropout: identity in eval; kept so the module reads like the original
            layers.append(nn.Dropout(mod.p if mod is not None else 0.5))
    if pending_in is not None:
        raise ValueError("argument 'model': a BatchNorm1d at the end of the head has no Linear to fold into")
    return nn.Sequential(*layers)


def _bn_affine(bn):
    """BatchNorm1d in eval as y = scale·x + shift (running statistics)."""
    if bn.running_mean is None:
        raise ValueError("argument 'model': a BatchNorm1d without running statistics cannot be folded")
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


def _is_padded(features):
    """True when a module of the features pads (a conv, a pool, pyops' fused conv, a padding layer such as
    nn.ZeroPad2d: any with a non-zero `padding`) or pools with ceil_mode: then the FCN sees image pixels where the
    per-crop evaluation sees zeros / nothing, near the crop borders."""
    for m in features.modules():
        pad = getattr(m, "padding", 0)
        if pad == "same" or getattr(m, "ceil_mode", False):
            return True
        if pad != "valid" and any(p != 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,))):
            return True
    return False
