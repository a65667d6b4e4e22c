"""Whole-model fusion: every conv/linear → BatchNorm (→ residual add) (→ ReLU) chain of an eval-mode model becomes
one fused module (pyops.nn.ConvBNReLU2d, pyops.nn.LinearBNReLU, pyops.nn.FoldedConv1d, or a folded Conv3d or
ConvTranspose).

The chains are found on the model's torch.fx graph, so models whose forward calls submodules by attribute
(torchvision ResNet, MobileNet, VGG) are covered as well as nn.Sequential; a model that torch.fx cannot trace
(a detection model) falls back to fusing the parts it can trace (a detection model's backbone) and consecutive
modules inside its other nn.Sequential containers.
"""
import copy
import inspect
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import nn as pyops_nn
from ._hooks import HOOK_DICTS, has_hooks, move_hooks
from ._overrides import overridable
from .fold import (FOLDABLE_LAYERS, fold_bn, frozen_batchnorm_class, has_own_parameters, is_batchnorm,
                   is_foldable_batchnorm, normalizes_channels_of, out_channels)


# Augmented assignments as the traced graph calls them (InPlaceProxy): operator.iadd & co. as plain functions.
def _augmented(op):
    def augmented(a, b):
        return op(a, b)
    augmented.__name__ = augmented.__qualname__ = f"augmented_{op.__name__}"
    return augmented


AUGMENTED = {name: _augmented(getattr(operator, name)) for name in (
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "ilshift", "irshift",
    "imatmul")}
globals().update({f.__name__: f for f in AUGMENTED.values()})  # importable by name: pickled GraphModules call them


ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu",
                        F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
                        torch.sigmoid_: "sigmoid", F.sigmoid: "sigmoid"}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
ADD_FUNCTIONS = (operator.add, operator.iadd, AUGMENTED["iadd"], torch.add)
ADD_METHODS = ("add", "add_")
INPLACE_ADDS = {("call_function", operator.iadd), ("call_function", AUGMENTED["iadd"]), ("call_method", "add_")}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                     operator.irshift, operator.imatmul, operator.setitem, *AUGMENTED.values()}
FUSED_MODULES = (pyops_nn.ConvBNReLU2d, pyops_nn.LinearBNReLU, pyops_nn.FoldedConv1d)
# Ops whose output shares memory with their (first) input: a write into one is seen through the other.
# The view ops (PyTorch's "Tensor Views" list) and those that may return their input itself (contiguous, reshape,
# to, type_as, ... when nothing changes).
ALIAS_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "ravel", "squeeze", "unsqueeze",
                 "transpose", "permute", "t", "adjoint", "narrow", "select", "expand", "expand_as", "broadcast_to",
                 "__getitem__", "detach", "alias", "split", "split_with_sizes", "tensor_split", "hsplit", "vsplit",
                 "dsplit", "chunk", "unbind", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal",
                 "as_strided", "contiguous", "unfold", "view_as_real", "view_as_complex", "indices", "values",
                 "crow_indices", "col_indices", "to", "type", "type_as", "float", "double", "half", "bfloat16",
                 "cpu", "cuda", "requires_grad_", "positive", "conj", "resolve_conj", "resolve_neg", "unsafe_chunk",
                 "unsafe_split", "unsafe_split_with_sizes", "numpy"}
ALIAS_FUNCTIONS = {torch.flatten, torch.unflatten, torch.ravel, torch.reshape, torch.squeeze, torch.unsqueeze,
                   torch.transpose, torch.permute, torch.adjoint, torch.narrow, torch.select, torch.split,
                   torch.tensor_split, torch.hsplit, torch.vsplit, torch.dsplit, torch.chunk, torch.unbind,
                   torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.t, torch.diagonal,
                   torch.detach, torch.as_strided, torch.broadcast_to,
                   torch.view_as_real, torch.view_as_complex, torch.real, torch.imag, torch.atleast_1d,
                   torch.atleast_2d, torch.atleast_3d, torch.broadcast_tensors, torch.positive, torch.conj,
                   torch.resolve_conj, torch.resolve_neg, torch.unsafe_chunk, torch.unsafe_split,
                   torch.unsafe_split_with_sizes, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                   F.feature_alpha_dropout, torch.dropout, torch.feature_dropout, torch.alpha_dropout,
                   torch.feature_alpha_dropout, operator.getitem}  # (a dropout returns x when not training)
# Modules that may return their input itself or a view of it.
ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
ALIAS_ATTRIBUTES = {"T", "mT", "H", "mH", "data", "real", "imag"}


