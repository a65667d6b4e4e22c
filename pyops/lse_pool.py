"""lse_pool2d: log-sum-exp pooling of a score map to image scores, built on pyops.smooth_max."""
import math

from ._checks import check_floating
from .smooth_max import smooth_max


def lse_pool2d(scores, beta):
    """(1/β)·log(mean over H×W of exp(β·s)) = smooth_max over the H·W positions − log(H·W)/β.

    The max as β → ∞ (β = inf gives it exactly), the mean as β → 0 (β = 0 gives it exactly), the min at β = −inf.
    Differentiable (the gradient is softmax(β·s) over the positions / the mean's 1/(H·W) at β = 0).

    Args:
        scores: (B, C, H, W) floating tensor with H·W > 0, e.g. the map of pyops.sliding_classify.
        beta: a number (not NaN).
    Returns:
        (B, C) in scores' dtype.
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
    return pooled if math.isinf(beta) else pooled - math.log(n) / beta
