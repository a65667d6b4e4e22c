"""Drop-in modules built on pyops ops."""
from torch import nn

from .convolutionalize import convolutionalize
from .sliding import DEFAULT_MAX_MEMORY, _pair, classify_fcn


class SlidingClassifier(nn.Module):
    """A crop classifier applied densely: pyops.sliding_classify in module form, converted once and reused.

    SlidingClassifier(model, window, stride=1): model maps (B, C, h, w) crops to (B, classes) (see
    pyops.convolutionalize); the module holds its fully convolutional copy (`fcn`), not the model.
    forward(images (B, C, H, W), max_memory=4 GiB, precision="fp32") → (B, classes, ⌊(H−h)/s⌋+1, ⌊(W−w)/s⌋+1).
    """

    def __init__(self, model, window, stride=1):
        super().__init__()
        self.fcn = convolutionalize(model, window)
        self.stride = _pair(stride, "stride")

    def forward(self, images, max_memory=DEFAULT_MAX_MEMORY, precision="fp32"):
        return classify_fcn(self.fcn, images, self.stride, max_memory, precision)

    def extra_repr(self):
        return f"window={self.fcn.window}, stride={self.stride}, total_stride={self.fcn.stride}"
