"""pyops::sliding_head: the converted head of a sliding-window classifier as one op.

A large-kernel conv (the classifier's first Linear, reshaped to the feature map's size) followed by 1×1 convs (the
later Linears), each with its bias and an optional ReLU. The GEMMs run in the vendor library (MKL/oneDNN, cuBLAS);
the im2col into the first GEMM and the bias+ReLU epilogues (the last writing NCHW) are pyops kernels. Inference
only: with grad mode on, an argument that requires grad raises NotImplementedError naming it (the op has no
backward; FullyConvolutional runs its plain modules instead when gradients are wanted). See
csrc/ops/sliding_head/sliding_head.h for the algorithm.

float16/bfloat16 features: each layer's GEMM (accumulated in float32 by the library) is rounded to the half type
before its bias is added, as a half-precision matmul followed by `+ bias` rounds twice: within an ulp or two of the
half type except where the bias cancels most of the product (a random 16-channel 5×5 head: 4 % of the outputs more
than 2 ulps off, the worst 86 ulps in float16, 168 in bfloat16). Use float32 features where that matters.
"""
import numbers

import torch
from torch.utils.flop_counter import register_flop_formula

from ._checks import check_floating, check_like
from ._overrides import overridable

PRECISIONS = ("fp32", "tf32", "bf16")
DEFAULT_WORKSPACE = 256 << 20


def _check_args(features, weights, biases, relu):
    check_floating(features, "features")
    if features.dim() != 4:
        raise ValueError(f"argument 'features' must have 4 dimensions (B, C, H, W), got shape {tuple(features.shape)}")
    if len(weights) == 0:
        raise ValueError("argument 'weights' must hold at least one layer")
    if len(biases) != len(weights) or len(relu) != len(weights):
        raise ValueError(f"arguments 'weights', 'biases' and 'relu' must have one entry per layer, got "
                         f"{len(weights)}, {len(biases)} and {len(relu)}")
    cin = features.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 4:
            raise ValueError(f"argument 'weights[{i}]' must be a 4-d conv weight (out, in, kh, kw), got shape "
                             f"{tuple(w.shape)}")
        if w.numel() == 0:
            raise ValueError(f"argument 'weights[{i}]' has no elements (shape {tuple(w.shape)}): every layer needs "
                             "input and output channels and a non-empty kernel")
        if w.shape[1] != cin:
            src = "'features' has" if i == 0 else "the previous layer gives"
            raise ValueError(f"argument 'weights[{i}]' expects {w.shape[1]} input channels but {src} {cin}")
        if i > 0 and w.shape[2:] != (1, 1):
            raise ValueError(f"argument 'weights[{i}]' must be a 1x1 kernel (only the first layer has a spatial "
                             f"kernel), got shape {tuple(w.shape)}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"argument 'biases[{i}]' must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        check_like(w, features, f"weights[{i}]", "features")
        check_like(b, features, f"biases[{i}]", "features")
        cin = w.shape[0]
    kh, kw = weights[0].shape[2:]
    if kh > features.shape[2] or kw > features.shape[3]:
        raise ValueError(f"argument 'features' has a {features.shape[2]}x{features.shape[3]} map, smaller than the "
                         f"{kh}x{kw} kernel of 'weights[0]'")


@overridable
def sliding_head(features, weights, biases=None, relu=None, precision="fp32", workspace_bytes=DEFAULT_WORKSPACE):
    """The head conv(weights[0]) → 1×1 convs, each + bias and ReLU where relu[i], as one op.

    Args:
        features: (B, C, H, W) float32/float64 (float16/bfloat16 too), any strides.
        weights: list of conv weights, weights[0] (N0, C, kh, kw), weights[i] (Ni, N(i-1), 1, 1).
        biases: list of (Ni,) tensors or None entries (None: no bias anywhere).
        relu: list of bools, ReLU after layer i (default: after every layer but the last).
        precision: "fp32" exact (no TF32 whatever the global flags), "tf32" (CUDA TF32 GEMMs), "bf16" (bf16
            operands, fp32 accumulation in the GEMMs, activations rounded to bf16; the result in features' dtype).
        workspace_bytes: bound on the op's im2col and activation buffers (positions are tiled to fit).
    Returns:
        (B, N_last, H − kh + 1, W − kw + 1) in features' dtype (in a torch.autocast region: the region's dtype on
        CUDA and on a CPU computing it natively, else float32, as for the other pyops ops: README, "Mixed
        precision").
    Raises:
        ValueError/TypeError for bad arguments; NotImplementedError where autograd would have to record the call
        (grad mode on and an argument requiring grad, e.g. nn.Parameters: use torch.no_grad()).
    """
    weights = list(weights)
    if biases is None:
        biases = [None] * len(weights)
    biases = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
              for w, b in zip(weights, biases)]
    if relu is None:
        relu = [i + 1 < len(weights) for i in range(len(weights))]
    elif not isinstance(relu, (list, tuple)) or not all(isinstance(r, (bool, numbers.Integral)) for r in relu):
        # (bool() would take any object: relu=["no"] meant a ReLU)
        raise TypeError(f"argument 'relu' must be a list of bools, got {relu!r}")
    relu = [bool(r) for r in relu]
    if precision not in PRECISIONS:
        raise ValueError(f"argument 'precision' must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes <= 0:
        raise ValueError(f"argument 'workspace_bytes' must be a positive int, got {workspace_bytes!r}")
    check_floating(features, "features")
    out_dtype = features.dtype
    if precision == "bf16":  # every operand in bf16 (a no-op for those already cast, e.g. by FullyConvolutional)
        features = features.to(torch.bfloat16)
        weights = [w.to(torch.bfloat16) for w in weights]
        biases = [b.to(torch.bfloat16) for b in biases]
    _check_args(features, weights, biases, relu)
    out = torch.ops.pyops.sliding_head.default(features, weights, biases, [int(r) for r in relu],
                                               precision == "tf32", workspace_bytes)
    return out.to(out_dtype) if precision == "bf16" else out  # (in an autocast region: the dtype it computed in)


@torch.library.register_fake("pyops::sliding_head")
def _sliding_head_fake(features, weights, biases, relu, allow_tf32=False, workspace_bytes=DEFAULT_WORKSPACE):
    _check_args(features, weights, biases, relu)
    torch._check(workspace_bytes > 0, lambda: "argument 'workspace_bytes' must be positive")
    B, _, H, W = features.shape
    kh, kw = weights[0].shape[2:]
    return features.new_empty((B, weights[-1].shape[0], H - kh + 1, W - kw + 1))


@register_flop_formula(torch.ops.pyops.sliding_head)
def _sliding_head_flops(features_shape, weights_shapes, *args, out_shape=None, **kwargs):
    """2 · multiply-adds: every output position runs each layer's (out × in·kh·kw) matrix once."""
    B, _, H, W = features_shape
    kh, kw = weights_shapes[0][2:]
    positions = B * (H - kh + 1) * (W - kw + 1)
    macs = sum(w[0] * w[1] * w[2] * w[3] for w in weights_shapes)
    return 2 * positions * macs
