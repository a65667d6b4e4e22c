"""Fused convolution + eval-mode BatchNorm + residual + ReLU: one pass over the output.

    conv2d_bn_relu(x, W, b, γ, β, μ, σ², ε) = relu(γ·(conv2d(x, W) + b − μ)/√(σ²+ε) + β + residual)
    conv2d_bias_act(x, W', b')             = act(conv2d(x, W') + b' + residual),
                                             act one of pyops.activations.ACTIVATIONS

NaN: torch.relu keeps a NaN, and so do our kernels' epilogues (the direct CPU kernel, the CPU GEMM paths of 1×1
layers and of small single images, the CUDA implicit GEMM: every layout and dtype). oneDNN's fused ReLU/ReLU6
post-op (PYOPS_CONV_PATH=library, which `auto` picks for large CPU layers) maps a NaN to 0, and in float32 a +inf
after a residual add to the largest float (tests/test_conv_bn_relu.py checks ours; oneDNN's was measured): which of
the two a layer gets depends on its shape and layout, and on the batch size for 1×1 layers; what cuDNN's runtime
fusion (torch.cudnn_convolution_relu) does with a NaN is not yet measured. A NaN in the input makes the outputs
whose windows see it NaN before the activation; to find NaNs, check the input or force PYOPS_CONV_PATH=direct.
With eps = 0, a zero running variance divides by zero: the fold's infinite scale makes that channel's outputs NaN
(the unfused BatchNorm gives NaN or ±inf there as well); use a positive eps, as BatchNorm's default 1e-5. The fold
multiplies the weights by γ/√(σ²+ε) before the convolution: with a tiny variance and huge inputs W'·x can overflow
where the unfused chain, subtracting first, stays finite (inputs of 1e30, σ² = 1e-30).
float16/bfloat16: W' and b' are folded in float64 and rounded to the weight's dtype, as any fold into half-precision
weights (fold_bn, torch's fuse_conv_bn_eval); where BN's shift cancels most of the output that rounding shows, as
the unfused half-precision chain's rounding of the conv output does (random 3×3 layers: the largest relative
errors, at outputs near zero, within ~2.5x of the unfused chain's, hundreds of half ulps for both). Compute in
float32 where that matters.

conv2d_bn_relu folds the BN into (W', b') with a small kernel (scale = γ/√(σ²+ε) in float64, W' = W·scale,
b' = (b − μ)·scale + β) and then runs conv2d_bias_act, the kernel that pyops.nn's fused modules call with weights
folded once. The BN statistics are frozen (torchvision's FrozenBatchNorm2d semantics): gradients flow to the input,
weight, bias, residual and γ, β, never to μ, σ².

Main loops (PYOPS_CONV_PATH forces one; default `auto` picks per shape, see bench/NOTES-conv_bn_relu.md):
  CPU   `direct`  ours, bias/residual/activation applied to each L1-resident tile before its only store;
        `library` oneDNN's convolution with the same epilogue as its post-ops (fp32);
        and under `auto` only, for float32 1×1 layers and single images of up to 20480 values, MKL's GEMM (ATen's
        im2col for the latter) with our epilogue in one pass after it.
  CUDA  `ours`    our tiled implicit GEMM, fp32 FMA (never TF32), epilogue fused;
        `cudnn`   cuDNN runtime fusion (torch.cudnn_convolution_relu / _add_relu) for ReLU in fp32/fp16/bf16, else
                  cuDNN's convolution with the epilogue in place; TF32 as torch's conv allows it. The default on
                  every shape: cuDNN was faster than ours on all of them on an H200.
"""
import math
import numbers

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ._checks import as_int, check_devices, check_floating, check_like, check_tensor, int_tuple
from ._overrides import overridable
from .activations import ACTIVATIONS



def _pair(v, name, minimum):
    return list(int_tuple(v, name, 2, minimum))


