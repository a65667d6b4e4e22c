"""Whole-model fusion: every conv/linear → BatchNorm (→ residual add) (→ ReLU) chain of an eval-mode model becomes
one fused module (pyops.nn.ConvBNReLU2d, pyops.nn.LinearBNReLU, or a folded Conv1d/Conv3d).

The chains are found on the model's torch.fx graph, so models whose forward calls submodules by attribute
(torchvision ResNet, MobileNet, VGG) are covered as well as nn.Sequential; a model that torch.fx cannot trace
falls back to fusing consecutive modules inside its nn.Sequential containers.
"""
import copy
import inspect
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import nn as pyops_nn
from .fold import fold_bn, frozen_batchnorm_class, is_batchnorm, is_foldable_batchnorm, out_channels

RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
RELU_METHODS = {"relu": "relu", "relu_": "relu"}
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
INPLACE_ADDS = {("call_function", operator.iadd), ("call_method", "add_")}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                     operator.irshift, operator.imatmul, operator.setitem}
FUSED_MODULES = (pyops_nn.ConvBNReLU2d, pyops_nn.LinearBNReLU)


def fuse(model, inplace=False):
    """An eval-mode model computing what `model` computes, with its BatchNorms folded and ReLUs fused.

    model: an nn.Module in eval mode (model.training False and no submodule in training mode).
    inplace: False (default) works on a deep copy and leaves `model` untouched; True skips the copy, so the result
        shares `model`'s unfused submodules and parameters: a traceable model itself is left as it was (the result
        is a new torch.fx.GraphModule built from its modules), an untraceable one is rewritten in place and returned.
    Returns a torch.fx.GraphModule (traceable models) or the rewritten model (fallback), in eval mode, in which
      - Conv2d → BatchNorm2d [→ add(·, residual)] [→ ReLU/ReLU6] is one pyops.nn.ConvBNReLU2d (the residual add
        and the activation are fused into the kernel's epilogue),
      - Linear → BatchNorm1d [→ ReLU/ReLU6] is one pyops.nn.LinearBNReLU,
      - Conv1d/Conv3d (and Conv2d with a non-zero padding mode) → BatchNorm is one folded conv (pyops.fold_bn).
    A ReLU is nn.ReLU, nn.ReLU6, F.relu, F.relu6, torch.relu or Tensor.relu, in-place or not. A link of a chain is
    fused only where the previous node's output has no other user (so no other computation sees a changed value);
    a residual add only where nothing between the layer and the add may change a tensor in place (the fused call
    reads the layer's input and the residual at the add) and not where the add writes into the residual
    (`residual += bn(conv(x))`);
    where a BatchNorm's input is used elsewhere, that BatchNorm stays, as does one without running statistics
    (track_running_stats=False: it normalizes with each batch's statistics). A LinearBNReLU takes (N, features)
    inputs, where the fold is exact, and raises ValueError on others (a Linear → BatchNorm1d on 3-D inputs, where the
    BatchNorm normalizes dim 1 instead, cannot be folded).
    The fused layers may return channels_last tensors in CPU float32 inference (pyops.nn.ConvBNReLU2d); the traced
    graph's `.view` calls get a `.contiguous()` before them so that models flattening with `.view(n, -1)` still run.
    ValueError: a model (or submodule) in training mode. Warns (UserWarning) when torch.fx cannot trace the model,
    naming what the Sequential fallback fused: there the BatchNorm and ReLU modules absorbed into a fused layer
    become nn.Identity (indices and names keep working; code reading a Sequential's intermediate outputs sees the
    fused values), and the model's own code runs as written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"argument 'model' is in training mode ({', '.join(training[:5])}"
                         f"{', ...' if len(training) > 5 else ''}): BatchNorm can only be folded in eval mode; "
                         f"call model.eval() first")
    work = model if inplace else copy.deepcopy(model)
    try:
        graph_module = FusionTracer.trace_module(work)
    except Exception as error:  # noqa: BLE001 - any tracing failure (TraceError, TypeError, ...) means "untraceable"
        fused = fuse_sequentials(work)
        warnings.warn(f"pyops.fuse: torch.fx could not trace {type(model).__name__} ({type(error).__name__}: "
                      f"{error}); fell back to fusing consecutive modules inside nn.Sequential containers: "
                      f"{', '.join(fused) if fused else 'nothing found'}. The result equals the model where it calls "
                      "each of these Sequentials as a whole; code that calls single entries or slices of them, or "
                      "reads their intermediate outputs, sees the fused layers' outputs instead (compare the "
                      "outputs before use)", UserWarning, stacklevel=2)
        return work.eval()
    fuse_graph(graph_module)
    return graph_module.eval()


class FusionTracer(fx.Tracer):
    """torch.fx's default tracer, also keeping torchvision's FrozenBatchNorm2d and pyops' fused modules as leaves
    (so the first can be folded and the second are not traced through when a fused model is fused again)."""

    def is_leaf_module(self, m, qualname):
        frozen = frozen_batchnorm_class()
        if isinstance(m, FUSED_MODULES) or (frozen is not None and isinstance(m, frozen)):
            return True
        return super().is_leaf_module(m, qualname)

    @classmethod
    def trace_module(cls, root):
        tracer = cls()
        graph = tracer.trace(root)
        return fx.GraphModule(tracer.root, graph, root.__class__.__name__)


# --- graph rewriting -------------------------------------------------------------------------------------------

def fuse_graph(gm):
    """Rewrites gm's graph in place: each chain found by match_chain becomes one call of a new fused module."""
    modules = dict(gm.named_modules())
    fused_conv = False
    for node in list(gm.graph.nodes):  # chains start at a BatchNorm: the nodes erased with one are never one
        chain = match_chain(node, modules)
        if chain is not None:
            fused_conv |= replace_chain(gm, modules, chain) is pyops_nn.ConvBNReLU2d
    if fused_conv:
        contiguous_before_views(gm.graph)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def called_module(node, modules):
    return modules.get(node.target) if node.op == "call_module" else None


