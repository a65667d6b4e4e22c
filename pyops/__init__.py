"""pyops: exact and fast CNN transformations as PyTorch ops.

Importing pyops loads the compiled library `pyops._C`, which registers the ops under `torch.ops.pyops`
(CPU kernels always, CUDA kernels when the build found a CUDA toolkit: see `pyops.build_info()`).
"""
import torch  # noqa: F401  (the compiled library links against torch: load it first)

from . import _C  # noqa: F401  (registers torch.ops.pyops.*)
from ._C import build_info
from . import conv_bn_relu  # noqa: F401  (registers the fused conv ops' fake kernels, autograd, flop formulas)
from . import activations, fft_conv, nn, reference
from .conv1d import conv1d, conv1d_bias_act
from .conv_bn_relu import conv2d_bn_relu
from .convolutionalize import convolutionalize
from .counting import OpCount, count_ops
from .fold import fold_bn
from .fuse import fuse
from .linear import linear_bias_act
from .lse_pool import lse_pool2d
from .sliding import sliding_classify
from .sliding_head import sliding_head
from .smooth_max import smooth_max

__all__ = ["build_info", "conv1d", "conv1d_bias_act", "conv2d_bn_relu", "convolutionalize", "count_ops", "fold_bn",
           "fuse", "linear_bias_act", "lse_pool2d", "nn", "OpCount", "sliding_classify", "sliding_head", "smooth_max"]
__version__ = "0.1.0"
