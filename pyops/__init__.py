"""pyops: exact and fast CNN transformations as PyTorch ops.

Importing pyops loads the compiled library `pyops._C`, which registers the ops under `torch.ops.pyops`
(CPU kernels always, CUDA kernels when the build found a CUDA toolkit: see `pyops.build_info()`).
"""
import torch  # noqa: F401  (the compiled library links against torch: load it first)

from . import _C  # noqa: F401  (registers torch.ops.pyops.*)
from ._C import build_info
from .smooth_max import smooth_max
from .convolutionalize import convolutionalize
from .lse_pool import lse_pool2d
from .sliding import sliding_classify
from .sliding_head import sliding_head
from . import nn  # noqa: E402  (pyops.nn.SlidingClassifier)

__all__ = ["build_info", "smooth_max", "convolutionalize", "sliding_classify", "lse_pool2d", "sliding_head", "nn"]
__version__ = "0.1.0"
