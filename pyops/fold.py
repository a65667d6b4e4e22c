"""Exact BatchNorm folding: a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear followed by an eval-mode BatchNorm
becomes one layer.

In eval mode BatchNorm is the per-channel affine map y = (z − μ)·γ/√(σ²+ε) + β, so for z = W·x + b:
    W' = W·s (s = γ/√(σ²+ε), per output channel),   b' = (b − μ)·s + β.
"""
import sys

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE_LAYERS = CONV_LAYERS + CONV_TRANSPOSE_LAYERS + (nn.Linear,)
# The old-style reparametrizations whose forward pre-hook recomputes layer.weight (read by current_weight).
WEIGHT_REPARAMETRIZATIONS = (WeightNorm, SpectralNorm)


def frozen_batchnorm_class():
    """torchvision.ops.misc.FrozenBatchNorm2d if torchvision is already imported, else None.

    (If torchvision was never imported, no FrozenBatchNorm2d can exist: we never import it ourselves.)"""
    misc = sys.modules.get("torchvision.ops.misc")
    return getattr(misc, "FrozenBatchNorm2d", None)


def is_batchnorm(module):
    """True for the norms fold_bn accepts: BatchNorm1d/2d/3d, SyncBatchNorm, torchvision's FrozenBatchNorm2d."""
    frozen = frozen_batchnorm_class()
    return isinstance(module, _BatchNorm) or (frozen is not None and isinstance(module, frozen))


def is_foldable_batchnorm(module):
    """is_batchnorm with running statistics: one built with track_running_stats=False normalizes with each batch's
    own statistics even in eval mode, which no fixed weights reproduce."""
    return is_batchnorm(module) and getattr(module, "running_mean", None) is not None


def batchnorm_affine(bn):
    """(scale, shift), float64 tensors of shape (C,): bn(z) = z·scale + shift per channel, for an eval-mode bn.

    ValueError if bn would use batch statistics (training mode, or track_running_stats=False)."""
    if not is_batchnorm(bn):
        raise TypeError(f"argument 'bn' must be a BatchNorm1d/2d/3d, SyncBatchNorm or torchvision FrozenBatchNorm2d, "
                        f"got {type(bn).__name__}")
    if isinstance(bn, _BatchNorm):
        if bn.training:
            raise ValueError("argument 'bn' is in training mode (it normalizes with batch statistics, which cannot be "
                             "folded): call bn.eval() first")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("argument 'bn' has no running statistics (track_running_stats=False): it always "
                             "normalizes with batch statistics, which cannot be folded")
    with torch.no_grad():
        mean, var = bn.running_mean.double(), bn.running_var.double()
        inv_std = torch.rsqrt(var + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)  # affine=False: γ=1, β=0
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma * inv_std
        return scale, beta - mean * scale


def out_channels(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def current_weight(layer):
    """layer's weight as its forward computes with it. The old-style torch.nn.utils.weight_norm and spectral_norm
    recompute `layer.weight` from their own parameters in a forward pre-hook, so the attribute holds the weight of
    the last forward (spectral_norm's is not yet normalized before the first): compute it as the hook would, without
    its side effects (no power iteration, which only training-mode forwards run)."""
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return hook.compute_weight(layer)
        if isinstance(hook, SpectralNorm) and hook.name == "weight":
            return hook.compute_weight(layer, do_power_iteration=False)
    return layer.weight


def normalizes_channels_of(bn, layer):
    """Whether bn normalizes the channel dimension of layer's (batched) output: a BatchNorm of that rank
    (BatchNorm1d after Linear/Conv1d, BatchNorm2d or FrozenBatchNorm2d after Conv2d, BatchNorm3d after Conv3d; the
    same after the ConvTranspose layers) or a SyncBatchNorm (any rank). Another one normalizes another dimension
    where the model runs at all: a BatchNorm1d takes an unbatched Conv2d's (C, H, W) output as (N, C', L), a
    FrozenBatchNorm2d broadcasts a Linear's output."""
    if isinstance(bn, nn.SyncBatchNorm):
        return True
    if isinstance(layer, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
        return isinstance(bn, nn.BatchNorm1d)
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        frozen = frozen_batchnorm_class()
        return isinstance(bn, nn.BatchNorm2d) or (frozen is not None and isinstance(bn, frozen))
    return isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)) and isinstance(bn, nn.BatchNorm3d)


def check_foldable_layer(layer):
    """TypeError unless layer is one of FOLDABLE_LAYERS."""
    if not isinstance(layer, FOLDABLE_LAYERS):
        raise TypeError(f"argument 'layer' must be an nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or nn.Linear, "
                        f"got {type(layer).__name__}")


