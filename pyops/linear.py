"""A Linear with its bias and activation fused: act(x @ weight.T + bias), the op behind pyops.nn.LinearBNReLU.

    linear_bias_act(x, W, b) = act(x @ Wᵀ + b),  act one of pyops.activations.ACTIVATIONS

CPU, float32: a small batch (at most 8 rows, or up to 2^23 multiply-adds and 64 outputs per input) with at least 16
inputs a row (64 at least, 128 from 8 rows), and any product of at most 1024 outputs, runs our kernel, which streams
each weight row once through registers while it meets every row of x: such a product is bound by the weight's
bytes, which the kernel reads at 50-90 GB/s where MKL's GEMM and GEMV read 17-30 (on AMD CPUs with AVX-512 MKL runs
AVX2 code; vgg's 25088→4096 layer at batch 1: 9.5 vs 14.4 ms for F.linear + ReLU). Each of its outputs ends in a
horizontal sum, which short reductions do not amortize. The other products run the library's: oneDNN's inner
product where MKL runs narrower than it (2.3x F.linear on the Zen 5 VM for the homework's 16384→1024 at batch 100:
8.5 vs 19.3 ms), but MKL's GEMM on products too small for oneDNN's ~12 µs a call (rules and measurements:
csrc/ops/conv_bn_relu/linear_cpu.cpp). The activation (and our kernel's bias) follow in one pass over the output; a
NaN stays NaN, as torch.relu keeps it. PYOPS_CONV_PATH=direct forces our kernel, =library the library's
(bench/NOTES-conv_bn_relu.md, stops 42-43). Other dtypes and devices: ATen's linear and the activation in place.
Autograd: dx = g·W, dW = gᵀ·x, db = Σ g with g = grad·act'(y).
"""
import torch
from torch.utils.flop_counter import register_flop_formula

from ._checks import check_floating, check_like
from ._overrides import overridable
from .activations import ACTIVATIONS
from .conv_bn_relu import unchecked_call


def _check_args(x, weight, bias, activation):
    check_floating(x, "x")
    check_floating(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"argument 'weight' must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    check_like(weight, x, "weight", "x")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"argument 'x' of shape {tuple(x.shape)} must end in weight's {weight.shape[1]} input "
                         "features: (*, in_features)")
    if bias is not None:
        check_floating(bias, "bias")
        check_like(bias, x, "bias", "x")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"argument 'bias' must have shape ({weight.shape[0]},) (one value per output feature), "
                             f"got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"argument 'activation' must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


@overridable
def linear_bias_act(x, weight, bias=None, activation="relu"):
    """act(x @ weight.T + bias), the output written once.

    Args:
        x: (*, in_features), float32/float64 (+ float16/bfloat16), any strides.
        weight: (out_features, in_features), x's dtype and device (typically a BatchNorm1d folded in).
        bias: (out_features,) or None.
        activation: "none", "relu", "relu6", "silu", "hardswish", "hardsigmoid" or "sigmoid" (pyops.activations).
    Returns:
        (*, out_features) in x's dtype (in a torch.autocast region, the dtype the fused convolutions compute in:
        README, "Mixed precision"), contiguous.
    """
    if type(activation) is str and activation in ACTIVATIONS:
        out = unchecked_call(torch.ops.pyops.linear_bias_act.default, x, weight, bias, ACTIVATIONS[activation])
        if out is not None:
            return out
    _check_args(x, weight, bias, activation)
    return torch.ops.pyops.linear_bias_act.default(x, weight, bias, ACTIVATIONS[activation])


@torch.library.register_fake("pyops::linear_bias_act")
def _linear_bias_act_fake(x, weight, bias, activation):
    torch._check(activation in ACTIVATIONS.values(),
                 lambda: f"argument 'activation' must be one of {sorted(ACTIVATIONS.values())}, got {activation}")
    _check_args(x, weight, bias, "none")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# FlopCounterMode: 2·multiply-adds of the product (PyTorch's convention for addmm; the epilogue is not counted).
@register_flop_formula(torch.ops.pyops.linear_bias_act)
def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * w_shape[0] * w_shape[1]