def fuse(model, inplace=False):
    """An eval-mode model computing what `model` computes, with its BatchNorms folded and activations fused.

    model: an nn.Module in eval mode (model.training False and no submodule in training mode).
    inplace: False (default) works on a deep copy and leaves `model` untouched (torch cannot deepcopy a layer
        under the old-style torch.nn.utils.weight_norm: fuse such a model with inplace=True); True skips the copy,
        so the result shares `model`'s unfused submodules and parameters: a traceable model itself is left as it
        was (the result is a new torch.fx.GraphModule built from its modules), an untraceable one is rewritten in
        place and returned.
    Returns a torch.fx.GraphModule (traceable models) or the rewritten model (fallback), in eval mode, in which
      - Conv2d → BatchNorm2d [→ add(·, residual)] [→ activation] is one pyops.nn.ConvBNReLU2d (the residual add
        and the activation are fused into the kernel's epilogue),
      - Linear → BatchNorm1d [→ activation] is one pyops.nn.LinearBNReLU,
      - Conv1d → BatchNorm1d [→ add(·, residual)] [→ activation] is one pyops.nn.FoldedConv1d, computed by pyops'
        conv1d kernels with the add and the activation applied as they store the output (it refuses the unbatched
        inputs the fold does not cover; pyops.nn.swap_conv1d(fuse(model)) computes the model's other Conv1d layers
        by pyops.conv1d too),
      - Conv3d, ConvTranspose1d/2d/3d (a decoder's, a GAN generator's) and Conv2d with a non-zero padding mode →
        BatchNorm is one folded layer of the same class (pyops.fold_bn); an activation after it stays a module of
        its own,
      - Conv2d / Conv1d [→ add(·, residual)] → activation without a BatchNorm (VGG, SqueezeNet, squeeze-excitation
        blocks), and such a layer → add, is one ConvBNReLU2d / FoldedConv1d sharing the layer's Parameters (the
        add and the activation in its epilogue; not a layer whose weight a parametrization computes); Linear →
        activation (classifier heads) likewise one LinearBNReLU, which then takes any (*, features) input.
    An activation is a ReLU (nn.ReLU, F.relu, torch.relu or Tensor.relu), ReLU6 (nn.ReLU6, F.relu6), SiLU (nn.SiLU,
    F.silu: EfficientNet's), Hardswish (nn.Hardswish, F.hardswish: MobileNetV3's), Hardsigmoid (nn.Hardsigmoid,
    F.hardsigmoid) or Sigmoid (nn.Sigmoid, torch.sigmoid, Tensor.sigmoid: the gates of MobileNetV3's and
    EfficientNet's squeeze-excitation blocks), in place or not. A link of a
    chain is fused only where the previous node's output has no other user (so no other computation sees a changed
    value); a residual add only where nothing between the layer and the add may change a tensor in place (the fused
    call reads the layer's input and the residual at the add) and not where the add writes into the residual
    (`residual += bn(conv(x))`); where a BatchNorm's input is used elsewhere, that BatchNorm stays, as does one
    without running statistics (track_running_stats=False: it normalizes with each batch's statistics). A
    LinearBNReLU takes (N, features) inputs, where the fold is exact, and raises ValueError on others (a Linear →
    BatchNorm1d on 3-D inputs, where the BatchNorm normalizes dim 1 instead, cannot be folded).
    Hooks: the model's own hooks move onto the result; a submodule with hooks is kept whole by the trace and fused
    on its own, its hooks moved onto the fused one (they run where they ran); a conv/BN/ReLU with hooks is not
    fused. Global module hooks (register_module_forward_hook) see the fused modules instead: a warning says so.
    The fused layers may return channels_last tensors in CPU inference (pyops.nn.ConvBNReLU2d); the traced
    graph's `.view` calls become view_or_copy (a view where the strides allow one, else a copy) so that models
    flattening with `.view(n, -1)` still run, also after pickling or tracing the result again; where the graph
    calls code it does not show (a custom leaf module, a torch.fx.wrap function), the fused layers keep their
    input's layout. Hooks are the caller's code: they may see channels_last outputs (a hook calling `.view(n, -1)`
    on one fails; use `.reshape`).
    ValueError: a model (or submodule) in training mode (torch.nn's stateless layers and containers do not count,
    dropouts do), or with lazy layers (nn.LazyConv2d, ...) no input has initialized yet. Warns (UserWarning) when
    torch.fx cannot trace the model, or when its forward has an argument defaulting to None that the trace uses
    (torch.fx takes it as a tensor, dropping the model's code for calls without it), naming what the fallback
    fused, and the model's own code runs as written: each submodule torch.fx
    can trace whose class (mixins included) adds no public method or property beside forward (a detection model's
    backbone; not its transform, whose postprocess the model calls) is fused whole in its place (a GraphModule
    keeping its plain attributes, such as out_channels, and giving NCHW feature maps; code reaching
    into it, as self.backbone.conv1.weight, sees the fused layers); elsewhere, inside nn.Sequential
    containers, the BatchNorm and ReLU modules absorbed into a fused layer become nn.Identity (indices and names
    keep working; code reading a Sequential's intermediate outputs sees the fused values).
    A module that becomes a GraphModule (the model, a fused part, a hooked container) keeps its hooks and plain
    attributes, also through copy.deepcopy (FusedGraphModule), but not through pickling (torch rebuilds a
    GraphModule's hooks empty), nor its class, methods and properties.
    What torch.fx does not record, the traced result does not do: forward's Python control flow on its inputs
    (`if isinstance(x, torch.Tensor)` is False for the trace's proxies), context managers and decorators that change
    modes (torch.no_grad, torch.autocast: the result computes outside them), attributes forward stores on the
    model, and later changes of the plain attributes forward reads (a flag the caller's code sets on a fused part
    before calling it): the trace took their values as constants. Such a model differs from its fused result.
    fuse(model, inplace=True) of a layer pruned with torch.nn.utils.prune keeps it unfused (its pruning hook), and a
    copy fails as torch's deepcopy does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules()
                if m.training and (m is model or training_matters(m))]
    if training:
        raise ValueError(f"argument 'model' is in training mode ({', '.join(training[:5])}"
                         f"{', ...' if len(training) > 5 else ''}): BatchNorm can only be folded in eval mode; "
                         f"call model.eval() first")
    lazy = [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"argument 'model' has lazy layers its input has not initialized yet ({', '.join(lazy[:5])}"
                         f"{', ...' if len(lazy) > 5 else ''}): their BatchNorms cannot be folded before their "
                         "weights have shapes; run the model once on an input first")
    if any(getattr(torch.nn.modules.module, name, None) for name in GLOBAL_HOOKS):
        warnings.warn("pyops.fuse: global module hooks are registered (torch.nn.modules.module.register_module_"
                      "forward_hook and the like): they run on the fused model's modules, not on the BatchNorms and "
                      "ReLUs folded away, so a hook that changes or records their outputs sees other values",
                      UserWarning, stacklevel=2)
    # (under torch.inference_mode the copy and the folded weights would be inference tensors, which no later call
    # with autograd could use)
    with torch.inference_mode(False):
        if isinstance(model, FUSED_MODULES):  # fused already (tracing one alone records it as a call of itself)
            return model if inplace else deepcopy_sharing_hooks(model)
        return _fuse(model, inplace)


def _fuse(model, inplace):
    work = model if inplace else deepcopy_sharing_hooks(model)
    try:
        graph_module = trace(work)
    except Exception as error:  # noqa: BLE001 - any tracing failure (TraceError, TypeError, ...) means "untraceable"
        parts = fuse_traceable_parts(work, inplace)
        fused = fuse_sequentials(work, skip=parts.values())
        warnings.warn(f"pyops.fuse: torch.fx could not trace {type(model).__name__} ({type(error).__name__}: "
                      f"{error}); fell back to fusing its parts: submodules fused whole (torch.fx traced them): "
                      f"{', '.join(parts) if parts else 'none'}; consecutive modules inside nn.Sequential "
                      f"containers: {', '.join(fused) if fused else 'none'}. The result equals the model where its "
                      "code calls these parts whole; code that calls single entries or slices of such a Sequential, "
                      "reads their intermediate outputs or calls a fused part's submodules sees the fused layers "
                      "instead (compare the outputs before use)", UserWarning, stacklevel=2)
        return work.eval()
    return fuse_traced(model, work, graph_module, inplace)


def trace(module):
    """module's graph (FusionTracer); raises where torch.fx cannot trace it or the graph would differ from it
    (check_traced_defaults)."""
    graph_module = FusionTracer.trace_module(module)
    check_traced_defaults(graph_module)
    return graph_module


def fuse_traced(model, work, graph_module, inplace, output_seen_by_code=False):
    """fuse's result from graph_module, work's graph (work: model or its working copy). output_seen_by_code: the
    result's output goes to code no graph shows (a part of an untraceable model), which gets NCHW tensors
    (part_outputs_in_nchw) while the fused layers inside compute in their layout."""
    created = fuse_graph(graph_module)
    created += fuse_hooked_submodules(graph_module, inplace)
    # after both: a hooked container's fused layers may return channels_last to the graph's code too (and, fused on
    # its own, its code saw the graph's layouts: its views are rewritten there); run on graphs without fused layers
    # as well, whose input may be a fused layer's output (a hooked container)
    layout_safe_views(graph_module.graph, dict(graph_module.named_modules()), created)
    if output_seen_by_code and created:
        part_outputs_in_nchw(graph_module, created)
    graph_module.graph.lint()
    graph_module.recompile()
    keep_attributes(graph_module, work)  # the model's own hooks (fx traced forward, which never ran them) & co.
    # eval(), except (inplace=True) on the caller's own modules: only their stateless torch.nn ones can be in
    # training mode, where it changes nothing.
    own = {id(m) for m in model.modules()} if inplace else set()
    for m in graph_module.modules():
        if id(m) not in own:
            m.training = False
    return graph_module


GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")


def deepcopy_sharing_hooks(model):
    """copy.deepcopy(model), whose copies' hooks are the model's hook objects themselves: a hook that records into
    its own state (a bound method, a functools.partial over a list) records the fused model's calls where the user
    reads them (a deep copy recorded into a copy of that state)."""
    memo = {}
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            for hook in getattr(module, name).values():
                memo[id(hook)] = hook
    copied = copy.deepcopy(model, memo)
    # torch's deep copy of a GraphModule (a traced model, a fused one) drops its forward and backward hooks: given back
    for module in model.modules():
        twin = memo.get(id(module))
        if isinstance(module, fx.GraphModule) and isinstance(twin, fx.GraphModule) and twin is not module:
            for name in HOOK_DICTS:
                if getattr(module, name) and not getattr(twin, name):
                    setattr(twin, name, copy.copy(getattr(module, name)))
            twin._is_full_backward_hook = module._is_full_backward_hook
    return copied


def keep_attributes(gm, module):
    """gm, fused from module, takes module's hooks and its plain attributes (non-Module, non-tensor ones set in
    __init__, which a hook or the caller's code may read: m.scale, backbone.out_channels), which its deep copies keep
    (FusedGraphModule). The type is gm's: code checking module's class, or calling its other methods or properties,
    sees a GraphModule; forward's reads of these attributes were traced as constants (setting one later changes
    nothing the graph computes)."""
    move_hooks(module, gm)
    plain = [name for name in vars(module) if not name.startswith("_") and name != "training" and not hasattr(gm, name)]
    for name in plain:
        setattr(gm, name, getattr(module, name))


def fuse_traceable_parts(model, inplace):
    """For a model torch.fx cannot trace: each submodule it can trace whose class adds no public method or
    property beside forward (adds_public_methods: code outside it can only call it; not nn.Sequential, whose entries
    and slices code may call) is fused whole in its place, where that fuses something; the others are searched in.
    A detection model's backbone is such a part (its heads and transforms are not traceable). Returns {qualified
    name: fused part}."""
    parts, done = {}, {}  # done: {id(submodule): what stands in its place}, so that aliases stay one module

    def search(module, prefix):
        for name, child in list(module._modules.items()):  # (not named_children: it skips a second name of one)
            qualified = f"{prefix}.{name}" if prefix else name
            if child is None or next(child.children(), None) is None or isinstance(child, FUSED_MODULES):
                continue  # a leaf: nothing to fuse inside it
            if id(child) in done:
                module._modules[name] = done[id(child)]
                continue
            done[id(child)] = child
            if not adds_public_methods(child):
                try:
                    graph_module = trace(child)
                except Exception:  # noqa: BLE001 - as in _fuse: untraceable, searched in
                    graph_module = None
                if graph_module is not None:
                    fused = fuse_traced(child, child, graph_module, inplace, output_seen_by_code=True)
                    if any(isinstance(m, FUSED_MODULES) for m in fused.modules()):
                        module._modules[name] = parts[qualified] = done[id(child)] = fused
                    continue  # traced: its graph had every chain inside it
            search(child, qualified)

    search(model, "")
    return parts


def adds_public_methods(module):
    """Whether module's class or one of its bases (mixins included) defines a public method or property beyond
    forward, nn.Module's own (extra_repr, train, ...) and reset_parameters (called at construction): code may call
    it (a detection model's transform.postprocess, a container's entries), which a fused GraphModule in its place
    would not have. A torch.fx GraphModule adds none of its own kind (its methods are GraphModule's)."""
    if isinstance(module, fx.GraphModule):
        return False
    for cls in type(module).__mro__:
        if cls in (nn.Module, object):
            continue
        if any((callable(value) or isinstance(value, property)) and not name.startswith("_")
               and name not in ("forward", "reset_parameters") and not hasattr(nn.Module, name)
               for name, value in vars(cls).items()):
            return True
    return False


def fuse_hooked_submodules(gm, inplace):
    """Each module the trace kept whole for its hooks (FusionTracer), fused on its own in its place, its hooks moved
    onto the fused module: they run where they ran, on the values they saw. With fuse(inplace=True) it is fused
    from a copy (the caller's model is left as it was); otherwise it is already the working copy's. Returns the
    fused layers inside them (all of them copies or new: layout_safe_views may set their keep_input_layout)."""
    done = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not has_hooks(module) or next(module.children(), None) is None or isinstance(module, FUSED_MODULES):
            continue
        # Not where the graph also reaches inside it (self.block.conv(x), self.block.conv.bias): those would read
        # the fused layers; the module then stays as it is, unfused, its hooks in place.
        if any(n.op in ("call_module", "get_attr") and n.target.startswith(node.target + ".") for n in gm.graph.nodes):
            continue
        if id(module) not in done:
            done[id(module)] = fused = fuse(module, inplace=not inplace)
            # kept as it is (its class, methods and properties: a hooked parametrized conv) where nothing inside it
            # fused and its code has no view for the fused graph to rewrite (runs_own_code)
            if isinstance(fused, fx.GraphModule):
                before, inside = {id(m) for m in module.modules()}, dict(fused.named_modules())
                if not any(isinstance(m, FUSED_MODULES) and id(m) not in before for m in inside.values()) and \
                        not any(depends_on_layout(n, inside) for n in fused.graph.nodes):
                    done[id(module)] = module
        gm.set_submodule(node.target, done[id(module)])
    return [m for fused in done.values() if isinstance(fused, fx.GraphModule) for m in fused.modules()
            if isinstance(m, pyops_nn.ConvBNReLU2d)]


def training_matters(module):
    """Whether module's training flag may change what it computes: a module with parameters or buffers of its own
    (BatchNorm), a dropout, RReLU, or any module that is not torch.nn's (its forward may read self.training);
    not torch.nn's stateless layers and containers (nn.Identity, nn.ReLU, nn.Sequential, the plain modules a
    torch.fx GraphModule creates, all in training mode unless told otherwise)."""
    return (next(module.parameters(False), None) is not None or next(module.buffers(False), None) is not None
            or isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU))
            or not type(module).__module__.startswith("torch.nn."))


