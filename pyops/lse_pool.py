"""lse_pool2d: log-sum-exp pooling of a score map to image scores, built on pyops.smooth_max."""
import math
import numbers

import torch

from ._checks import check_floating, check_number, in_autocast_region
from ._overrides import overridable
from .smooth_max import smooth_max


@overridable
def lse_pool2d(scores, beta):
    """(1/β)·log(mean over H×W of exp(β·s)) = smooth_max over the H·W positions − log(H·W)/β.

    The max as β → ∞ (β = inf gives it exactly), the mean as β → 0 (β = 0 gives it exactly), the min at β = −inf.
    Differentiable (the gradient is softmax(β·s) over the positions / the mean's 1/(H·W) at β = 0). Accurate at
    every β, tiny ones included, to about the dtype's rounding of the scores' spread (eps·(max − min): float32
    scores spread over 1e4 are within ~100 ulps of the result at β = 1e-20; see the comment in the code: float32 at
    β = 1e-3 had an error of 3e-4 with the plain formula).

    Args:
        scores: (B, C, H, W) floating tensor with H·W > 0, e.g. the map of pyops.sliding_classify.
        beta: a number (not NaN).
    Returns:
        (B, C) in scores' dtype (float32 in a torch.autocast region, as smooth_max).
    """
    check_floating(scores, "scores")
    if scores.dim() != 4:
        raise ValueError(f"argument 'scores' must have 4 dimensions (B, C, H, W), got shape {tuple(scores.shape)}")
    check_number(beta, "beta")
    if isinstance(beta, numbers.Real):
        beta = float(beta)  # (a numpy scalar as a Python float)
    if beta != beta:  # (NaN; written to trace as a guard under torch.compile, as in smooth_max)
        raise ValueError("argument 'beta' must not be NaN")
    n = scores.shape[2] * scores.shape[3]
    if n == 0:
        raise ValueError(f"argument 'scores' has an empty {scores.shape[2]}x{scores.shape[3]} map: nothing to pool")
    flat = scores.flatten(2)
    # Half-precision scores are pooled in float32 and rounded once at the end: rounding the smooth max first and
    # then subtracting log(n)/β lost ~log(n)·eps (bfloat16 128x128 at β = 1.01: 11 ulps).
    half = flat.dtype not in (torch.float32, torch.float64)
    out_dtype = torch.float32 if half and in_autocast_region(flat.device) else flat.dtype  # (as smooth_max's)
    work = flat.float() if half else flat
    if abs(beta) < torch.finfo(torch.float64).tiny:
        # β = 0, or below float64's normal numbers: the β → 0 limit, the mean (its error, |β|·var/2, is below
        # float64's rounding for any spread under ~1e150)
        return work.mean(-1).to(out_dtype)
    if abs(beta) < torch.finfo(work.dtype).tiny:
        # β below the dtype's normal numbers rounds to 0 or loses digits in β·s and in the division by β (float32
        # at β = 1e-46: NaN): float64 then
        work = work.double()
    pooled = smooth_max(work, beta, -1)
    if beta == math.inf or beta == -math.inf:
        return pooled.to(out_dtype)
    # smooth_max − log(n)/β cancels where |β|·spread is small: both terms are ~log(n)/|β| and the result is near the
    # mean, so the error grows like eps/|β| (float32 at β = 1e-3: 3e-4, at 1e-5: 0.04). There the same value is
    # m + log1p(mean(expm1(β·d)))/β with d = s − m, m the max (the min for β < 0), accurate to ~eps·spread; where
    # |β|·spread > 1 the first form's error, eps/|β|, is below eps·spread too. Each row takes the accurate one.
    low, high = work.amin(-1), work.amax(-1)
    near = (high - low) * abs(beta) <= 1  # False for rows holding ±inf or NaN
    # The near-mean form on finite stand-ins elsewhere: torch.where passes zero gradients to the branch it does not
    # take, but 0·inf is NaN, and a row with a ±inf score made the whole row's gradient NaN.
    anchor = torch.where(near, high if beta > 0 else low, 0.0)
    d = torch.where(near.unsqueeze(-1), work - anchor.unsqueeze(-1), 0.0)
    # ... written without dividing by β: v = mean(expm1(β·d))/β = mean(d·expm1(z)/z), z = β·d, and then
    # log1p(β·v)/β = v·log1p(u)/u, u = β·v. Where β·d falls below the dtype's normal numbers (float32 at β = 1e-30
    # and scores ~1e-20: 0, and the max came back for the mean) each factor is still ~1 and v the mean of d.
    v = (d * _expm1_over(beta * d)).mean(-1)
    near_mean = anchor + v * _log1p_over(beta * v)
    # log(n) as a tensor op: n = H·W may be symbolic (torch.export with dynamic H, W; math.log pinned it to the
    # example's size, and the exported program failed on any other)
    log_n = torch.log(work.new_full((), n))
    return torch.where(near, near_mean, pooled - log_n / beta).to(out_dtype)


def _expm1_over(z):
    """expm1(z)/z, and its series (error below z⁴/120) where |z| < 1e-4 (1 at z = 0)."""
    small = z.abs() < 1e-4
    safe = torch.where(small, 1.0, z)  # (no 0/0 in the branch not taken: its gradient would be NaN)
    return torch.where(small, 1 + z * (1 / 2 + z * (1 / 6 + z / 24)), torch.expm1(safe) / safe)


def _log1p_over(u):
    """log1p(u)/u, and its series (error below u⁴/5) where |u| < 1e-4 (1 at u = 0)."""
    small = u.abs() < 1e-4
    safe = torch.where(small, 1.0, u)
    return torch.where(small, 1 - u * (1 / 2 - u * (1 / 3 - u / 4)), torch.log1p(safe) / safe)
