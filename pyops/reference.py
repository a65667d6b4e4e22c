"""Pure-PyTorch references of every pyops op: the documented semantics, used by tests and benchmarks."""
import math

import torch


def smooth_max(x, beta=1.0, dim=-1, keepdim=False):
    """(1/β)·logsumexp(β·x) along dim; the max / min at β = ±inf."""
    if math.isinf(beta):
        return x.amax(dim, keepdim) if beta > 0 else x.amin(dim, keepdim)
    return torch.logsumexp(beta * x, dim, keepdim) / beta
