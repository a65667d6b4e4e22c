"""Smooth max ν_β(x) = (1/β)·log Σᵢ exp(β·xᵢ): a differentiable maximum.

max(x) ≤ ν_β(x) ≤ max(x) + log(n)/β for β > 0; ν_β → max as β → ∞ (β = inf gives the max exactly), β < 0 is a
smooth min (β = -inf the min). The gradient is softmax(β·x) along `dim`: one-hot at the argmax in the limit,
shared equally between ties at β = ±inf (NaN where x holds a NaN).

Precision of the gradient: it is computed as exp(β·(x − r)) from the result r rounded to x's dtype, in one pass.
For float16/bfloat16 that rounding would scale a row's gradient by up to exp(|β|·|r|·2⁻⁹), so it is normalized by
its sum (one more pass). For float32/float64 the relative error is |β|·|r|·eps at most, as for torch.logsumexp's
own gradient (e.g. float32 ties at β = 1e7 get gradient 1 each instead of 1/3): use float64, or a β for which
|β|·|r| stays well below 1/eps.

Range: the kernels compute β·(x − max) in x's accumulation type (float for float32/float16/bfloat16), so values
spread wider than its range (float32 scores of +-1.7e38 in one row) overflow x − max and lose those terms at tiny β
(relative error 8e-3 at β = 1.2e-38); use float64 there.
"""
import torch

from ._checks import check_devices, check_floating, check_number, wrap_dim
from ._overrides import overridable


def _check_args(x, beta, dim):
    check_floating(x, "x")
    check_number(beta, "beta")
    # (written so that the tests trace as guards on a symbolic beta, where math.isnan would break the graph)
    if beta == 0 or beta != beta:
        raise ValueError(f"argument 'beta' must be non-zero and not NaN, got {beta} "
                         "(beta -> 0 is the mean, not a smooth max)")
    d = wrap_dim(dim, x.dim())
    if x.dim() > 0 and x.shape[d] == 0:
        raise ValueError(f"argument 'x' has size 0 along dim {dim} (shape {tuple(x.shape)}): "
                         "the smooth max of nothing is undefined")
    return d


@overridable
def smooth_max(x, beta=1.0, dim=-1, keepdim=False):
    """ν_β(x) = (1/β)·log Σ exp(β·x) along `dim`, computed stably in one pass.

    Args:
        x: floating-point tensor of any shape (..., n, ...); float32/float64 (and float16/bfloat16, accumulated
           in float32). Any strides.
        beta: non-zero float; ±inf give the max / min exactly.
        dim: the reduced dimension.
        keepdim: keep `dim` with size 1.
    Returns:
        x's shape without `dim` (or with size 1 there when keepdim), x's dtype (float32 in a torch.autocast region:
        README, "Mixed precision").
    """
    _check_args(x, beta, dim)
    return torch.ops.pyops.smooth_max.default(x, float(beta), dim, keepdim)


def _reduced_shape(x, dim, keepdim):
    if x.dim() == 0:
        return ()
    d = wrap_dim(dim, x.dim())
    shape = list(x.shape)
    if keepdim:
        shape[d] = 1
    else:
        del shape[d]
    return tuple(shape)


@torch.library.register_fake("pyops::smooth_max")
def _smooth_max_fake(x, beta, dim, keepdim):
    _check_args(x, beta, dim)
    return x.new_empty(_reduced_shape(x, dim, keepdim))


@torch.library.register_fake("pyops::smooth_max_backward")
def _smooth_max_backward_fake(grad, x, result, beta, dim, keepdim):
    _check_args(x, beta, dim)
    check_devices(x, "x", grad=grad, result=result)
    torch._check(grad.shape == result.shape, lambda: "pyops.smooth_max_backward: 'grad' and 'result' differ in shape")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Autograd (backward and double backward): C++, csrc/ops/smooth_max/smooth_max_autograd.cpp.