def check_traced_defaults(gm):
    """Raises TypeError (so fuse falls back) where the model's forward has an argument defaulting to None that the
    graph uses: torch.fx traces it as a tensor, so the model's own `if arg is None:` code is not in the graph, and a
    call without it would run the traced code with None (which a fused layer takes as "no residual", a silently
    different result)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.args and node.args[0] is None and node.users:
            raise TypeError(f"forward's argument '{node.target}' defaults to None, and torch.fx traced it as a "
                            "tensor: the graph would not hold the model's code for calls without it")


LAYER_BASES = FOLDABLE_LAYERS + (_BatchNorm,)


def computes_like_base(module):
    """The torch.nn layer class (LAYER_BASES) module is, where it computes what that class does: no forward or
    _conv_forward of its own (a weight-standardizing or fake-quantizing conv overrides one of them); else None.
    Such subclasses (torchvision's Conv3DSimple, for one) are called as leaves of the trace and fold."""
    base = next((c for c in LAYER_BASES if isinstance(module, c)), None)
    cls = type(module)
    if base is None or cls.forward is not base.forward or \
            getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None):
        return None
    return base


class InPlaceProxy(fx.Proxy):
    """A torch.fx Proxy that records `a += b` (and the other augmented assignments) as a call of augmented_iadd(a, b),
    ...: operator.iadd, in place for a tensor, a new value for an int. torch.fx's own Proxy has no in-place
    operators, so Python ran `a = a + b` and the graph added out of place: ResNet's `out += identity` with a float64
    identity returned float64 where the model's float32 `out` stays float32, and other aliases of `out` missed the
    write. (Not operator.iadd itself: torch.fx writes that as the statement `a += b`, rebinding the variable of `a`,
    and an int read again later, a batch size, took the new value.)"""


