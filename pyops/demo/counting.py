"""Problem 2: the arithmetic of AlexNet (torchvision's layout, one 224x224 image), counted by pyops.count_ops."""
import torch
import torchvision

import pyops
from pyops.demo._timing import check

TITLE = "Problem 2 - operation counts of AlexNet (multiplications + additions, 1x3x224x224)"

# The homework's figures: C_in·F²·C_out·h_out² multiplications per conv layer and as many additions, n_in·n_out of
# each per linear layer.
HOMEWORK_CONV = 1_311_133_056
HOMEWORK_LINEAR = 117_243_904


def checks():
    count = pyops.count_ops(torchvision.models.alexnet(weights=None), torch.randn(1, 3, 224, 224))
    ok = check(f"conv layers,   homework {HOMEWORK_CONV:>13,}; counted", count.conv,
               count.conv == HOMEWORK_CONV, "{:>13,}")
    ok &= check(f"linear layers, homework {HOMEWORK_LINEAR:>13,}; counted", count.linear,
                count.linear == HOMEWORK_LINEAR, "{:>13,}")
    heaviest = max(count.by_layer, key=lambda r: r.mults + r.adds)
    print(f"  heaviest layer: {heaviest.name} ({heaviest.kind}, output {tuple(heaviest.output_shape)}), "
          f"{(heaviest.mults + heaviest.adds) / count.total:.0%} of all {count.total:,} operations")
    return ok


def timings():
    """Counting is not timed against anything: it has no baseline."""