def padding_pair(padding, kernel_size, dilation, stride, name="padding"):
    """padding (an int, a pair, 'valid' or 'same', as nn.Conv2d and F.conv2d take it) as a tuple of two ints >= 0;
    'same' becomes the symmetric padding it stands for. ValueError (naming argument `name`) for an asymmetric 'same'
    (an even effective kernel: PyTorch pads one more on the right, which the fused kernel cannot), a strided 'same'
    (as F.conv2d) and any other string."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding != "same":
            raise ValueError(f"argument '{name}' has padding={padding!r}; expected an int, a pair, 'valid' or 'same'")
        if any(s != 1 for s in stride):
            raise ValueError(f"argument '{name}' has padding='same', which is not supported for strided "
                             "convolutions (as in F.conv2d)")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(f"argument '{name}' has padding='same' with an even effective kernel size, which pads "
                             "asymmetrically; the fused kernel takes symmetric padding only (fold the BatchNorm "
                             "with pyops.fold_bn and keep the conv)")
        return tuple(t // 2 for t in totals)
    return int_tuple(padding, name, 2, 0)


def _check_channel_vector(t, name, channels, ref, ref_name):
    if t is None:
        return
    check_floating(t, name)
    check_devices(ref, ref_name, **{name: t})
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"argument '{name}' must have shape ({channels},) (one value per output channel), "
                         f"got {tuple(t.shape)}")


def output_shape(x, weight, stride, padding, dilation):
    """(N, Cout, OH, OW) of conv2d(x, weight) with the given (validated) pairs."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, weight.shape[0], oh, ow)