for _name, _fn in AUGMENTED.items():
    setattr(InPlaceProxy, f"__{_name}__",
            lambda self, other, _fn=_fn: self.tracer.create_proxy("call_function", _fn, (self, other), {}))


class FusionTracer(fx.Tracer):
    """torch.fx's default tracer, recording augmented assignments in place (InPlaceProxy) and also keeping as leaves
    torchvision's FrozenBatchNorm2d, pyops' fused modules and Conv1d, subclasses of torch.nn's layers that keep their
    forward (so that these can be folded, and the fused ones are not traced through when a fused model is fused
    again) and modules with hooks (traced through, their hooks ran once, on the trace's proxies; fuse fuses
    such a module on its own: fuse_hooked_submodules)."""

    def proxy(self, node):
        return InPlaceProxy(node, self)

    def is_leaf_module(self, m, qualname):
        frozen = frozen_batchnorm_class()
        if isinstance(m, FUSED_MODULES) or (frozen is not None and isinstance(m, frozen)) \
                or computes_like_base(m) is not None or computes_like_pyops_conv1d(m) or has_hooks(m):
            return True
        return super().is_leaf_module(m, qualname)

    @classmethod
    def trace_module(cls, root):
        tracer = cls()
        graph = tracer.trace(root)
        return FusedGraphModule(tracer.root, graph, root.__class__.__name__)


class FusedGraphModule(fx.GraphModule):
    """The GraphModule fuse returns. torch's deep copy of a GraphModule keeps only what its graph uses and drops its
    forward and backward hooks; this one copies them too, and its other public attributes (those fuse kept from the
    module, keep_attributes, and any set since), as a deep copy of an nn.Module does. (Pickling still rebuilds a
    plain GraphModule: hooks empty.)"""

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        for name, value in self.__dict__.items():
            if name in (*HOOK_DICTS, "_is_full_backward_hook") or (
                    not name.startswith("_") and name not in copied.__dict__):
                setattr(copied, name, copy.deepcopy(value, memo))
        return copied


