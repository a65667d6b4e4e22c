"""Pure-PyTorch references of every pyops op: the documented semantics, used by tests and benchmarks."""
import math

import torch

from .activations import FUNCTIONS


def smooth_max(x, beta=1.0, dim=-1, keepdim=False):
    """(1/β)·logsumexp(β·x) along dim; the max / min at β = ±inf."""
    if math.isinf(beta):
        return x.amax(dim, keepdim) if beta > 0 else x.amin(dim, keepdim)
    return torch.logsumexp(beta * x, dim, keepdim) / beta


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d: the semantics pyops.conv1d implements (PyTorch's oneDNN/cuDNN path)."""
    return torch.nn.functional.conv1d(x, weight, bias, stride, padding, dilation, groups)


def conv1d_bias_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                    residual=None):
    """act(F.conv1d(x, weight, bias) + residual), act a name in pyops.activations.ACTIVATIONS."""
    return _add_activate(torch.nn.functional.conv1d(x, weight, bias, stride, padding, dilation, groups), residual,
                         activation)


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
    """act(F.conv2d(x, weight, bias) + residual), act a name in pyops.activations.ACTIVATIONS."""
    return _add_activate(torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups), residual,
                         activation)


def linear_bias_act(x, weight, bias=None, activation="relu"):
    """act(F.linear(x, weight, bias)), act a name in pyops.activations.ACTIVATIONS."""
    return _add_activate(torch.nn.functional.linear(x, weight, bias), None, activation)


def _add_activate(y, residual, activation):
    """act(y + residual) (residual may be None), act a name in pyops.activations.ACTIVATIONS (torch's function)."""
    if residual is not None:
        y = y + residual
    return FUNCTIONS[activation](y)


def conv2d_bn_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5, stride=1, padding=0,
                   dilation=1, groups=1, relu=True, residual=None):
    """relu(F.batch_norm(F.conv2d(x, weight, bias), eval mode) + residual): conv, BN and ReLU unfused."""
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = torch.nn.functional.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# ---------------------------------------------------------------------------------------------------------------
# Problem 5: sliding-window classification (pyops.sliding, pyops.sliding_head, pyops.lse_pool2d).

class HomeworkNet1(torch.nn.Module):
    """The homework's crop classifier Net1, written as a user would (flatten through `view`).

    features: Conv(3→c0, k7), ReLU, Conv(c0→c1, k3), ReLU, Conv(c1→c2, k3), ReLU, Conv(c2→c3, k3), ReLU,
    Conv(c3→c4, k3); a 32×32 crop gives a (c4, 18, 18) map. classifier: Linear(c4·18·18→hidden), ReLU,
    Linear(hidden→hidden), ReLU, Linear(hidden→classes). Input (B, 3, 32, 32) → (B, classes).
    """

    def __init__(self, channels=(64, 192, 384, 256, 256), hidden=4096, classes=10, window=32):
        super().__init__()
        nn = torch.nn
        layers, cin = [], 3
        for i, (c, k) in enumerate(zip(channels, (7, 3, 3, 3, 3))):
            layers += [nn.Conv2d(cin, c, k)] + ([nn.ReLU()] if i < len(channels) - 1 else [])
            cin = c
        self.features = nn.Sequential(*layers)
        side = window - 6 - 2 * 4
        self.classifier = nn.Sequential(nn.Linear(cin * side * side, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                        nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def homework_net1(small=False, dtype=torch.float32, seed=0):
    """Net1 with random weights (eval mode). small=True: the same layer structure with channels 8-12-16-16-16 and
    64 hidden units (the full one holds 340M weights in its first Linear: 1.36 GB in fp32)."""
    torch.manual_seed(seed)
    net = HomeworkNet1(channels=(8, 12, 16, 16, 16), hidden=64) if small else HomeworkNet1()
    return net.to(dtype).eval()


def homework_net2(net1):
    """The homework's hand-written Net2: Net1's features, then its Linears as plain nn.Conv2d layers (the first with
    an 18×18 kernel, the others 1×1), weights reshaped. Input (B, 3, H, W) → (B, classes, H − 31, W − 31)."""
    nn = torch.nn
    fc1, fc2, fc3 = (m for m in net1.classifier if isinstance(m, nn.Linear))
    c = net1.features[-1].out_channels
    side = int(round((fc1.in_features // c) ** 0.5))
    convs = [nn.Conv2d(c, fc1.out_features, side), nn.Conv2d(fc2.in_features, fc2.out_features, 1),
             nn.Conv2d(fc3.in_features, fc3.out_features, 1)]
    for conv, fc in zip(convs, (fc1, fc2, fc3)):
        conv.to(device=fc.weight.device, dtype=fc.weight.dtype)  # where net1 lives
        with torch.no_grad():
            conv.weight.copy_(fc.weight.view(conv.weight.shape))
            conv.bias.copy_(fc.bias)
    return nn.Sequential(net1.features, convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2]).eval()


def crop_loop(model, images, window, stride=1):
    """The per-crop loop a user would write: model on each h×w crop at offsets 0, s, 2s, …, one crop at a time.
    images (B, C, H, W) → (B, classes, ⌊(H−h)/s⌋+1, ⌊(W−w)/s⌋+1)."""
    (h, w), (sy, sx) = _pair(window), _pair(stride)
    H, W = images.shape[-2:]
    rows = []
    with torch.no_grad():
        for y in range(0, H - h + 1, sy):
            rows.append(torch.stack([model(images[:, :, y:y + h, x:x + w]) for x in range(0, W - w + 1, sx)], -1))
    return torch.stack(rows, -2)


def crop_batch(model, images, window, stride=1):
    """All crops in one batched call (unfold): the loop without its per-call overhead, at the memory cost of every
    crop at once. Same result layout as crop_loop."""
    (h, w), (sy, sx) = _pair(window), _pair(stride)
    B, C = images.shape[:2]
    crops = images.unfold(2, h, sy).unfold(3, w, sx)  # (B, C, ny, nx, h, w)
    ny, nx = crops.shape[2:4]
    with torch.no_grad():
        scores = model(crops.permute(0, 2, 3, 1, 4, 5).reshape(B * ny * nx, C, h, w))
    return scores.view(B, ny, nx, -1).permute(0, 3, 1, 2)


def sliding_head(features, weights, biases, relu):
    """The converted head as plain convolutions: conv(weights[0]) then 1×1 convs, each + bias, ReLU where relu[i]."""
    x = features
    for w, b, r in zip(weights, biases, relu):
        x = torch.nn.functional.conv2d(x, w, b)
        if r:
            x = torch.relu(x)
    return x


def lse_pool2d(scores, beta):
    """(1/β)·log(mean over H×W of exp(β·s)); the mean at β = 0, the max / min at β = ±inf. (B, C, H, W) → (B, C)."""
    flat = scores.flatten(2)
    if beta == 0:
        return flat.mean(-1)
    if math.isinf(beta):
        return flat.amax(-1) if beta > 0 else flat.amin(-1)
    return (torch.logsumexp(beta * flat, -1) - math.log(flat.shape[-1])) / beta


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
