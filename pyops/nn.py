"""Drop-in modules whose forward runs pyops ops.

Conv1d: a subclass of torch.nn.Conv1d (same constructor, parameters, state_dict) computed by pyops.conv1d;
swap_conv1d(model) puts it in place of a model's nn.Conv1d layers.
FoldedConv1d: the Conv1d → BatchNorm1d (→ residual add) (→ activation) pyops.fuse folds (a Conv1d; the add and
the activation applied as the kernel stores), refusing the unbatched inputs the fold does not cover.
ConvBNReLU2d: Conv2d → BatchNorm2d (→ residual add) (→ activation) as one fused kernel (pyops.conv2d_bias_act).
LinearBNReLU: Linear [→ BatchNorm1d] (→ activation) as one pyops.linear_bias_act (the activation after its product).
SlidingClassifier: a crop classifier applied densely to whole images (pyops.sliding_classify as a module).
The fused modules fold the BatchNorm once, at construction (inference, or fine-tuning with frozen BatchNorm
statistics), and keep the folded weight and bias as Parameters, so .to(), .half(), state_dict() and optimizers
treat them like the layers they replace.
"""
import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from ._C import conv_path, one_by_one_runs_as_gemm
from ._checks import (AUTOCAST_DTYPES, as_int, convolution_autocast_dtype, cpu_computes_bf16, in_autocast_region,
                      int_tuple)
from ._derived import DerivedWeights
from ._overrides import overridable
from ._scripting import NotScriptable
from .conv1d import conv1d, conv1d_bias_act
from .activations import ACTIVATIONS as ACTIVATION_CODES, IN_PLACE, MODULES as ACTIVATION_MODULES
from .conv_bn_relu import conv2d_bias_act, padding_pair
from .convolutionalize import convolutionalize
from .fold import fold_bn, with_bias
from .linear import linear_bias_act
from .sliding import DEFAULT_MAX_MEMORY, _pair as _pair_arg, classify_fcn

# The public modules; the functions below without an underscore are shared with pyops.fuse, not API.
__all__ = ["Conv1d", "ConvBNReLU2d", "FoldedConv1d", "LinearBNReLU", "SlidingClassifier", "swap_conv1d"]


