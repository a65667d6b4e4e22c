"""1-D convolution with a backward of our own: grad_input is a transposed convolution (torch.ops.pyops.
conv1d_backward_input), grad_weight a correlation of grad_output with the input (torch.ops.pyops.
conv1d_backward_weight), grad_bias the sum of grad_output over batch and length. When a layer has a bias, autograd
asks for grad_weight and grad_bias together (torch.ops.pyops.conv1d_backward_weight_bias), so a kernel can take
both from one read of grad_output (the CUDA depthwise one does). Only the gradients that are needed are computed.
The backward ops are linear in each argument, so their own gradients are again pyops conv1d ops, and double
backward works. conv1d_bias_act is the same convolution with a residual added and a ReLU/ReLU6 applied as the
output is stored (the Conv1d → BatchNorm1d (→ add) → ReLU chains pyops.fuse folds). The autograd of the ops is C++
(csrc/ops/conv1d/conv1d_autograd.cpp: a Python autograd kernel costs more host time than a small layer's kernels);
this module adds argument handling, fake kernels and FLOP formulas.
"""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._checks import check_devices, check_floating, check_like, check_tensor, int_tuple
from ._overrides import overridable
from .activations import ACTIVATIONS

_ops = torch.ops.pyops


def _int_arg(value, name, minimum):
    # (the common cases first: nn.Conv1d's 1-tuples and plain ints, checked in a few hundred ns instead of a few µs)
    plain = value[0] if type(value) is tuple and len(value) == 1 else value
    if type(plain) is int and plain >= minimum:
        return plain
    return int_tuple(value, name, 1, minimum)[0]


def _check_tensors(x, weight, bias):
    check_floating(x, "input")
    check_floating(weight, "weight")
    if x.dim() not in (2, 3):
        raise ValueError(f"argument 'input' must be (N, C_in, L) or unbatched (C_in, L), got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"argument 'weight' must be 3-D (C_out, C_in / groups, K), got shape {tuple(weight.shape)}")
    check_like(weight, x, "weight", "input")
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"argument 'bias' must have shape ({weight.shape[0]},) (one per output channel), "
                             f"got {tuple(bias.shape)}")
        check_like(bias, x, "bias", "input")


def _check_geometry(in_channels, length, weight, stride, padding, dilation, groups):
    out_channels, per_group, k = weight.shape
    if in_channels == 0:  # (as the op refuses it: csrc/ops/conv1d/conv1d.cpp check_channels)
        raise ValueError("argument 'input' has 0 channels: a convolution needs at least one input channel")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"input channels ({in_channels}) and output channels ({out_channels}) must be divisible "
                         f"by 'groups' ({groups})")
    if in_channels // groups != per_group:
        raise ValueError(f"channel mismatch: 'input' has {in_channels} channels, so 'weight' must have "
                         f"{in_channels // groups} input channels per group (groups={groups}), got {per_group}")
    span = dilation * (k - 1) + 1
    if length + 2 * padding < span:
        raise ValueError(f"input length {length} (padded: {length + 2 * padding}) is shorter than the dilated "
                         f"filter span {span} (kernel_size={k}, dilation={dilation})")


