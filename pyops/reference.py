"""Pure-PyTorch references of every pyops op: the documented semantics, used by tests and benchmarks."""
import math

import torch


def smooth_max(x, beta=1.0, dim=-1, keepdim=False):
    """(1/β)·logsumexp(β·x) along dim; the max / min at β = ±inf."""
    if math.isinf(beta):
        return x.amax(dim, keepdim) if beta > 0 else x.amin(dim, keepdim)
    return torch.logsumexp(beta * x, dim, keepdim) / beta


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d: the semantics pyops.conv1d implements (PyTorch's oneDNN/cuDNN path)."""
    return torch.nn.functional.conv1d(x, weight, bias, stride, padding, dilation, groups)


def toeplitz(w, length, padding=0):
    """A_w: the (L_out, length) matrix with (A_w y) = conv1d(y, w, padding=padding) for one channel,
    A_w[i, j] = w[j - i + padding] where 0 <= j - i + padding < K (PyTorch's conv1d is a correlation)."""
    k = w.shape[0]
    out_len = length + 2 * padding - k + 1
    i = torch.arange(out_len).unsqueeze(1)
    tap = torch.arange(length).unsqueeze(0) - i + padding
    inside = (tap >= 0) & (tap < k)
    return torch.where(inside, w[tap.clamp(0, k - 1)], torch.zeros((), dtype=w.dtype))


def conv_net_gradients(x, filters, biases, paddings, u):
    """Closed-form gradients of the homework's single-channel network (Problem 4) in explicit matrices.

    y_0 = x (length L), y_l = sigma(A_{w_l} y_{l-1} + b_l 1) for l < n, y_n = A_{w_n} y_{n-1} + b_n 1 (no sigma);
    the loss is u . y_n. With v_l = (d loss / d y_l) * sigma'(A_{w_l} y_{l-1} + b_l 1) (sigma' = 1 on the last
    layer): d loss / d w_l[k] = v_l . (A_{e_k} y_{l-1}) (the correlation of v_l with y_{l-1}), d loss / d b_l = v_l . 1,
    and v_l A_{w_l} carries the gradient to the layer below. Returns ([dw_l], [db_l], d loss / d x).
    """
    ys, zs, mats = [x], [], []
    for l, (w, b, p) in enumerate(zip(filters, biases, paddings)):
        a = toeplitz(w, ys[-1].shape[0], p)
        z = a @ ys[-1] + b
        mats.append(a)
        zs.append(z)
        ys.append(torch.sigmoid(z) if l < len(filters) - 1 else z)
    grad_w, grad_b = [None] * len(filters), [None] * len(filters)
    upstream = u
    for l in reversed(range(len(filters))):
        s = torch.sigmoid(zs[l])
        v = upstream * (s * (1 - s) if l < len(filters) - 1 else torch.ones_like(s))
        k = filters[l].shape[0]
        eye = torch.eye(k, dtype=x.dtype)
        grad_w[l] = torch.stack([v @ toeplitz(eye[t], ys[l].shape[0], paddings[l]) @ ys[l] for t in range(k)])
        grad_b[l] = v.sum()
        upstream = v @ mats[l]
    return grad_w, grad_b, upstream


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