# --- graph rewriting -------------------------------------------------------------------------------------------

def fuse_graph(gm):
    """Rewrites gm's graph in place: each chain found by match_chain becomes one call of a new fused module.
    Returns the fused modules made."""
    modules = dict(gm.named_modules())
    absorbed, folded, created = [], {}, []
    # Modules the graph uses whole (a get_attr of a classifier handed to pyops.sliding_classify, a module kept as a
    # leaf for its hooks): a chain inside one is left alone, as that module computes with its own layers (and with
    # inplace=True it is the caller's own, which installing the fused layer in it would change).
    whole = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for node in list(gm.graph.nodes):  # chains start at a layer: the nodes erased with one are never one
        chain = match_chain(node, modules)
        if chain is not None and not any(inside_used_module(n.target, whole)
                                         for n in chain["nodes"] if n.op == "call_module"):
            absorbed += [n.target for n in chain["nodes"] if n.op == "call_module"]
            replace_chain(gm, modules, chain, folded, created)
    # Only the modules the chains absorbed go, where nothing else names them: not delete_all_unused_submodules,
    # which also empties modules the graph passes as arguments (a get_attr of a classifier handed to
    # pyops.sliding_classify), and with inplace=True those are the caller's own.
    used = [n.target + "." for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    for name in dict.fromkeys(absorbed):
        if not any(u.startswith(name + ".") for u in used):
            gm.delete_submodule(name)
    return created


def inside_used_module(target, whole):
    """Whether a module of this qualified name lies inside one (a proper ancestor) that the graph uses whole."""
    parts = target.split(".")
    return any(".".join(parts[:i]) in whole for i in range(1, len(parts)))


def called_module(node, modules):
    return modules.get(node.target) if node.op == "call_module" else None


def sole_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def activation_of(node, modules):
    """The activation's name (pyops.nn.ACTIVATIONS) if node applies one to its first argument (and only that),
    else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if has_hooks(module):
            return None
        return pyops_nn.module_activation(module)
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS and len(node.args) == 1:
        return ACTIVATION_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in ACTIVATION_METHODS and len(node.args) == 1:
        return ACTIVATION_METHODS[node.target]
    return None


def residual_of(add, value):
    """The other operand if `add` computes value + residual with a tensor residual, else None."""
    is_add = (add.op == "call_function" and add.target in ADD_FUNCTIONS) or \
             (add.op == "call_method" and add.target in ADD_METHODS)
    if not is_add or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1 or set(add.kwargs) - {"alpha"}:
        return None
    a, b = add.args
    if (add.op, add.target) in INPLACE_ADDS and a is not value:
        return None  # `residual += value` writes into the residual: its other users would miss that write
    other = b if a is value else a if b is value else None
    return other if isinstance(other, fx.Node) and other is not value else None


def may_mutate(node, modules, hooks=True):
    """Whether node may change a tensor in place, conservatively: an op whose schema mutates an argument, an
    in-place function, method or operator (a trailing underscore), an `out=` or truthy `inplace` argument, a call
    of a function that is not torch's (it may do anything), a module with a truthy `inplace`, hooks (unless
    hooks=False), or a module that is not torch.nn's or ours."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, fx.GraphModule):  # (a hooked container fused on its own): what its graph does
            inner = dict(module.named_modules())
            return any(may_mutate(n, inner, hooks) for n in module.graph.nodes) or (hooks and has_hooks(module))
        known = type(module).__module__.startswith("torch.nn.") or isinstance(module, FUSED_MODULES) or \
            is_batchnorm(module) or computes_like_base(module) is not None or computes_like_pyops_conv1d(module)
        eval_dropout = isinstance(module, nn.modules.dropout._DropoutNd) and not module.training  # the identity
        return ((bool(getattr(module, "inplace", False)) and not eval_dropout) or not known
                or (hooks and has_hooks(module)))
    if node.op == "call_method":
        return _in_place_name(node.target) or node.target == "__setitem__"
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        schemas = [target._schema] if isinstance(target, torch._ops.OpOverload) else \
            [getattr(target, o)._schema for o in target.overloads()]
        return any(schema.is_mutable for schema in schemas)
    if target in INPLACE_OPERATORS or _in_place_name(getattr(target, "__name__", "")) or "out" in node.kwargs:
        return True
    if not _torch_function(target):
        return True  # a user function wrapped by torch.fx.wrap: its body is not in the graph
    try:  # F.relu(x, True), F.dropout(x, 0.5, False, True), ...: inplace given by position
        arguments = inspect.signature(target).bind(*node.args, **node.kwargs).arguments
        # (a dropout not training is the identity, whatever its inplace flag; an rrelu is a leaky_relu_ then)
        identity = "dropout" in getattr(target, "__name__", "") and arguments.get("training", True) is False
        return bool(arguments.get("inplace")) and not identity
    except (TypeError, ValueError):  # no signature (a builtin) or not bindable: no inplace flag to read
        return False


def _in_place_name(name):
    """relu_, add_, _foreach_mul_: PyTorch's naming of in-place ops (not dunders such as __add__)."""
    return name.endswith("_") and not (name.startswith("__") and name.endswith("__"))


def mutation_between(first, last, chain_nodes, modules):
    """Whether a node strictly between first and last in graph order, other than the chain's, may mutate a
    tensor."""
    node = first.next
    while node is not last:
        if node not in chain_nodes and may_mutate(node, modules):
            return True
        node = node.next
    return False


def computes_like_pyops_conv1d(module):
    """Whether module is a pyops.nn.Conv1d computing what that class does (no forward or _conv_forward of its own):
    the convolution of nn.Conv1d, foldable as one."""
    cls = type(module)
    return (isinstance(module, pyops_nn.Conv1d) and cls.forward is nn.Conv1d.forward
            and cls._conv_forward is pyops_nn.Conv1d._conv_forward)


def bn_computes_like_base(bn):
    """Whether bn computes what its torch.nn (or torchvision) class does: no forward of its own (the untraceable
    fallback folded a BatchNorm2d subclass whose forward scales the output)."""
    if type(bn) is nn.SyncBatchNorm:
        return True  # in eval mode with running statistics it computes F.batch_norm, as BatchNorm does
    if isinstance(bn, _BatchNorm):
        return computes_like_base(bn) is not None
    frozen = frozen_batchnorm_class()
    return frozen is not None and type(bn).forward is frozen.forward


