"""One derived form of a module's weights kept between calls: ConvBNReLU2d's packed (oneDNN) or re-laid-out weight,
FullyConvolutional's FFT spectra."""
from torch import nn


def values_key(tensors):
    """A key that changes when any of tensors is replaced or updated in place: each one's device, dtype, data
    pointer and version counter. An inference tensor (made in torch.inference_mode) has no version counter: its
    in-place updates (possible only inside inference_mode) are not seen, as torch.compile's freezing takes
    parameters to be constants; replace such a tensor (or call the module's _apply, e.g. .to()) to update it."""
    return tuple((t.device, t.dtype, t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)


class DerivedWeights(nn.Module):
    """A module mixin holding at most one derived form of its weights: derived(kind, sources, make) returns make(),
    made on first use and made again whenever kind changes or a source tensor does (another tensor, or the same
    one updated in place: the key holds each source's device, dtype, data pointer and version). .to()/.cuda()/.half()
    drop it; copies and pickles never carry it: it is rebuilt on use (an MKLDNN tensor cannot be pickled, and FFT
    spectra can take gigabytes)."""

    _derived = None  # ((kind, sources' keys), value); a class default, so older pickled modules have it too

    def derived(self, kind, sources, make):
        key = (kind, values_key(sources))
        entry = self._derived  # read once: another thread may replace it meanwhile (make() releases the GIL)
        if entry is None or entry[0] != key:
            self._derived = None  # free the old form before making the new one
            entry = (key, make())
            self._derived = entry
        return entry[1]

    def _apply(self, fn, recurse=True):
        self._derived = None
        return super()._apply(fn, recurse)

    def train(self, mode=True):
        # Dropped when train()/eval() switches the mode too: a training loop's updates need not bump the version
        # counter (torch.optim's fused=True steps do not), and the switch to evaluation comes after them.
        if mode != self.training:
            self._derived = None
        return super().train(mode)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_derived"] = None
        return state
