"""Sections of the demo (`python -m pyops`). Each module has TITLE, checks() -> bool (prints each check with its
measured number) and timings() (prints pyops vs its PyTorch baseline)."""
from . import sliding, smooth_max

SECTIONS = [smooth_max, sliding]