class Conv1d(NotScriptable, torch.nn.Conv1d):
    """torch.nn.Conv1d computed by pyops.conv1d (forward and backward).

    Same constructor and state_dict as torch.nn.Conv1d. padding_mode 'zeros' passes the padding to the kernel;
    'reflect', 'replicate' and 'circular' pad with F.pad first, as nn.Conv1d does. As in nn.Conv1d, forward calls
    _conv_forward(input, weight, bias), which subclasses may override (weight standardization, ...).
    Input (N, C_in, L) or (C_in, L); output (N, C_out, L_out) or (C_out, L_out).
    """

    def _conv_forward(self, x, weight, bias):
        x, padding = self._padded(x)
        return conv1d(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def _padded(self, x):
        """(x, padding) as the kernel takes them: x padded by F.pad where the padding mode is not 'zeros'."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    @classmethod
    def from_module(cls, conv):
        """A pyops.nn.Conv1d with conv's hyper-parameters and training flag, sharing its weight and bias Parameters
        (an optimizer over conv's parameters trains it; conv is not modified)."""
        if not isinstance(conv, torch.nn.Conv1d):
            raise TypeError(f"argument 'conv' must be an nn.Conv1d, got {type(conv).__name__}")
        if isinstance(conv, torch.nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
            raise ValueError("argument 'conv' is a lazy layer whose input has not initialized it yet: run it once "
                             "first, or convert its model with swap_conv1d (which converts it on that first input)")
        if not all(isinstance(p, torch.nn.Parameter) for p in (conv.weight, conv.bias) if p is not None):
            raise TypeError("argument 'conv' computes its weight (a parametrization or hook: weight_norm, "
                            "spectral_norm), so it has no weight Parameter to share; swap_conv1d converts such "
                            "layers keeping their parametrizations (old-style hooks: with inplace=True)")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new.train(conv.training)


class FoldedConv1d(Conv1d):
    """An nn.Conv1d with a BatchNorm1d folded into it (or none), and the residual add and activation that followed,
    as pyops.fuse installs one: the layer computed by pyops.conv1d (a Conv1d above: the depthwise, pointwise and
    small-channel layers of 1-D networks run pyops' kernels), the residual added and the activation applied as the
    kernel stores the output (pyops.conv1d_bias_act). With a BatchNorm1d folded in it refuses unbatched (C, L)
    inputs: on those the BatchNorm1d it replaced took C as the batch and normalized along L, which the fold does not
    compute (the model raised there, unless L_out equals C_out).
    activation: one of ACTIVATIONS (pyops.activations). residual_in_place: as ConvBNReLU2d's.
    folds_batchnorm: whether a BatchNorm1d was folded in (from_modules with bn None: False)."""

    activation = "none"
    residual_in_place = False
    folds_batchnorm = True

    @classmethod
    def from_modules(cls, conv, bn, relu=False):
        """conv (nn.Conv1d) → bn (eval-mode BatchNorm1d, or None) → relu, folded once (pyops.fold_bn).

        relu: False/"none" (the default: the fold alone), or an activation as ConvBNReLU2d.from_modules takes it. The
        new module has conv's hyper-parameters, padding mode, dtype and device; with bn None it shares conv's weight
        and bias Parameters (pyops.fold.with_bias); conv and bn are not modified."""
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"argument 'conv' must be an nn.Conv1d, got {type(conv).__name__}")
        activation = activation_name(relu)
        # (a fresh nn.Conv1d: fold_bn and with_bias return the layer's torch.nn class)
        folded = fold_bn(conv, bn) if bn is not None else with_bias(conv)
        folded.__class__ = cls
        folded.activation = activation
        folded.folds_batchnorm = bn is not None
        return folded

    def forward(self, x, residual=None):
        """x (N, C_in, L) [, residual (N, C_out, L_out)] → act(conv(x) + residual) (N, C_out, L_out)."""
        return _folded_conv1d_forward(self, x, _forward_parameters(self), residual)

    def _conv_forward(self, x, weight, bias, residual=None, activation=None):
        x, padding = self._padded(x)
        return conv1d_bias_act(x, weight, bias, self.stride, padding, self.dilation, self.groups,
                               self.activation if activation is None else activation, residual)

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation}"


@overridable
def _folded_conv1d_forward(module, x, parameters=None, residual=None):
    """FoldedConv1d.forward (a function for the reason _conv_bn_relu2d_forward gives)."""
    if module.folds_batchnorm:
        _check_bn1d_fold_holds(x, 3, f"(N, {module.in_channels}, L)", "channels", "on an unbatched input "
                               "BatchNorm1d normalizes along the length: that Conv1d → BatchNorm1d cannot be fused")
    weight, bias = _forward_parameters(module) if parameters is None else parameters
    if residual is None or (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype
                            and tuple(residual.shape) == _conv1d_output_shape(module, x)):
        return module._conv_forward(x, weight, bias, residual)
    # A residual the kernel does not take (one that only broadcasts to the output, another dtype, a number): the add
    # as PyTorch does it (broadcasting, type promotion), as the unfused chain did.
    out = module._conv_forward(x, weight, bias, activation="none")
    return apply_activation_(out.add_(residual) if module.residual_in_place else out + residual, module.activation)


def _conv1d_output_shape(module, x):
    """The shape nn.Conv1d module gives for a batched input x."""
    if module.padding == "same":
        return (x.shape[0], module.out_channels, x.shape[2])
    padding = 0 if module.padding == "valid" else module.padding[0]
    span = module.dilation[0] * (module.kernel_size[0] - 1) + 1
    return (x.shape[0], module.out_channels, (x.shape[2] + 2 * padding - span) // module.stride[0] + 1)


def _check_bn1d_fold_holds(x, ndim, shape, normalized, otherwise):
    """ValueError unless x is ndim-D (`shape`), the inputs on which a folded BatchNorm1d normalized the layer's
    `normalized` (elsewhere it normalizes another dim: `otherwise`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"argument 'x' must be {ndim}-D {shape}, where the BatchNorm1d folded into "
                         f"this layer normalized its {normalized}; got shape {tuple(x.shape)} ({otherwise})")


def swap_conv1d(model, inplace=False):
    """model with every torch.nn.Conv1d (the class itself, not subclasses) computed by pyops.nn.Conv1d.

    Each layer's class becomes pyops.nn.Conv1d (which adds no state), so everything else about the layer stays:
    its parameters, hooks (an old-style weight_norm/spectral_norm's included: torch cannot deepcopy those layers,
    so convert them with inplace=True), attributes, and modules shared between parents stay one module. An
    nn.LazyConv1d becomes a pyops.nn.Conv1d when its first input initializes it (that first call still runs
    nn.Conv1d's forward). A layer with parametrizations (torch.nn.utils.parametrizations.weight_norm,
    spectral_norm, parametrize.register_parametrization: the usual TCN and vocoder layers) keeps them, on a
    pyops.nn.Conv1d (remove_parametrizations leaves that). inplace=False (default) converts a deep copy and
    returns it; True converts model itself and returns it.
    Outputs and gradients are F.conv1d's (within fp32 rounding); state_dict keys are unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    work = model if inplace else copy.deepcopy(model)
    for module in work.modules():
        if type(module) is torch.nn.Conv1d:
            module.__class__ = Conv1d
        elif type(module) is torch.nn.LazyConv1d:
            module.cls_to_become = Conv1d  # the class LazyModuleMixin gives the layer once its input initializes it
        elif _parametrized_conv1d(module):
            module.__class__ = _parametrized_class(type(module), Conv1d)
    return work


def _parametrized_conv1d(module):
    """Whether module is an nn.Conv1d (the class itself) that torch.nn.utils.parametrize gave parametrizations: its
    class is then one made for it, a subclass of nn.Conv1d whose properties compute the parametrized tensors."""
    return (torch.nn.utils.parametrize.is_parametrized(module)
            and type(module).__bases__ == (torch.nn.Conv1d,))


def _parametrized_class(parametrized, base):
    """parametrize's class for a module (its properties, __getstate__, ...) on another base: as parametrize makes
    it, so that remove_parametrizations restores base (the class's first base)."""
    namespace = {k: v for k, v in vars(parametrized).items() if k not in ("__dict__", "__weakref__")}
    return type(parametrized.__name__, (base,), namespace)


ACTIVATIONS = tuple(ACTIVATION_CODES)  # ("none", "relu", "relu6", "silu", "hardswish", "hardsigmoid", "sigmoid")
_CUDNN_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _autograd_sees(*tensors):
    """Whether autograd has anything to do with a call on these tensors (None allowed): grad mode on and one of them
    requiring grad, or a forward-mode AD level open (a tangent must reach the op, whose Autograd kernel carries it
    through the op's ATen composite; csrc/common/dispatch.h). The inference-only paths need it not to."""
    return ((torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors))
            or forward_ad._current_level >= 0)  # no level open: no tensor carries a tangent


# The dtypes whose CPU inference runs oneDNN on the library path, in their own dtype (float32; bfloat16 where the CPU
# has its instructions) or computed in float32 (float16; bfloat16 elsewhere): csrc/common/onednn.h. Not float64.
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_ONEDNN = torch.backends.mkldnn.is_available()  # (a property of the torch build: asked once)


def _cpu_inference(x, weight, bias, residual, dtypes=(torch.float32,)):
    """Whether a call is inference on the CPU in one of `dtypes` with a 4-D input (in a CPU autocast region: in the
    dtype the region's convolutions compute in, so that its kernel casts nothing), outside torch.compile,
    torch.jit.trace and dispatch modes (FakeTensorMode: the shape probes of convolutionalize, make_fx; count_ops):
    where ConvBNReLU2d's CPU-only paths (packed weights: float32; a channels_last stem) apply."""
    return (x.is_cpu and weight.is_cpu and x.dtype in dtypes and weight.dtype is x.dtype and x.dim() == 4
            and (not torch.is_autocast_enabled("cpu") or x.dtype is convolution_autocast_dtype(x.device))
            and _plain_inference(x, weight, bias, residual))


def _plain_inference(x, weight, bias, residual):
    """Whether a call on these tensors (None allowed) is inference on plain tensors outside torch.compile,
    torch.jit.trace and dispatch modes: where ConvBNReLU2d may keep derived weights and call what it likes."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._len_torch_dispatch_stack() and not _autograd_sees(x, weight, bias, residual)
            and _plain_tensors(x, weight, bias, residual))


def _inference_compute_dtype(x, weight, residual):
    """(compute dtype, output dtype) where inference converts x, weight, bias and residual before the op, else None.

    Inside a torch.autocast region of x's device: the dtype the op's autocast kernel would cast them to (the region's
    on CUDA and where the CPU computes it natively, else float32: convolution_autocast_dtype), the output's too. On
    the CPU outside one, float16 and non-native bfloat16 compute in float32 (the op does the same, csrc/ops/
    conv_bn_relu/conv_bn_relu_cpu.cpp) and the output is rounded back. Converting here lets the module keep the
    converted weight (the op would convert it on every call: a float32 resnet18 in a bf16 region spent as much on
    that as on its convolutions) and lets the float32 paths (packed weights, channels_last stems) serve the call."""
    # (cheapest tests first: a float32 call outside a region, the common case, costs ~0.5 µs here)
    if x.dtype not in AUTOCAST_DTYPES or weight.dtype not in AUTOCAST_DTYPES:
        return None
    if torch.is_autocast_enabled("cpu") if x.is_cpu else in_autocast_region(x.device):
        target = output = convolution_autocast_dtype(x.device)
    elif x.is_cpu and x.dtype is weight.dtype and x.dtype is not torch.float32:
        if x.dtype is torch.bfloat16 and cpu_computes_bf16():
            return None
        target, output = torch.float32, x.dtype
    else:
        return None
    if x.dtype is target and weight.dtype is target and (residual is None or residual.dtype is target):
        return None
    return target, output


_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _plain_tensors(*tensors):
    """Whether each of the tensors (None allowed) is a plain tensor: neither a tensor subclass (a FakeTensor outside
    its mode, ...), which the packed weights' opaque tensors cannot serve, nor a torch.func transform's wrapper
    (vmap's batched tensor, ...), which the inference-only paths (packed weights, layout queries) cannot serve: the
    op handles both (a wrapper through vmap's fallback, a loop over the batch: pyops registers no batching rule).
    Any operand counts: an ensemble vmapped over stacked weights (torch.func.stack_module_state) sees a plain input.
    (One loop for both tests: this runs on every inference call of a fused layer.)"""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or wrapped(t)):
            return False
    return True


def _forward_parameters(module):
    """(weight, bias) of a fused layer as its forward reads them, under its forward pre-hooks: pruning's and
    old-style weight_norm's hooks recompute module.weight before each call. The layers' forwards read them and pass
    them on, so torch.fx.symbolic_trace records the call with what the hooks computed (a function reading
    module.weight when the traced graph runs, past the hooks, got the tracer's Proxy or a stale weight). Read from
    _parameters where they are the module's own (module.weight goes through nn.Module.__getattr__, ~0.5 µs a read),
    else as attributes (a parametrization's property, a hook's computed tensor)."""
    params = module._parameters
    return (params["weight"] if "weight" in params else module.weight,
            params["bias"] if "bias" in params else module.bias)


def module_activation(module):
    """The name of an ACTIVATION_MODULES class's instance (or a subclass's) that computes what that class does, else
    None: a subclass with a forward of its own (a leaky variant, say) computes another function, which was fused as a
    ReLU; so does an nn.ReLU6 with other clamp bounds."""
    for cls, name in ACTIVATION_MODULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return name if cls is not nn.ReLU6 or (module.min_val, module.max_val) == (0.0, 6.0) else None
    return None


def activation_name(relu):
    """The activation named by `relu` as from_modules accepts it: True → "relu", False/None → "none", a name in
    ACTIVATIONS → itself, an instance of a class in ACTIVATION_MODULES (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid) → its name."""
    if relu is True:
        return "relu"
    if isinstance(relu, tuple(ACTIVATION_MODULES)):
        name = module_activation(relu)
        if name is None:
            raise ValueError(f"argument 'relu' is a {type(relu).__name__}, a subclass of "
                             f"{'/'.join('nn.' + c.__name__ for c in ACTIVATION_MODULES)} with its own forward (or "
                             "clamp bounds): it computes another function than the fused activation")
        return name
    if relu is False or relu is None:
        return "none"
    if isinstance(relu, str) and relu in ACTIVATIONS:
        return relu
    raise ValueError(f"argument 'relu' must be True, False, one of {ACTIVATIONS} or an instance of "
                     f"{', '.join('nn.' + c.__name__ for c in ACTIVATION_MODULES)}, "
                     f"got {relu!r}")


def check_activation(activation):
    """activation, if it is one of ACTIVATIONS' names, else ValueError."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"argument 'activation' must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def apply_activation_(y, activation):
    """y with the activation applied in place (pyops.activations.IN_PLACE)."""
    return IN_PLACE[activation](y)


def explicit_padding(conv):
    """conv's padding as a pair of ints; padding='same' becomes the symmetric padding it stands for.
    ValueError where the fused kernel cannot express the conv (non-zero padding modes, asymmetric 'same')."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"argument 'conv' has padding_mode={conv.padding_mode!r}; ConvBNReLU2d supports 'zeros' "
                         f"only (fold it with pyops.fold_bn instead)")
    return padding_pair(conv.padding, conv.kernel_size, conv.dilation, conv.stride, "conv")


class ConvBNReLU2d(DerivedWeights):
    """act(conv2d(x, weight) + bias [+ residual]) in one fused kernel, with a BatchNorm already folded into
    weight and bias (see from_modules).

    x: (N, in_channels, H, W) or unbatched (in_channels, H, W) → (N, out_channels, H', W'), in x's memory format
    (CPU inference may return channels_last instead: below).
    residual: None or a tensor of the output's shape, added before the activation (a ResNet block's shortcut); one
    that only broadcasts to the output is added by a separate PyTorch add (the kernel takes the exact shape).
    activation: one of ACTIVATIONS (pyops.activations: "none", "relu", "relu6", "silu", "hardswish", "hardsigmoid",
    "sigmoid").
    Gradients flow to x, weight, bias and residual; the BatchNorm statistics are frozen in weight and bias (the
    semantics of torchvision's FrozenBatchNorm2d). With ReLU or ReLU6 the output is saved for backward (its mask),
    so an in-place op on the output fails the backward, as after torch.relu (the unfused ReLU6, hardtanh, saved its
    input instead). The other activations run as the unfused layers do where autograd records the call: the
    convolution fused with the residual add, then torch's function (F.silu, F.hardswish, ...).

    CPU inference (fp32, nothing requiring grad, not compiling) on a layer where it pays (see _packed_weight) packs
    the weight once into oneDNN's blocked layout for the input's shape and reuses it while the shape and the weight
    stay the same (and the module in eval mode): one extra copy of the weight, rebuilt when either changes or the
    module is switched by train()/eval(), never saved or copied. In eval mode, changes are seen through autograd's
    version counter (in-place ops on the parameter) and after a step of a torch.optim optimizer holding it
    (fused=True steps do not bump it); writes that bypass it outside an optimizer (through `weight.data`) are seen after the next train()/eval()
    switch (a layer already in eval mode: train() then eval(), or assign a new weight). That path
    computes in channels_last and returns a channels_last output (same values), as a PyTorch convolution with a
    channels_last weight does. A layer that widens fewer than 64 channels into 64 or more (a network's stem) also
    returns channels_last in CPU inference (fp32, bf16, fp16; see _widens_into_channels_last): a fused network thus
    is channels_last from its stem on, where ATen's pooling and elementwise ops are faster.

    Inference inside a torch.autocast region converts x, residual, weight and bias to the dtype the op would cast
    them to, and in CPU inference float16 (and bfloat16 on a CPU without its instructions) computes in float32 and
    rounds the output back, as the op does. Where that pays (_conversion_pays: a packed or widening layer, a large
    weight) the converted weight and bias are kept as the packed weight is: one more copy, rebuilt when they change,
    with the same rule for seeing changes (above: a write through `.data` outside an optimizer is seen after the
    next train()/eval() switch). The float32 CPU paths above then serve float16 layers too.

    CUDA inference on the default (cuDNN) path calls cuDNN's fused convolution straight from forward (see
    _cudnn_forward): the same kernel and the same values as the op, without the op's host path, which is the bound
    for small fp16/bf16 layers.
    """

    # keep_input_layout: never return channels_last for an NCHW input (no widening conversion, no packed path for
    #   it), for code that .view()s the output: pyops.fuse sets it where it cannot rewrite the model's views (the
    #   untraceable fallback).
    # residual_in_place: the add this layer replaced wrote into the conv's output (`y += residual`), so a residual
    #   the kernel does not take (another dtype) is added keeping the output's dtype and shape, as add_ does.
    keep_input_layout = False
    residual_in_place = False
    _converted = None  # an _Entry of DerivedWeights: (weight, bias) in the dtype inference computes in
    _transient = ("_derived", "_converted")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 activation="relu", device=None, dtype=None):
        super().__init__()
        groups = as_int(groups, "groups", 1)  # (ValueError below 1, as nn.Conv2d; numpy integers pass)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"argument 'groups' = {groups} must divide in_channels = {in_channels} and "
                             f"out_channels = {out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = int_tuple(kernel_size, "kernel_size", 2, 1)
        self.stride, self.dilation = int_tuple(stride, "stride", 2, 1), int_tuple(dilation, "dilation", 2, 1)
        self.padding = padding_pair(padding, self.kernel_size, self.dilation, self.stride)
        self.activation = check_activation(activation)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        """nn.Conv2d's initialization (a module built directly, not from_modules, starts like a fresh Conv2d)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.weight[0].numel() if self.out_channels else 0
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_modules(cls, conv, bn, relu=True):
        """conv (nn.Conv2d, zero padding) → bn (eval-mode BatchNorm2d or FrozenBatchNorm2d, or None) → relu, folded
        once.

        relu: True/"relu"/nn.ReLU(), False/"none", or another activation's name or module (activation_name). The
        new module's parameters have conv's dtype, device and weight layout; with bn None (a VGG's Conv2d → ReLU)
        they are conv's own weight and bias Parameters, shared (a zero bias that does not require grad where conv
        has none: pyops.fold.with_bias). conv and bn are not modified. ValueError/TypeError as fold_bn and
        with_bias, and for convs the kernel cannot run (see explicit_padding)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"argument 'conv' must be an nn.Conv2d, got {type(conv).__name__}")
        activation = activation_name(relu)
        padding = explicit_padding(conv)
        folded = fold_bn(conv, bn) if bn is not None else with_bias(conv)
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                    conv.groups, activation, device="meta")
        fused.weight, fused.bias = folded.weight, folded.bias
        return fused.train(conv.training)

    def output_shape(self, x):
        """The shape conv2d gives for input x (to tell a same-shape residual from a broadcast one)."""
        spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                   zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return (*x.shape[:-3], self.out_channels, *spatial)

    def _packed_weight(self, x, weight, bias, residual):
        """The weight packed by pyops::conv2d_pack_weight for x's shape, or None where the packed path does not
        apply or does not pay.

        It applies to CPU fp32 inference only (the packed tensor is opaque to autograd, torch.compile and
        torch.jit.trace), with an input in either memory format (oneDNN converts an NCHW one itself).
        Measured per layer on this project's CPU (bench/NOTES-conv_bn_relu.md), packing gains up to 65 % on
        ResNet's 3×3 layers with ≥ 64 input channels (most at batch 1 and in the deep layers), but loses ~25 % on the
        3-channel 7×7 stem and ~10 % on the homework's 16→16 3×3 layer (32 channels: even): oneDNN's chosen blocked
        layout then costs more than the per-call reorder of a small weight it replaces. 1×1 layers lose 10-35 % at
        batch 8 on an NCHW input (the conversion to channels_last is then most of the work) and gain 5-70 % on a
        channels_last one (a fused network's inner layers). Grouped and depthwise layers gain 2-56 % on a
        channels_last input (22 layers of ResNeXt, RegNet, MobileNet, EfficientNet and ShuffleNet shapes, batch
        1-8; stop 27), where the op takes oneDNN anyway; on an NCHW one the op may take our direct kernel (depth
        multipliers: 4x faster). Hence: ≥ 64 input channels, and a spatial kernel with one group or a channels_last
        input, but not a 1×1 layer the op runs as a GEMM (small layers, few positions:
        csrc/ops/conv_bn_relu/conv_bn_relu_cpu.cpp). A packed weight is kept per input shape (up to 8: a detection
        head shared by the levels of a feature pyramid, multi-scale inference), and only for a weight the layer keeps
        (its Parameter, or its float32 conversion of a float16 one: _converted_weights; the caller tells): a weight
        computed anew for each call (a parametrization such as weight_norm, pruning's mask) would be packed on every
        call, slower than the unpacked path.
        """
        # (the layer's rule, then the call's, then x's layout and shape: under torch.export a query of them
        # specializes its shape)
        if not self._may_pack() or not _cpu_inference(x, weight, bias, residual) or not self._packs(x):
            return None
        pack = torch.ops.pyops.conv2d_pack_weight.default
        return self.derived(("packed", tuple(x.shape)), (weight,),
                            lambda: pack(x, weight, self.stride, self.padding, self.dilation, self.groups), keep=8)

    def _may_pack(self):
        """The layer's part of _packed_weight's rule, asked first (most layers leave here, before the call's part)."""
        return self.in_channels >= 64 and not self.training

    def _packs(self, x):
        """The layer's and x's part of _packed_weight's rule, asked after the call's part (_cpu_inference or
        _plain_inference: vmap's batched tensors answer no layout query but NCHW's, torch.export's symbolic shapes
        would be specialized by the shape queries)."""
        if not self._may_pack() or x.numel() == 0:
            return False
        if (self.kernel_size == (1, 1) or self.keep_input_layout or self.groups > 1) and (
                x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)):
            return False
        if (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1
                and one_by_one_runs_as_gemm(x.shape[0], self.in_channels, self.out_channels, *x.shape[2:], True)):
            return False  # (the packed op would run it as a GEMM too, without the packed weight)
        return _HAS_ONEDNN

    def _conversion_pays(self, x, weight, residual, dtype):
        """Whether converting x and the weights to dtype here (and keeping the converted weights) beats letting the
        op convert them on every call: where the converted call takes a path of its own (cuDNN called directly in a
        CUDA autocast region, _cudnn_forward, instead of the op's 20-40 µs host path; a packed float32 weight; a
        widening layer's channels_last) or the weight is large. On the CPU a small layer's conversion costs the op
        less than the conversion path costs here (~15 µs of Python a call, 1 thread: a float16 mobilenet_v3_small
        and shufflenet ran 7-24 % slower with every layer converting here; float16 1×1 layers break even at 2^18
        weights, 3×3 ones gain 1.1-5.9x with their packed float32 weight)."""
        return (not x.is_cpu or weight.numel() >= 1 << 18 or self._widens(x, residual)
                or (dtype is torch.float32 and self._packs(x)))

    def _converted_weights(self, weight, bias, dtype, kept):
        """(weight, bias) converted to dtype for inference (_inference_compute_dtype), kept between calls when they
        are the module's own Parameters (kept; a slot of its own beside the packed forms, rebuilt when either
        changes: DerivedWeights): converting a float32 resnet18's weights to bfloat16 on every call cost as much as
        its convolutions."""
        def convert():
            return tuple(None if t is None else t.detach().to(dtype) for t in (weight, bias))
        if not kept:
            return convert()
        sources = (weight,) if bias is None else (weight, bias)
        return self.derived(("converted", dtype), sources, convert, slot="_converted")

    def _widens_into_channels_last(self, x, weight, bias, residual):
        """Whether CPU inference (float32, bfloat16, float16: oneDNN's dtypes, _ONEDNN_DTYPES) converts an NCHW x to
        channels_last first, making this layer's output channels_last: a layer that widens few channels (< 64) into
        many (>= 64), as a network's stem does.

        The layers after it compute in channels_last (fp32: packed layers, whatever their input: _packed_weight;
        bf16/fp16: a channels_last input gives a channels_last output), so a fused network then is channels_last from
        its stem on, and the ops between the layers run on channels_last tensors, where ATen is much faster for
        some: max_pool2d 3×3/2 on ResNet's stem output (8×64×112×112) takes 30 ms NCHW vs 2.7 ms channels_last on
        this project's CPU (bench/NOTES-conv_bn_relu.md). The input is the small side of such a layer (3×224×224 vs
        64×112×112 values), so converting it costs little.
        """
        return (self.in_channels < 64 <= self.out_channels  # (as in _packed_weight, the call's rule before _widens)
                and _cpu_inference(x, weight, bias, residual, _ONEDNN_DTYPES) and self._widens(x, residual))

    def _widens(self, x, residual):
        """The layer's and x's part of _widens_into_channels_last's rule, asked after the call's part (as _packs)."""
        # cheapest tests first: most layers leave at the first
        return (self.in_channels < 64 <= self.out_channels and self.groups == 1 and residual is None
                and not self.keep_input_layout
                and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last))

    def _cudnn_forward(self, x, weight, bias, residual):
        """act(conv2d(x) + bias [+ residual]) by cuDNN called from here, or None where this path does not apply.

        The op's CUDA default (PYOPS_CONV_PATH auto or cudnn) is cuDNN's runtime fusion, torch.cudnn_convolution_relu
        / torch.cudnn_convolution_add_relu, for ReLU in fp32/fp16/bf16 (TF32 as torch.backends.cudnn.allow_tf32
        says, as for F.conv2d), and cuDNN's convolution with the epilogue in place for no activation. Reaching it
        through the registered op costs 20-40 µs of host time a call on the GPU machines we measured (the boxed op
        call, its argument checks): more than the kernels of a small fp16 layer take, so a fused fp16 network was
        bound by the host (bench/NOTES-conv_bn_relu.md). For inference this calls the same cuDNN functions directly,
        after checks that cost a few µs. Everything else goes to the op: autograd, torch.compile, dispatch modes
        (count_ops, FlopCounterMode), autocast regions unless x is in the region's dtype (inference converts x and
        weight first: _inference_compute_dtype; otherwise the op casts), activations other than ReLU, float64, other
        paths, inputs that are neither NCHW- nor channels_last-contiguous, and any input cuDNN refuses (the op's
        checks then name the bad argument).
        """
        if (not x.is_cuda or x.dtype is not weight.dtype or x.dtype not in _CUDNN_FUSED_DTYPES
                or self.activation not in ("none", "relu") or x.dim() != 4 or x.shape[1] != self.in_channels
                or x.numel() == 0
                or _autograd_sees(x, weight, bias, residual) or not _plain_tensors(x, weight, bias, residual)
                or torch._C._len_torch_dispatch_stack() or torch.compiler.is_compiling()
                or conv_path() == "direct"
                or (torch.is_autocast_enabled("cuda") and x.dtype is not torch.get_autocast_dtype("cuda"))):
            return None
        # The op's layout rule: the output is channels_last iff x is channels_last- and not NCHW-contiguous. cuDNN
        # returns the layout its operands share, so the weight (and residual) must be in x's.
        if x.is_contiguous():
            fmt = torch.contiguous_format
        elif x.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last
        else:
            return None
        if not weight.is_contiguous(memory_format=fmt):
            weight = self.derived(("layout", fmt), (weight,), lambda: weight.contiguous(memory_format=fmt))
        if residual is not None and (residual.dtype is not x.dtype or not residual.is_contiguous(memory_format=fmt)):
            return None
        try:
            if self.activation == "none":
                out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
                return out if residual is None else out.add_(residual)
            if residual is None:
                return torch.cudnn_convolution_relu(x, weight, bias, self.stride, self.padding, self.dilation,
                                                    self.groups)
            return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, self.stride, self.padding,
                                                    self.dilation, self.groups)
        except RuntimeError:
            return None  # e.g. another device or an input smaller than the kernel: the op raises a clear error

    def forward(self, x, residual=None):
        """x (N, C_in, H, W) or (C_in, H, W) [, residual: the output's shape, or one broadcasting to it]
        → act(conv(x) + bias [+ residual]) (N, C_out, H_out, W_out) or (C_out, H_out, W_out)."""
        return _conv_bn_relu2d_forward(self, x, residual, _forward_parameters(self))

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias=True, activation={self.activation}"


@overridable
def _conv_bn_relu2d_forward(module, x, residual=None, parameters=None):
    """ConvBNReLU2d.forward, as a module-level function that torch.fx can record: symbolic tracing of a fused model
    hands it the module (as a get_attr node), the traced input and the parameters forward read (_forward_parameters;
    None: read here), and the graph calls it, all of the layer's paths included, when it runs (pyops/_overrides.py).
    A method would not do: the traced graph names its target by its qualified name, and a pickled GraphModule cannot
    import a method by it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    weight, bias = _forward_parameters(module) if parameters is None else parameters
    if residual is not None and not _kernel_takes(module, x, residual):
        # A residual the kernel does not take (one that only broadcasts to the output, another dtype, a number):
        # the add as PyTorch does it (broadcasting, type promotion), as the unfused chain did.
        batched = x.unsqueeze(0) if x.dim() == 3 else x
        out = conv2d_bias_act(batched, weight, bias, module.stride, module.padding, module.dilation, module.groups,
                              activation="none")
        out = out.squeeze(0) if x.dim() == 3 else out
        if isinstance(residual, torch.Tensor):
            try:
                torch.broadcast_shapes(out.shape, residual.shape)
            except RuntimeError:
                raise ValueError(f"argument 'residual' of shape {tuple(residual.shape)} does not broadcast to the "
                                 f"output's shape {tuple(out.shape)}") from None
        return apply_activation_(out.add_(residual) if module.residual_in_place else out + residual,
                                 module.activation)
    if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes
        batched_residual = residual.unsqueeze(0) if residual is not None else None
        return _conv_bn_relu2d_forward(module, x.unsqueeze(0), batched_residual, (weight, bias)).squeeze(0)
    params = module._parameters
    own_weight = weight is params.get("weight")
    compute = _inference_compute_dtype(x, weight, residual)
    if (compute is not None and _plain_inference(x, weight, bias, residual)
            and module._conversion_pays(x, weight, residual, compute[0])):
        dtype, out_dtype = compute
        kept = (not module.training  # (a training loop may write its weights without a trace: _packed_weight)
                and own_weight and bias is params.get("bias"))
        weight, bias = module._converted_weights(weight, bias, dtype, kept)
        x, residual = x.to(dtype), None if residual is None else residual.to(dtype)
        return _fused_call(module, x, weight, bias, residual, kept).to(out_dtype)
    return _fused_call(module, x, weight, bias, residual, own_weight)


def _kernel_takes(module, x, residual):
    """Whether the fused kernel adds residual itself: a tensor of x's dtype and of the output's shape."""
    if not isinstance(residual, torch.Tensor) or residual.dtype != x.dtype:
        return False
    if not torch.jit.is_tracing():
        return tuple(residual.shape) == module.output_shape(x)
    # torch.jit.trace sees the sizes as tensors and warns that the comparison becomes a constant of the trace: the
    # kernel's branch kept, right for a residual of the output's shape at any input size (the op checks it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(residual.shape) == module.output_shape(x)


def _fused_call(module, x, weight, bias, residual, kept):
    """The layer's call on a batched x, by the first path that applies. kept: whether weight is one the module keeps
    between calls (its own Parameter, or its kept conversion of it), which may be packed."""
    # Straight to the op: it checks every argument itself (its errors name them), and skipping the functional
    # wrapper's Python checks saves 10-15 µs a layer (measured on the CPU with a tiny input), about the kernel
    # time of a small fp16 layer on a GPU.
    out = module._cudnn_forward(x, weight, bias, residual)
    if out is not None:
        return out
    activation = ACTIVATION_CODES[module.activation]
    if module._widens_into_channels_last(x, weight, bias, residual):
        x = x.contiguous(memory_format=torch.channels_last)
    packed = module._packed_weight(x, weight, bias, residual) if kept else None
    if packed is not None:
        return torch.ops.pyops.conv2d_bias_act_packed.default(x, weight, packed, bias, module.stride, module.padding,
                                                              module.dilation, module.groups, activation, residual)
    return torch.ops.pyops.conv2d_bias_act.default(x, weight, bias, module.stride, module.padding, module.dilation,
                                                   module.groups, activation, residual)


class LinearBNReLU(NotScriptable, nn.Module):
    """act(x @ weight.T + bias) with a BatchNorm1d folded into weight and bias (see from_modules), computed by
    pyops.linear_bias_act (on the CPU, small batches by our weight-streaming kernel).

    x: (N, in_features) → (N, out_features): the only shape on which Linear → BatchNorm1d folds (on a 3-D input,
    BatchNorm1d normalizes dim 1, not the Linear's features), so others raise ValueError rather than differ from the
    unfused layers; without a folded BatchNorm (from_modules with bn None) any (*, in_features). activation: one of
    ACTIVATIONS. Gradients as ConvBNReLU2d. folds_batchnorm: whether a BatchNorm1d was
    folded in.
    """

    folds_batchnorm = True

    def __init__(self, in_features, out_features, activation="relu", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation = check_activation(activation)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's initialization."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_modules(cls, linear, bn, relu=True):
        """linear (nn.Linear) → bn (eval-mode BatchNorm1d over the linear's output features) → relu, folded once;
        bn None: linear → relu, sharing linear's weight and bias Parameters (pyops.fold.with_bias). relu as
        ConvBNReLU2d.from_modules; linear and bn are not modified."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        activation = activation_name(relu)
        folded = fold_bn(linear, bn) if bn is not None else with_bias(linear)
        fused = cls(linear.in_features, linear.out_features, activation, device="meta")
        fused.weight, fused.bias = folded.weight, folded.bias
        fused.folds_batchnorm = bn is not None
        return fused.train(linear.training)

    def forward(self, x):
        """x (N, in_features) → act(linear(x)) (N, out_features); (*, in_features) → (*, out_features) without a
        folded BatchNorm."""
        return _linear_bn_relu_forward(self, x, _forward_parameters(self))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=True, " \
               f"activation={self.activation}"


@overridable
def _linear_bn_relu_forward(module, x, parameters=None):
    """LinearBNReLU.forward (a function for the reason _conv_bn_relu2d_forward gives)."""
    if module.folds_batchnorm:
        _check_bn1d_fold_holds(x, 2, f"(N, {module.in_features})", "features", "on a 3-D input BatchNorm1d "
                               "normalizes dim 1: that Linear → BatchNorm1d cannot be fused")
    weight, bias = _forward_parameters(module) if parameters is None else parameters
    return linear_bias_act(x, weight, bias, module.activation)


class SlidingClassifier(NotScriptable, nn.Module):
    """A crop classifier applied densely: pyops.sliding_classify in module form, converted once and reused.

    SlidingClassifier(model, window, stride=1, in_channels=None): model maps (B, C, h, w) crops to (B, classes)
    (see pyops.convolutionalize, which takes in_channels too); the module holds its fully convolutional copy
    (`fcn`), not the model.
    forward(images (B, C, H, W), max_memory=4 GiB, precision="fp32", algorithm="auto")
        → (B, classes, ⌊(H−h)/s⌋+1, ⌊(W−w)/s⌋+1); algorithm and gradients as in sliding_classify (FFT spectra are
        kept on the module's fcn after the first call that uses them).
    """

    def __init__(self, model, window, stride=1, in_channels=None):
        super().__init__()
        self.fcn = convolutionalize(model, window, in_channels)
        self.stride = _pair_arg(stride, "stride")

    def forward(self, images, max_memory=DEFAULT_MAX_MEMORY, precision="fp32", algorithm="auto"):
        return classify_fcn(self.fcn, images, self.stride, max_memory, precision, algorithm)

    def extra_repr(self):
        return f"window={self.fcn.window}, stride={self.stride}, total_stride={self.fcn.stride}"
