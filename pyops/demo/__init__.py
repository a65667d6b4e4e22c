"""Sections of the demo (`python -m pyops`). Each module has TITLE, checks() -> bool (prints each check with its
measured number) and timings() (prints pyops vs its PyTorch baseline)."""
from . import counting, smooth_max

SECTIONS = [counting, smooth_max]
