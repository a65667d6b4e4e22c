"""Sections of the demo (`python -m pyops`). Each module has TITLE, checks() -> bool (prints each check with its
measured number) and timings() (prints pyops vs its PyTorch baseline)."""
from . import conv_bn_relu, smooth_max

SECTIONS = [smooth_max, conv_bn_relu]
