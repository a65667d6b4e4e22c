"""pyops: exact and fast CNN transformations as PyTorch ops.

Importing pyops loads the compiled library `pyops._C`, which registers the ops under `torch.ops.pyops`
(CPU kernels always, CUDA kernels when the build found a CUDA toolkit: see `pyops.build_info()`).
"""
import torch  # noqa: F401  (the compiled library links against torch: load it first)

from . import _C  # noqa: F401  (registers torch.ops.pyops.*)
from ._C import build_info
from .smooth_max import smooth_max
from . import conv_bn_relu  # noqa: F401  (registers the fused conv ops' fake kernels, autograd, flop formulas)
from .conv_bn_relu import conv2d_bn_relu
from . import nn
from .fold import fold_bn
from .fuse import fuse

__all__ = ["build_info", "smooth_max", "conv2d_bn_relu", "fold_bn", "fuse", "nn"]
__version__ = "0.1.0"