def output_memory_format(x):
    """The output keeps x's layout: channels_last iff x is channels_last-contiguous and not NCHW-contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual):
    """Validates conv2d_bias_act's arguments; returns (stride, padding, dilation) as lists of two ints."""
    check_floating(x, "x")
    if x.dim() != 4:
        raise ValueError(f"argument 'x' must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    check_floating(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"argument 'weight' must be 4-D (Cout, Cin/groups, KH, KW), got shape {tuple(weight.shape)}")
    check_like(weight, x, "weight", "x")
    stride, dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    padding = list(padding_pair(padding, weight.shape[2:], dilation, stride))
    groups = as_int(groups, "groups", 1)
    cin, cout = x.shape[1], weight.shape[0]
    if cin % groups != 0 or cout % groups != 0:
        raise ValueError(f"argument 'groups' = {groups} must divide the input channels ({cin}) and the output "
                         f"channels ({cout})")
    if weight.shape[1] * groups != cin:
        raise ValueError(f"argument 'weight' of shape {tuple(weight.shape)} expects {weight.shape[1] * groups} input "
                         f"channels (groups={groups}), but 'x' has {cin} channels")
    if x.shape[0] > 0 and (x.shape[2] == 0 or x.shape[3] == 0):
        # (F.conv2d refuses it too, but for an empty batch; padded, the result would be the bias alone)
        raise ValueError(f"argument 'x' has an empty spatial size (shape {tuple(x.shape)})")
    for i, k in enumerate(weight.shape[2:]):
        if x.shape[2 + i] + 2 * padding[i] < dilation[i] * (k - 1) + 1:
            raise ValueError(f"argument 'x' of spatial size {tuple(x.shape[2:])} plus padding {padding} is smaller "
                             f"than the dilated kernel")
    shape = output_shape(x, weight, stride, padding, dilation)
    # (as the op's C++ check, for the meta kernel, which failed on the storage size; not on symbolic sizes, where it
    # would add a guard)
    if all(type(v) is int for v in shape) and math.prod(shape) > 2 ** 63 - 1:
        raise ValueError(f"argument 'padding' = {padding} gives an output of {shape} values, more than int64 counts")
    _check_channel_vector(bias, "bias", cout, x, "x")
    if bias is not None:
        check_like(bias, x, "bias", "x")
    if residual is not None:
        check_tensor(residual, "residual")
        check_like(residual, x, "residual", "x")
        if tuple(residual.shape) != shape:
            raise ValueError(f"argument 'residual' must have the output's shape {shape}, got {tuple(residual.shape)}")
    return stride, padding, dilation


def _plain_pair(v):
    """v as a list of two ints where it is an int or a pair of ints, else None."""
    if type(v) is int:
        return [v, v]
    if type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return list(v)
    return None


def unchecked_call(op, *args):
    """op(*args) where the op accepts the call, else None. The ops check every argument themselves
    (test_bad_input_in_cpp_too), so a public function's Python checks, ~14 µs a call (a third of a small layer's),
    need to run only to name the problem once the op refused, and under torch.compile's tracing (the checks run on its
    fake tensors: None there)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return op(*args)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return None  # (the caller's checks then raise the error that names the argument, or the op's again)


def _fast_call(op, leading, stride, padding, dilation, groups, trailing):
    """unchecked_call(op, *leading, stride, padding, dilation, groups, *trailing) where the geometry is plain ints,
    else None (padding strings, which the op cannot take)."""
    geometry = [_plain_pair(v) for v in (stride, padding, dilation)]
    if None in geometry or type(groups) is not int:
        return None
    return unchecked_call(op, *leading, *geometry, groups, *trailing)


def _check_bn_args(weight, bn_weight, bn_bias, running_mean, running_var, eps):
    cout = weight.shape[0]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if t is None:
            raise TypeError(f"argument '{name}' is required (eval-mode BatchNorm folds its running statistics)")
        _check_channel_vector(t, name, cout, weight, "weight")
    _check_channel_vector(bn_weight, "bn_weight", cout, weight, "weight")
    _check_channel_vector(bn_bias, "bn_bias", cout, weight, "weight")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"argument 'eps' must be a number, got {type(eps).__name__}")
    if not eps >= 0 or eps == float("inf"):
        raise ValueError(f"argument 'eps' must be a finite number >= 0, got {eps!r}")


@overridable
def conv2d_bias_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                    residual=None):
    """act(conv2d(x, weight) + bias + residual), the output written once.

    Args:
        x: (N, Cin, H, W), float32/float64 (+ float16/bfloat16), NCHW, channels_last or any strides.
        weight: (Cout, Cin/groups, KH, KW), x's dtype and device (typically BN already folded in).
        bias: (Cout,) or None.
        stride, dilation: int or pair; padding: int, pair, 'valid' or 'same' (symmetric only), as F.conv2d.
        groups: int dividing Cin and Cout.
        activation: "none", "relu", "relu6", "silu", "hardswish", "hardsigmoid" or "sigmoid" (pyops.activations),
            applied after the residual add.
        residual: (N, Cout, OH, OW) or None.
    Returns:
        (N, Cout, OH, OW) in x's dtype (in a torch.autocast region: README, "Mixed precision") and
        memory format.
    """
    if type(activation) is str and activation in ACTIVATIONS:
        out = _fast_call(torch.ops.pyops.conv2d_bias_act.default, (x, weight, bias), stride, padding, dilation, groups,
                         (ACTIVATIONS[activation], residual))
        if out is not None:
            return out
    stride, padding, dilation = _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual)
    if activation not in ACTIVATIONS:
        raise ValueError(f"argument 'activation' must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return torch.ops.pyops.conv2d_bias_act.default(x, weight, bias, stride, padding, dilation, groups,
                                                   ACTIVATIONS[activation], residual)


@overridable
def conv2d_bn_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5, stride=1, padding=0,
                   dilation=1, groups=1, relu=True, residual=None):
    """relu(bn(conv2d(x, weight, bias)) + residual) with BatchNorm in eval form, in one pass over the output.

    Args:
        x: (N, Cin, H, W); weight: (Cout, Cin/groups, KH, KW); bias: (Cout,) or None.
        bn_weight, bn_bias: γ, β of shape (Cout,), or None (affine=False: γ = 1, β = 0).
        running_mean, running_var: μ, σ² of shape (Cout,), any floating dtype (folded in float64).
        eps: ε added to σ². stride, padding, dilation, groups: as conv2d_bias_act.
        relu: apply the ReLU (False: bn(conv) + residual only).
        residual: (N, Cout, OH, OW) added before the ReLU (ResNet's shortcut), or None.
    Returns:
        (N, Cout, OH, OW) in x's dtype (in a torch.autocast region: README, "Mixed precision") and
        memory format.
    """
    if type(relu) is bool and type(eps) in (float, int):
        out = _fast_call(torch.ops.pyops.conv2d_bn_relu.default,
                         (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps)), stride, padding,
                         dilation, groups, (relu, residual))
        if out is not None:
            return out
    stride, padding, dilation = _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual)
    _check_bn_args(weight, bn_weight, bn_bias, running_mean, running_var, eps)
    if not isinstance(relu, bool):  # e.g. "relu6", truthy, would silently mean a plain ReLU
        raise TypeError(f"argument 'relu' must be a bool, got {relu!r} (ReLU6: pyops.nn.ConvBNReLU2d.from_modules "
                        "with relu='relu6')")
    return torch.ops.pyops.conv2d_bn_relu.default(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                                  float(eps), stride, padding, dilation, groups, relu, residual)


# ---- fake (meta) kernels: shapes, dtypes and memory formats exactly as the real kernels produce them ----

@torch.library.register_fake("pyops::conv2d_bias_act")
def _conv2d_bias_act_fake(x, weight, bias, stride, padding, dilation, groups, activation, residual):
    stride, padding, dilation = _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual)
    torch._check(activation in ACTIVATIONS.values(),
                 lambda: f"argument 'activation' must be one of {sorted(ACTIVATIONS.values())}, got {activation}")
    return torch.empty(output_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


@torch.library.register_fake("pyops::conv2d_bn_relu")
def _conv2d_bn_relu_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
                         dilation, groups, relu, residual=None):
    _check_bn_args(weight, bn_weight, bn_bias, running_mean, running_var, eps)
    return _conv2d_bias_act_fake(x, weight, bias, stride, padding, dilation, groups, int(relu), residual)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyops::conv_bn_fold")
def _conv_bn_fold_fake(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    check_floating(weight, "weight")
    _check_bn_args(weight, bn_weight, bn_bias, running_mean, running_var, eps)
    _check_channel_vector(bias, "bias", weight.shape[0], weight, "weight")
    c = weight.shape[0]
    return (weight.new_empty(weight.shape), weight.new_empty((c,)), weight.new_empty((c,), dtype=_acc_dtype(weight.dtype)))


@torch.library.register_fake("pyops::conv_act_backward")
def _conv_act_backward_fake(grad, output, scale, activation, unscaled_too):
    check_devices(output, "output", grad=grad, scale=scale)
    torch._check(grad.shape == output.shape, lambda: "conv_act_backward: 'grad' and 'output' differ in shape")
    fmt = output_memory_format(output)
    second = scale is not None and unscaled_too
    like = dict(dtype=output.dtype, device=output.device)
    return (torch.empty(output.shape, memory_format=fmt, **like),
            torch.empty(output.shape, memory_format=fmt, **like) if second else torch.empty((0,), **like))


# ---- autograd: C++ (csrc/ops/conv_bn_relu/conv_bn_relu_autograd.cpp), BN statistics frozen ----


# ---- FlopCounterMode: 2·multiply-adds of the convolution (PyTorch's convention; the epilogue is not counted) ----

@register_flop_formula([torch.ops.pyops.conv2d_bias_act, torch.ops.pyops.conv2d_bias_act_packed,
                        torch.ops.pyops.conv2d_bn_relu])
def _conv2d_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)