def fold_bn(layer, bn):
    """A new layer computing bn(layer(x)) exactly (up to rounding) for an eval-mode BatchNorm `bn`.

    layer: nn.Conv1d / nn.Conv2d / nn.Conv3d (any stride, padding, padding_mode, dilation, groups),
        nn.ConvTranspose1d / 2d / 3d (also output_padding; a decoder's or a GAN generator's upsampling layers) or
        nn.Linear.
    bn: nn.BatchNorm1d/2d/3d or nn.SyncBatchNorm in eval mode with running statistics (affine or not), or
        torchvision.ops.misc.FrozenBatchNorm2d; bn's channel count must equal the layer's output channels.
    Returns a fresh module of the layer's base class (nn.Conv2d, nn.Linear, ...) with the same hyper-parameters,
    weight W·s and bias (b − μ)·s + β (a Parameter even where layer.bias is None), s = γ/√(σ²+ε). For a
    Linear the equality holds on (N, features) inputs, where BatchNorm1d normalizes the Linear's features (on a
    3-D input it would normalize dim 1 instead); for a Conv1d on batched (N, C, L) inputs (on an unbatched (C, L)
    output BatchNorm1d would take C as the batch and normalize L). A weight under the old-style
    torch.nn.utils.weight_norm/spectral_norm is folded as the layer's forward computes it (current_weight); the
    result is a plain layer without those hooks.
    The arithmetic runs in float64 and is rounded once to the layer's dtypes (fp16/bf16 weights included); the weight
    keeps its memory layout (e.g. channels_last) and device; the training flag is kept, and each folded Parameter
    requires grad where one of the values it is made of does (the weight: W or γ; the bias: b, γ or β).
    Neither argument is modified.
    ValueError: bn in training mode, bn without running statistics, channel counts that differ, or a BatchNorm of
        another rank than the layer's output (normalizes_channels_of).
    TypeError: an unsupported layer or norm type.
    """
    check_foldable_layer(layer)
    scale, shift = batchnorm_affine(bn)
    if scale.numel() != out_channels(layer):
        raise ValueError(f"argument 'bn' has {scale.numel()} channels but argument 'layer' has "
                         f"{out_channels(layer)} output channels")
    if not normalizes_channels_of(bn, layer):  # (unfused, the pair raises on the rank, or normalizes another dim)
        raise ValueError(f"argument 'bn' is a {type(bn).__name__}, which does not normalize the channels of a "
                         f"{type(layer).__name__}'s output (BatchNorm1d after Linear/Conv1d, BatchNorm2d or "
                         "FrozenBatchNorm2d after Conv2d, BatchNorm3d after Conv3d, or SyncBatchNorm)")
    weight, bias = current_weight(layer), layer.bias
    with torch.no_grad():
        scale, shift = scale.to(weight.device), shift.to(weight.device)
        new_weight = torch.empty_like(weight)  # same dtype, device and strides (channels_last stays channels_last)
        new_weight.copy_(scaled_per_output_channel(layer, weight.double(), scale))
        old_bias = bias.double() if bias is not None else torch.zeros_like(scale)
        new_bias = (old_bias * scale + shift).to(bias.dtype if bias is not None else weight.dtype)

    # Trainable where a value it is made of was: W' = W·s of W and γ, b' = (b − μ)·s + β of b, γ and β. A frozen
    # backbone stays frozen (a bias-free conv's folded bias was always trainable), a trainable BN after a frozen conv
    # stays trainable (its γ, β were dropped).
    trainable = [t is not None and t.requires_grad for t in (weight, bias, bn.weight, bn.bias)]
    folded = empty_like_layer(layer)
    folded.weight = nn.Parameter(new_weight, requires_grad=trainable[0] or trainable[2])
    folded.bias = nn.Parameter(new_bias, requires_grad=any(trainable[1:]))
    return folded.train(layer.training)


def with_bias(layer):
    """A fresh layer of layer's base class (hyper-parameters, training flag) computing what layer computes, with a
    bias: it shares layer's weight and bias Parameters (an optimizer over layer's parameters trains it), and where
    layer has no bias it gets a zero one that does not require grad (the layer had nothing to train there). What
    pyops.fuse builds a fused module from where no BatchNorm follows the layer (a Conv2d → ReLU); layer is not
    modified. ValueError where layer computes its weight or bias (a parametrization, weight_norm): it has no
    Parameter to share."""
    check_foldable_layer(layer)
    if not has_own_parameters(layer):
        raise ValueError("argument 'layer' computes its weight or bias (a parametrization or hook: weight_norm, "
                         "spectral_norm), so it has no Parameter to share")
    shared = empty_like_layer(layer)
    shared.weight = layer.weight
    shared.bias = layer.bias if layer.bias is not None else \
        nn.Parameter(layer.weight.new_zeros(out_channels(layer)), requires_grad=False)
    return shared.train(layer.training)


def has_own_parameters(layer):
    """Whether layer's weight and bias (where it has one) are its Parameters, not computed by a parametrization or
    a weight_norm/spectral_norm hook."""
    params = dict(layer.named_parameters(recurse=False))
    return all(isinstance(t, nn.Parameter) and params.get(name) is t
               for name, t in (("weight", layer.weight), ("bias", layer.bias)) if t is not None)


def scaled_per_output_channel(layer, weight, scale):
    """weight · scale with scale (C_out,) applied along the layer's output channels: dim 0 of a conv's or Linear's
    (C_out, C_in/groups, *k) weight; for a ConvTranspose's (C_in, C_out/groups, *k) weight, output channel
    g·(C_out/groups) + j is column j of group g's rows."""
    taps = (1,) * (weight.dim() - 2)
    if isinstance(layer, CONV_TRANSPOSE_LAYERS):
        groups = layer.groups
        grouped = weight.unflatten(0, (groups, -1)) * scale.view(groups, 1, -1, *taps)
        return grouped.flatten(0, 1)
    return weight * scale.view(-1, 1, *taps)


def empty_like_layer(layer):
    """A module of layer's base class with layer's hyper-parameters and a bias, its parameters on the meta device
    (no memory, no initialization: the caller installs them)."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=True, device="meta")
    base = next(cls for cls in CONV_LAYERS + CONV_TRANSPOSE_LAYERS if isinstance(layer, cls))
    transposed = {"output_padding": layer.output_padding} if isinstance(layer, CONV_TRANSPOSE_LAYERS) else {}
    return base(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, bias=True, padding_mode=layer.padding_mode,
                device="meta", **transposed)