@overridable
def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d computed by pyops' own kernels, forward and backward.

    Args:
        x: (N, C_in, L) or unbatched (C_in, L); float32/float64/float16/bfloat16 (the half types accumulate in
            float32: on the CPU they are upcast, on CUDA the kernels read them). Any strides.
        weight: (C_out, C_in / groups, K), same dtype and device.
        bias: (C_out,) or None.
        stride, dilation: int >= 1 (or a 1-tuple); groups: int >= 1.
        padding: int >= 0 (or a 1-tuple), 'valid' (0) or 'same' (output length L; stride must be 1; an odd
            total padding puts the extra zero on the right, as PyTorch does).
    Returns:
        (N, C_out, L_out) (or (C_out, L_out) for unbatched input), L_out = (L + 2·padding − dilation·(K−1) − 1)
        // stride + 1.
    Non-finite weights: the border outputs may differ from F.conv1d's (either side can make NaN of 0·inf with the
    zero padding, depending on the layer and the path); with finite values they agree.
    """
    return _conv1d(x, weight, bias, stride, padding, dilation, groups, 0)


@overridable
def conv1d_bias_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                    residual=None):
    """act(conv1d(x, weight, bias) + residual), the residual added and the activation applied as the output is
    stored (on the CPU; on CUDA in a second pass; activations other than ReLU and ReLU6 in a pass after the
    convolution on both):
    what pyops.fuse computes for a Conv1d → BatchNorm1d [→ add] [→ activation] chain.

    Args: as pyops.conv1d, and
        activation: "none", "relu", "relu6", "silu", "hardswish", "hardsigmoid" or "sigmoid" (pyops.activations;
            NaN stays NaN, as torch's activations keep it);
        residual: None, or a tensor of the output's shape ((N, C_out, L_out), or (C_out, L_out) for unbatched
            input), dtype and device (a 1-D ResNet block's shortcut).
    Returns: as pyops.conv1d. Gradients: those of F.relu(F.conv1d(...) + residual) (F.relu6's), from the saved
    output; the other activations' by ATen's autograd of torch's function after the op without them.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"argument 'activation' must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return _conv1d(x, weight, bias, stride, padding, dilation, groups, ACTIVATIONS[activation], residual)


def _conv1d(x, weight, bias, stride, padding, dilation, groups, activation, residual=None):
    """The argument handling both share; activation: the op's code (0 without a residual: the pyops::conv1d op)."""
    _check_tensors(x, weight, bias)
    if residual is not None:
        check_tensor(residual, "residual")
        check_like(residual, x, "residual", "input")
    stride = _int_arg(stride, "stride", 1)
    dilation = _int_arg(dilation, "dilation", 1)
    groups = _int_arg(groups, "groups", 1)
    if x.shape[-1] == 0:  # as F.conv1d: nothing to convolve, and no length for the backward to return
        raise ValueError("argument 'input' has length 0")
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
        residual = residual.unsqueeze(0) if residual is not None else None
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if stride != 1:
                raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
            total = dilation * (weight.shape[2] - 1)
            if total % 2:  # PyTorch's convention: the extra zero goes on the right
                x = F.pad(x, (0, 1))
            padding = total // 2
        else:
            raise ValueError(f"argument 'padding' must be an int, 'valid' or 'same', got {padding!r}")
    else:
        padding = _int_arg(padding, "padding", 0)
    _check_geometry(x.shape[1], x.shape[2], weight, stride, padding, dilation, groups)
    if residual is not None:
        shape = (x.shape[0], weight.shape[0], _out_length(x.shape[2], weight.shape[2], stride, padding, dilation))
        if tuple(residual.shape) != shape:
            raise ValueError(f"argument 'residual' must have the output's shape {shape[1 if unbatched else 0:]}, "
                             f"got {tuple(residual.shape)[1 if unbatched else 0:]}")
    if activation or residual is not None:
        out = _ops.conv1d_bias_act.default(x, weight, bias, stride, padding, dilation, groups, activation, residual)
    else:
        out = _ops.conv1d.default(x, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def _out_length(length, k, stride, padding, dilation):
    return (length + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@torch.library.register_fake("pyops::conv1d")
def _conv1d_fake(x, weight, bias, stride, padding, dilation, groups):
    check_devices(x, "input", weight=weight, bias=bias)
    torch._check(x.dim() == 3 and weight.dim() == 3, lambda: "pyops.conv1d: input and weight must be 3-D")
    torch._check(x.shape[1] == weight.shape[1] * groups, lambda: "pyops.conv1d: channel mismatch")
    length = _out_length(x.shape[2], weight.shape[2], stride, padding, dilation)
    torch._check(length >= 1, lambda: "pyops.conv1d: input shorter than the dilated filter span")
    return x.new_empty((x.shape[0], weight.shape[0], length))


@torch.library.register_fake("pyops::conv1d_bias_act")
def _conv1d_bias_act_fake(x, weight, bias, stride, padding, dilation, groups, activation, residual=None):
    torch._check(activation in ACTIVATIONS.values(), lambda: f"pyops.conv1d_bias_act: bad activation {activation}")
    out = _conv1d_fake(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        check_devices(x, "input", residual=residual)
        torch._check(residual.shape == out.shape, lambda: "pyops.conv1d_bias_act: 'residual' must have the output's "
                     "shape")
    return out


@torch.library.register_fake("pyops::conv1d_backward_input")
def _conv1d_backward_input_fake(grad_output, weight, input_length, stride, padding, dilation, groups):
    check_devices(grad_output, "grad_output", weight=weight)
    torch._check(grad_output.shape[2] == _out_length(input_length, weight.shape[2], stride, padding, dilation),
                 lambda: "pyops.conv1d_backward_input: grad_output length does not match input_length")
    return grad_output.new_empty((grad_output.shape[0], weight.shape[1] * groups, input_length))


@torch.library.register_fake("pyops::conv1d_backward_weight")
def _conv1d_backward_weight_fake(grad_output, x, kernel_size, stride, padding, dilation, groups):
    check_devices(x, "input", grad_output=grad_output)
    torch._check(grad_output.shape[2] == _out_length(x.shape[2], kernel_size, stride, padding, dilation),
                 lambda: "pyops.conv1d_backward_weight: grad_output length does not match the input's")
    return x.new_empty((grad_output.shape[1], x.shape[1] // groups, kernel_size))


@torch.library.register_fake("pyops::conv1d_backward_weight_bias")
def _conv1d_backward_weight_bias_fake(grad_output, x, kernel_size, stride, padding, dilation, groups):
    grad_weight = _conv1d_backward_weight_fake(grad_output, x, kernel_size, stride, padding, dilation, groups)
    return grad_weight, grad_output.new_empty((grad_output.shape[1],))


# FlopCounterMode: 2·MACs of the real (not zero-upsampled) products, the same count for all three ops.
def _conv_flops(batch, out_channels, out_length, in_per_group, kernel_size):
    return 2 * batch * out_channels * out_length * in_per_group * kernel_size


@register_flop_formula([_ops.conv1d, _ops.conv1d_bias_act])
def _conv1d_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
    return _conv_flops(x_shape[0], w_shape[0], out_shape[2], w_shape[1], w_shape[2])


@register_flop_formula(_ops.conv1d_backward_input)
def _conv1d_backward_input_flops(gy_shape, w_shape, *args, out_shape=None, **kwargs):
    return _conv_flops(gy_shape[0], w_shape[0], gy_shape[2], w_shape[1], w_shape[2])


@register_flop_formula(_ops.conv1d_backward_weight)
def _conv1d_backward_weight_flops(gy_shape, x_shape, *args, out_shape=None, **kwargs):
    return _conv_flops(gy_shape[0], gy_shape[1], gy_shape[2], out_shape[1], out_shape[2])


@register_flop_formula(_ops.conv1d_backward_weight_bias)
def _conv1d_backward_weight_bias_flops(gy_shape, x_shape, *args, out_shape=None, **kwargs):
    w_shape = out_shape[0]  # (grad_weight, grad_bias): the bias's sum is no multiply-add
    return _conv_flops(gy_shape[0], gy_shape[1], gy_shape[2], w_shape[1], w_shape[2])
