"""Sections of the demo (`python -m pyops`). Each module has TITLE, checks() -> bool (prints each check with its
measured number) and timings() (prints pyops vs its PyTorch baseline)."""
from . import conv1d, conv_bn_relu, counting, sliding, smooth_max

# In the homework's order: Problem 1 smooth max, 2 operation counts, 3 conv+BN+ReLU fusion, 4 conv1d backward,
# 5 the fully convolutional sliding classifier.
SECTIONS = [smooth_max, counting, conv_bn_relu, conv1d, sliding]
