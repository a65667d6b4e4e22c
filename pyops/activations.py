"""The activations pyops' fused ops apply to their output, in one table: their names, the codes the ops' schemas
take ("int activation": csrc/common/activation.h), torch's function computing each (the references, and the pass
after the op where the kernels do not fuse one) and the torch.nn modules fuse() folds into a layer.

    none         y
    relu         max(y, 0)
    relu6        min(max(y, 0), 6)
    silu         y·σ(y)                 (EfficientNet's)
    hardswish    y·relu6(y + 3)/6       (MobileNetV3's)
    hardsigmoid  relu6(y + 3)/6         (the gate of MobileNetV3's squeeze-excitation blocks)
    sigmoid      σ(y) = 1/(1 + e^-y)    (the gate of EfficientNet's)

NaN stays NaN through each, as through torch's functions.
"""
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4, "hardsigmoid": 5, "sigmoid": 6}


def _identity(y):
    return y


# torch's function for each (a new tensor)
FUNCTIONS = {"none": _identity, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish,
             "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid}

# the torch.nn modules computing them (fuse() folds an instance into the layer before it)
MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
           nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid"}


# each applied in place (autograd differentiates these in-place ops on a fresh result; clamp_ keeps NaN, as relu6 does)
IN_PLACE = {"none": _identity, "relu": torch.relu_, "relu6": lambda y: y.clamp_(0.0, 6.0),
            "silu": lambda y: F.silu(y, inplace=True), "hardswish": lambda y: F.hardswish(y, inplace=True),
            "hardsigmoid": lambda y: F.hardsigmoid(y, inplace=True), "sigmoid": torch.sigmoid_}
