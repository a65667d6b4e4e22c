"""lse_pool2d: log-sum-exp pooling of a score map to image scores, built on pyops.smooth_max."""
import math

import torch

from ._checks import check_floating
from ._overrides import overridable
from .smooth_max import smooth_max


@overridable
def lse_pool2d(scores, beta):
    """(1/β)·log(mean over H×W of exp(β·s)) = smooth_max over the H·W positions − log(H·W)/β.

    The max as β → ∞ (β = inf gives it exactly), the mean as β → 0 (β = 0 gives it exactly), the min at β = −inf.
    Differentiable (the gradient is softmax(β·s) over the positions / the mean's 1/(H·W) at β = 0). Accurate to the
    dtype's rounding at every β, tiny ones included (see the comment in the code: float32 at β = 1e-3 had an error
    of 3e-4 with the plain formula).

    Args:
        scores: (B, C, H, W) floating tensor with H·W > 0, e.g. the map of pyops.sliding_classify.
        beta: a number (not NaN).
    Returns:
        (B, C) in scores' dtype (float32 in a torch.autocast region, as smooth_max).
    """
    check_floating(scores, "scores")
    if scores.dim() != 4:
        raise ValueError(f"argument 'scores' must have 4 dimensions (B, C, H, W), got shape {tuple(scores.shape)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"argument 'beta' must be a number, got {type(beta).__name__}")
    if math.isnan(beta):
        raise ValueError("argument 'beta' must not be NaN")
    n = scores.shape[2] * scores.shape[3]
    if n == 0:
        raise ValueError(f"argument 'scores' has an empty {scores.shape[2]}x{scores.shape[3]} map: nothing to pool")
    flat = scores.flatten(2)
    if beta == 0:
        return flat.mean(-1)
    pooled = smooth_max(flat, float(beta), -1)
    if math.isinf(beta):
        return pooled
    # smooth_max − log(n)/β cancels where |β|·spread is small: both terms are ~log(n)/|β| and the result is near the
    # mean, so the error grows like eps/|β| (float32 at β = 1e-3: 3e-4, at 1e-5: 0.04). There the same value is
    # m + log1p(mean(expm1(β·(s − m))))/β with m the max (the min for β < 0), accurate to ~eps·spread; where
    # |β|·spread > 1 the first form's error, eps/|β|, is below eps·spread too. Each row takes the accurate one.
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    low, high = work.amin(-1), work.amax(-1)
    anchor = high if beta > 0 else low
    near_mean = anchor + torch.log1p(torch.expm1(beta * (work - anchor.unsqueeze(-1))).mean(-1)) / beta
    return torch.where((high - low) * abs(beta) <= 1, near_mean.to(pooled.dtype), pooled - math.log(n) / beta)