def sole_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def activation_of(node, modules):
    """"relu"/"relu6" if node applies a ReLU/ReLU6 to its first argument (and only that), else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return "relu" if isinstance(module, nn.ReLU) else "relu6" if isinstance(module, nn.ReLU6) else None
    if node.op == "call_function" and node.target in RELU_FUNCTIONS and len(node.args) == 1:
        return RELU_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in RELU_METHODS and len(node.args) == 1:
        return RELU_METHODS[node.target]
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


def may_mutate(node, modules):
    """Whether node may change a tensor in place, conservatively: an in-place function, method or operator, an
    `out=` or `inplace=True` argument, a module with inplace=True, or a module that is not torch.nn's or ours."""
    if node.op == "call_module":
        module = modules.get(node.target)
        known = type(module).__module__.startswith("torch.nn.") or isinstance(module, FUSED_MODULES) or \
            is_batchnorm(module)
        return getattr(module, "inplace", False) is True or not known
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_") or node.target == "__setitem__"
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    if node.target in INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")) or "out" in node.kwargs:
        return True
    try:  # F.relu(x, True), F.dropout(x, 0.5, False, True), ...: inplace given by position
        return inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("inplace") is True
    except (TypeError, ValueError):  # no signature (a builtin) or not bindable: no inplace flag to read
        return False


def mutation_between(first, last, chain_nodes, modules):
    """Whether a node strictly between first and last in graph order, other than the chain's, may mutate a
    tensor."""
    node = first.next
    while node is not last:
        if node not in chain_nodes and may_mutate(node, modules):
            return True
        node = node.next
    return False


def match_chain(node, modules):
    """For a BatchNorm call whose input is a foldable layer's call used only by it: the longest chain
    layer → bn [→ add(·, residual)] [→ relu] (each link the previous node's only user) as a dict
    {nodes: [layer, bn, add?, relu?], residual: Node or None, activation: "none"/"relu"/"relu6"}, else None."""
    bn = called_module(node, modules)
    if not is_foldable_batchnorm(bn) or len(node.args) != 1 or node.kwargs:
        return None
    layer_node = node.args[0]
    if not isinstance(layer_node, fx.Node) or len(layer_node.users) != 1 or len(layer_node.args) != 1 \
            or layer_node.kwargs:
        return None
    layer = called_module(layer_node, modules)
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or \
            out_channels(layer) != bn.running_mean.numel():
        return None
    chain = dict(nodes=[layer_node, node], residual=None, activation="none")
    if fused_class(layer) is None:  # fold only: the add and the activation stay as they are
        return chain
    user = sole_user(node)
    residual = residual_of(user, node) if user is not None and isinstance(layer, nn.Conv2d) else None
    if residual is not None:
        # The fused call reads the layer's input and the residual at one point (the add: the residual may be
        # computed after the layer), while the chain read the input at the layer and the residual at the add. That
        # is the same only if nothing in between may change either in place (e.g. a pre-activation block's
        # relu_(x)); else the add and activation stay unfused.
        if mutation_between(layer_node, user, chain["nodes"], modules):
            return chain
        chain["residual"] = residual
        chain["nodes"].append(user)
        user = sole_user(user)
    if user is not None and activation_of(user, modules):
        chain["activation"] = activation_of(user, modules)
        chain["nodes"].append(user)
    return chain


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
    return None