def match_chain(node, modules):
    """For a call of a layer foldable_layer accepts: the longest chain layer [→ bn] [→ add(·, residual)] [→ relu]
    (each link the previous node's only user) as a dict {nodes: [layer, bn?, add?, relu?], bn: the BatchNorm or
    None, residual: Node or None, add: the add's Node (with a residual), activation: a pyops.nn.ACTIVATIONS name};
    None where there is nothing to fuse: no BatchNorm, and no add or activation that a fused module takes without
    one (fused_without_batchnorm)."""
    layer = called_module(node, modules)
    if layer is None or not foldable_layer(layer) or len(node.args) != 1 or node.kwargs:
        return None
    chain = dict(nodes=[node], bn=None, residual=None, activation="none")
    user = sole_user(node)
    bn = called_module(user, modules) if user is not None else None
    if bn is not None and len(user.args) == 1 and not user.kwargs and foldable_pair(layer, bn):
        chain["bn"] = bn
        chain["nodes"].append(user)
        user = sole_user(user)
    elif not fused_without_batchnorm(layer):
        return None
    if fused_class(layer) is None:  # fold only: the add and the activation stay as they are
        return chain
    # (the conv modules take a residual; LinearBNReLU does not)
    residual = residual_of(user, chain["nodes"][-1]) if user is not None and isinstance(
        layer, (nn.Conv1d, nn.Conv2d)) else None
    if residual is not None:
        # The fused call reads the layer's input and the residual at one point (the add: the residual may be
        # computed after the layer), while the chain read the input at the layer and the residual at the add. That
        # is the same only if nothing in between may change either in place (e.g. a pre-activation block's
        # relu_(x)); else the add and activation stay unfused.
        if mutation_between(node, user, chain["nodes"], modules):
            return chain if chain["bn"] is not None else None
        chain["residual"], chain["add"] = residual, user
        chain["in_place"] = (user.op, user.target) in INPLACE_ADDS
        chain["nodes"].append(user)
        user = sole_user(user)
    if user is not None and activation_of(user, modules):
        chain["activation"] = activation_of(user, modules)
        chain["nodes"].append(user)
    return chain if len(chain["nodes"]) > 1 else None


def foldable_layer(layer):
    """Whether layer is a conv/linear layer that computes what its torch.nn class does (computes_like_base: no
    forward or _conv_forward of its own, as a QAT Conv2d's fake-quantizing one, except pyops.nn.Conv1d's, the same
    convolution) and has no hooks."""
    computes = computes_like_base(layer) not in (None, _BatchNorm) or computes_like_pyops_conv1d(layer)
    return computes and not has_hooks(layer)


def foldable_pair(layer, bn):
    """Whether layer → bn folds into one layer computing the same: a foldable_layer and a BatchNorm with running
    statistics and no hooks, over the layer's output channels."""
    return (foldable_layer(layer) and is_foldable_batchnorm(bn) and bn_computes_like_base(bn) and not has_hooks(bn)
            and out_channels(layer) == bn.running_mean.numel() and normalizes_channels_of(bn, layer))


