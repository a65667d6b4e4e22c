"""Pure-PyTorch references of every pyops op: the documented semantics, used by tests and benchmarks."""
import math

import torch


def smooth_max(x, beta=1.0, dim=-1, keepdim=False):
    """(1/β)·logsumexp(β·x) along dim; the max / min at β = ±inf."""
    if math.isinf(beta):
        return x.amax(dim, keepdim) if beta > 0 else x.amin(dim, keepdim)
    return torch.logsumexp(beta * x, dim, keepdim) / beta


def conv2d_bias_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                    residual=None):
    """act(F.conv2d(x, weight, bias) + residual), act ∈ {"none", "relu", "relu6"}."""
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return {"none": lambda t: t, "relu": torch.relu, "relu6": torch.nn.functional.relu6}[activation](y)


def conv2d_bn_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5, stride=1, padding=0,
                   dilation=1, groups=1, relu=True, residual=None):
    """relu(F.batch_norm(F.conv2d(x, weight, bias), eval mode) + residual): conv, BN and ReLU unfused."""
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = torch.nn.functional.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y