def replace_chain(gm, modules, chain):
    """One call_module node of the fused module in place of the chain's nodes; the module is installed under the
    layer's name when nothing else in the graph uses the layer (another call, a get_attr of its weight), else under
    a fresh name."""
    layer_node, bn_node, tail = chain["nodes"][0], chain["nodes"][1], chain["nodes"][-1]
    layer, bn = modules[layer_node.target], modules[bn_node.target]
    cls = fused_class(layer)
    fused = fold_bn(layer, bn) if cls is None else cls.from_modules(layer, bn, chain["activation"])
    name = layer_node.target
    if any(n is not layer_node and n.op in ("call_module", "get_attr") and (n.target + ".").startswith(name + ".")
           for n in gm.graph.nodes):
        name = fresh_name(modules, name + "_fused")
    gm.add_submodule(name, fused)
    modules[name] = fused
    kwargs = {"residual": chain["residual"]} if chain["residual"] is not None else {}
    # Where the layer was (it reads its input there, whatever happens to that input later), or, with a residual, at
    # the add (the residual may be computed after the layer; match_chain checked that nothing in between mutates;
    # the add's only user is the activation, if any, so nothing between them sees the difference).
    with gm.graph.inserting_before(chain["nodes"][2] if chain["residual"] is not None else layer_node):
        call = gm.graph.call_module(name, layer_node.args, kwargs)
    call.meta.update(tail.meta)
    tail.replace_all_uses_with(call)
    for node in reversed(chain["nodes"]):  # each one's only user was the next, now erased
        gm.graph.erase_node(node)
    return cls


def contiguous_before_views(graph):
    """x.view(...) becomes x.contiguous().view(...) throughout the graph. Fused layers may return channels_last
    tensors where the model's own layers returned NCHW ones (CPU inference, see pyops.nn.ConvBNReLU2d), and a model's
    `features.view(n, -1)` then fails ("view size is not compatible with input tensor's size and stride"), where
    flatten() or reshape() would copy. On a contiguous tensor contiguous() returns it as is."""
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target == "view" and isinstance(node.args[0], fx.Node):
            with graph.inserting_before(node):
                contiguous = graph.call_method("contiguous", (node.args[0],))
            node.update_arg(0, contiguous)


def fresh_name(modules, base):
    name, i = base, 0
    while name in modules:
        i += 1
        name = f"{base}{i}"
    return name


# --- fallback for untraceable models ----------------------------------------------------------------------------

def fuse_sequentials(model):
    """Fuses layer → BatchNorm [→ ReLU/ReLU6] runs of consecutive children of each nn.Sequential in model, in place.
    Returns the qualified names of the fused layers."""
    fused_names = []
    for prefix, container in list(model.named_modules()):
        if not isinstance(container, nn.Sequential):
            continue
        items = list(container._modules.items())
        i = 0
        while i + 1 < len(items):
            (layer_key, layer), (bn_key, bn) = items[i], items[i + 1]
            if not (isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and is_foldable_batchnorm(bn)
                    and out_channels(layer) == bn.running_mean.numel()):
                i += 1
                continue
            cls = fused_class(layer)
            act_key, act = items[i + 2] if i + 2 < len(items) else (None, None)
            activation = pyops_nn.activation_name(act) if isinstance(act, (nn.ReLU, nn.ReLU6)) and cls else "none"
            container._modules[layer_key] = fold_bn(layer, bn) if cls is None else \
                cls.from_modules(layer, bn, activation)
            # Identity in place of the absorbed modules (as torch.ao.quantization.fuse_modules does): indices and
            # names of the Sequential keep working for code that indexes it.
            container._modules[bn_key] = nn.Identity()
            if activation != "none":
                container._modules[act_key] = nn.Identity()
            fused_names.append(f"{prefix}.{layer_key}" if prefix else layer_key)
            i += 3 if activation != "none" else 2
    return fused_names