def fused_without_batchnorm(layer):
    """Whether a layer with no BatchNorm after it is fused with the add and activation that follow: a Conv2d, a
    Conv1d or a Linear (their fused modules run pyops' kernels, with the add and the activation applied as they
    store: VGG-11 and SqueezeNet 1.1 1.27x and 2.35x eager fused on this project's CPU, stop 41; a Linear at a small
    batch streams its weight at up to twice MKL's speed, stop 42; bench/NOTES-conv_bn_relu.md), sharing the layer's
    Parameters (a layer computing its weight, e.g. by a parametrization, stays as it is)."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) and fused_class(layer) is not None and \
        has_own_parameters(layer)


def fused_class(layer):
    """The fused module class for layer (with its epilogue), or None where only folding applies."""
    if isinstance(layer, nn.Conv2d):
        try:
            pyops_nn.explicit_padding(layer)
        except ValueError:
            return None
        return pyops_nn.ConvBNReLU2d
    if isinstance(layer, nn.Linear):
        return pyops_nn.LinearBNReLU
    if isinstance(layer, nn.Conv1d):
        return pyops_nn.FoldedConv1d
    return None


def replace_chain(gm, modules, chain, folded, created):
    """One call_module node of the fused module in place of the chain's nodes; the module is installed under the
    layer's name when nothing else in the graph uses the layer (another call, a get_attr of its weight), else under
    a fresh name. folded: {(layer, bn) ids: (name, module, epilogue)} of the chains fused so far; created: the
    fused modules made so far, which this one joins. A layer → BN pair
    called again (a shared block) calls the same fused module where the epilogue is the same, else a new one
    holding the same folded Parameters: one set of weights, as the model had (two copies drifted apart in
    fine-tuning)."""
    layer_node, bn, tail = chain["nodes"][0], chain["bn"], chain["nodes"][-1]
    layer = modules[layer_node.target]
    cls = fused_class(layer)
    epilogue = (chain["activation"], chain["residual"] is not None, bool(chain.get("in_place")))
    first = folded.get((id(layer), id(bn)))
    if first is not None and first[2] == epilogue:
        name = first[0]
    else:
        fused = fold_bn(layer, bn) if cls is None else cls.from_modules(layer, bn, chain["activation"])
        if chain.get("in_place"):
            fused.residual_in_place = True
        if first is not None:
            fused.weight, fused.bias = first[1].weight, first[1].bias
        name = layer_node.target
        if any(n is not layer_node and n.op in ("call_module", "get_attr")
               and (n.target + ".").startswith(name + ".") for n in gm.graph.nodes):
            name = fresh_name(gm, modules, name + "_fused")
        gm.add_submodule(name, fused)
        modules[name] = fused
        created.append(fused)
        folded.setdefault((id(layer), id(bn)), (name, fused, epilogue))
    kwargs = {"residual": chain["residual"]} if chain["residual"] is not None else {}
    # Where the layer was (it reads its input there, whatever happens to that input later), or, with a residual, at
    # the add (the residual may be computed after the layer; match_chain checked that nothing in between mutates;
    # the add's only user is the activation, if any, so nothing between them sees the difference).
    with gm.graph.inserting_before(chain.get("add", layer_node)):
        call = gm.graph.call_module(name, layer_node.args, kwargs)
    call.meta.update(tail.meta)
    tail.replace_all_uses_with(call)
    for node in reversed(chain["nodes"]):  # each one's only user was the next, now erased
        gm.graph.erase_node(node)


@overridable  # recorded as one call when the fused graph is traced again (pickling re-traces a GraphModule)
def view_or_copy(x, *shape, size=None):
    """x.view(*shape) (or x.view(size=size)), or x.reshape(...) (a copy) where x's strides allow no view. A fused
    layer may return a channels_last tensor where the model's layer returned an NCHW one (CPU inference, see
    pyops.nn.ConvBNReLU2d), and the model's `features.view(n, -1)` then fails; every view that worked before still
    is one."""
    shape = shape if size is None else (size,)
    try:
        return x.view(*shape)
    except RuntimeError:
        return x.reshape(*shape)


@overridable
def view_as_or_copy(x, other):
    """x.view_as(other), or a copy shaped like other, as view_or_copy."""
    return view_or_copy(x, other.shape)


@overridable  # recorded as one call when the fused graph is traced again (pickling re-traces a GraphModule)
def nchw_unless_shared(count, *tensors):
    """tensors[count:] (a part's outputs), each channels_last 4-D one made NCHW-contiguous unless it shares memory
    with another of them or with tensors[:count] (the part's inputs): a copy would break that aliasing."""
    def storage(t):
        return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and t.device.type != "meta" else None

    outputs = tensors[count:]
    seen = [storage(t) for t in tensors]
    return tuple(t.contiguous() if isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous()
                 and t.is_contiguous(memory_format=torch.channels_last) and seen.count(storage(t)) == 1 else t
                 for t in outputs)


def part_outputs_in_nchw(graph_module, created):
    """A part of an untraceable model hands its outputs (any nesting: an FPN's dict) to the model's own code, which
    may `.view` them: its fused layers compute channels_last (CPU inference: ConvBNReLU2d), and nchw_unless_shared
    makes the outputs NCHW (an ssdlite backbone whose layers all kept NCHW instead ran 0.93x eager; 1.6x so). Where
    an output is a view or a layout-dependent result (a slice, a flatten: the model's code may write through it into
    another output), the fused layers keep their input's layout instead."""
    graph, modules = graph_module.graph, dict(graph_module.named_modules())
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = []
    fx.node.map_arg(output.args[0], leaves.append)
    leaves = list(dict.fromkeys(leaves))
    if not leaves:
        return
    if any(is_alias(leaf, modules) or depends_on_layout(leaf, modules) for leaf in leaves):
        for module in created:
            if isinstance(module, pyops_nn.ConvBNReLU2d):
                module.keep_input_layout = True
        return
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(output):
        restored = graph.call_function(nchw_unless_shared, (len(inputs), *inputs, *leaves))
        replaced = {leaf: graph.call_function(operator.getitem, (restored, i)) for i, leaf in enumerate(leaves)}
    output.args = (fx.node.map_arg(output.args[0], lambda n: replaced[n]),)


def layout_safe_views(graph, modules, created):
    """Rewrites the graph's calls that depend on a tensor's memory layout: view and view_as become view_or_copy and
    view_as_or_copy, and as_strided (which reads memory at the strides it is given) reads a contiguous copy, the
    layout the model's own layers produced. Where a copy would break aliasing the model relies on (something may
    write in place into a viewed tensor or its views), or where the graph calls code it does not show (a module
    kept whole for its hooks, a function torch.fx.wrap left untraced: a `.view` there would fail on a channels_last
    tensor), the fused layers keep their input's layout instead
    (ConvBNReLU2d.keep_input_layout: those this fuse created, not the model's own) and the graph stays as it
    is."""
    if layout_observed(graph, modules):
        for module in created:
            if isinstance(module, pyops_nn.ConvBNReLU2d):
                module.keep_input_layout = True
        return
    for node in list(graph.nodes):
        if node.op != "call_method" or not isinstance(node.args[0], fx.Node):
            continue
        if node.target in ("view", "view_as") and not (node.target == "view" and _is_dtype_view(node)):
            with graph.inserting_before(node):
                call = graph.call_function(view_or_copy if node.target == "view" else view_as_or_copy, node.args,
                                           node.kwargs)
            call.meta.update(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
        elif node.target == "as_strided":
            with graph.inserting_before(node):
                contiguous = graph.call_method("contiguous", (node.args[0],))
            node.update_arg(0, contiguous)


def layout_observed(graph, modules):
    """Whether the graph's code could tell a fused layer's channels_last output from the model's layout beyond what
    view_or_copy hides: a write through an alias of a layout-dependent result, or a call of code it does not show."""
    return any(runs_own_code(node, modules) for node in graph.nodes) or \
        any(alias_written(node, modules) for node in graph.nodes if depends_on_layout(node, modules))


def depends_on_layout(node, modules):
    """Whether node's result depends on its input's memory layout: the views (which fail on strides that allow
    none), and the ops that return a view of an NCHW tensor but a copy of a channels_last one, or the other way
    round (a write into the result of a reshape/flatten/contiguous/to(memory_format) reached the layer's output in
    the model and not in a fused one)."""
    if node.op == "call_method":
        return node.target in ("view", "view_as", "as_strided", "reshape", "reshape_as", "flatten", "ravel",
                               "contiguous") or (node.target == "to" and "memory_format" in node.kwargs)
    if node.op == "call_function":  # (view_or_copy: a fused model fused again)
        return node.target in (torch.flatten, torch.reshape, torch.ravel, torch.as_strided, view_or_copy,
                               view_as_or_copy)
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Flatten)


def runs_own_code(node, modules):
    """Whether node calls code the graph does not show that may depend on a tensor's layout: a leaf module that is
    not torch.nn's, pyops' or a BatchNorm (nor a subclass of a torch.nn layer keeping its forward), a function that
    is not PyTorch's or torchvision's (torch.fx.wrap); a module with children kept whole for its hooks (fused on its
    own, fuse_hooked_submodules) where its own traced code depends on the layout. Not the hooks themselves: the
    caller's code, which sees what the fused layers return."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if has_hooks(module) and next(module.children(), None) is not None:
            return code_depends_on_layout(module)
        return not (type(module).__module__.startswith(("torch.nn.", "pyops.")) or is_batchnorm(module)
                    or computes_like_base(module) is not None or computes_like_pyops_conv1d(module))
    return node.op == "call_function" and not _torch_function(node.target)


def code_depends_on_layout(module):
    """Whether module's forward, as torch.fx traces it, could tell a channels_last input from an NCHW one beyond
    what view_or_copy hides (layout_observed: its own fuse rewrites its views), or cannot be traced."""
    try:
        gm = FusionTracer.trace_module(module)
    except Exception:  # noqa: BLE001 - untraceable: its code is unknown
        return True
    return layout_observed(gm.graph, dict(gm.named_modules()))


def _top_package(target):
    """The top-level package of a call_function target's module ("torch" for torch.nn.functional; not a user module
    named torch_utils)."""
    return (getattr(target, "__module__", None) or "").split(".")[0]


def _torchvision_function(target):
    """A torchvision function torch.fx.wrap left in the graph (stochastic_depth returns its input when not
    training): taken to alias its input."""
    return _top_package(target) == "torchvision"


def _torch_function(target):
    """Whether a call_function target is PyTorch's (or torchvision's, whose torch.fx.wrap'ed ops such as
    stochastic_depth compute on their inputs, pyops', an operator, a builtin): its body is known."""
    return (_top_package(target) in ("torch", "torchvision", "pyops", "_operator", "operator", "math", "builtins")
            or isinstance(target, torch._ops.OpOverload))


def is_alias(node, modules):
    """Whether node's output may share memory with its first argument (ALIAS_METHODS, ALIAS_FUNCTIONS,
    ALIAS_MODULES, torchvision's functions, ALIAS_ATTRIBUTES: `x.T` is traced as getattr(x, "T"))."""
    if node.op == "call_method":
        return node.target in ALIAS_METHODS
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, ALIAS_MODULES) and not has_hooks(module)
    if node.op != "call_function":
        return False
    return (node.target in ALIAS_FUNCTIONS or node.target in (view_or_copy, view_as_or_copy)
            or _torchvision_function(node.target)
            or (node.target is getattr and len(node.args) == 2 and node.args[1] in ALIAS_ATTRIBUTES))


def alias_written(view, modules):
    """Whether a node may write in place into memory that `view` shares: the viewed tensor, the view, or any alias
    of them (conservatively: any node using one of them that may_mutate)."""
    root = view.args[0]
    while isinstance(root, fx.Node) and is_alias(root, modules) and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    stack, seen = [root], {root}
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if is_alias(user, modules):
                stack.append(user)
            elif may_mutate(user, modules, hooks=False):  # (hooks are the caller's code: they may see any layout)
                return True
    return False


def _is_dtype_view(node):
    """x.view(torch.float16) and the like: a reinterpretation of the bytes, not a reshape."""
    return len(node.args) == 2 and isinstance(node.args[1], torch.dtype) or "dtype" in node.kwargs


def fresh_name(gm, modules, base):
    """base, or base1, base2, ...: the first that names no module and no other attribute (a parameter, a buffer)."""
    def taken(name):
        parent, _, leaf = name.rpartition(".")
        return name in modules or hasattr(gm.get_submodule(parent), leaf)
    name, i = base, 0
    while taken(name):
        i += 1
        name = f"{base}{i}"
    return name


# --- fallback for untraceable models ----------------------------------------------------------------------------

def fuse_sequentials(model, skip=()):
    """Fuses layer → BatchNorm [→ activation] and Conv1d/Conv2d/Linear → activation runs of consecutive children of
    each nn.Sequential in model, in place, except inside the modules in skip (fused already). Returns the qualified
    names of the fused layers."""
    fused_names = []
    skipped = {id(m) for part in skip for m in part.modules()}
    for prefix, container in list(model.named_modules()):
        if id(container) in skipped:
            continue
        # (a subclass with its own forward may not chain its entries: TwoHeads' cat([self[0](x), self[1](x)]))
        if not isinstance(container, nn.Sequential) or type(container).forward is not nn.Sequential.forward:
            continue
        items = list(container._modules.items())
        i = 0
        while i + 1 < len(items):
            (layer_key, layer), (bn_key, bn) = items[i], items[i + 1]
            if not foldable_layer(layer):
                i += 1
                continue
            if not foldable_pair(layer, bn):
                bn_key = bn = None  # (a Conv2d → ReLU: the activation is the next module)
                if not fused_without_batchnorm(layer):
                    i += 1
                    continue
            cls = fused_class(layer)
            act_index = i + (2 if bn is not None else 1)
            act_key, act = items[act_index] if act_index < len(items) else (None, None)
            activation = (act is not None and cls and not has_hooks(act) and pyops_nn.module_activation(act)) \
                or "none"
            if bn is None and activation == "none":
                i += 1
                continue
            fused = fold_bn(layer, bn) if cls is None else cls.from_modules(layer, bn, activation)
            if cls is pyops_nn.ConvBNReLU2d:
                # The model's own code runs as written: no channels_last outputs it might .view (see
                # ConvBNReLU2d.keep_input_layout).
                fused.keep_input_layout = True
            container._modules[layer_key] = fused
            # Identity in place of the absorbed modules (as torch.ao.quantization.fuse_modules does): indices and
            # names of the Sequential keep working for code that indexes it.
            for key in (bn_key, act_key if activation != "none" else None):
                if key is not None:
                    container._modules[key] = nn.Identity()
            fused_names.append(f"{prefix}.{layer_key}" if prefix else layer_key)
            i = act_index + 1 if activation != "none" else act_index
    return fused_names
