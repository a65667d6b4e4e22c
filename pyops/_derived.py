"""One derived form of a module's weights kept between calls: ConvBNReLU2d's packed (oneDNN) or re-laid-out weight,
FullyConvolutional's FFT spectra."""
import weakref

from torch import nn


class SourcesKey:
    """Which tensors a derived form was made from, and their state then: matches(tensors) is True only for the same
    tensor objects (held by weak references, so a cache keeps no replaced weight alive) with the same device, dtype,
    data pointer and version counter. Identity matters: a freed weight's memory is reused, and a new weight at the
    same address with the same version (0) matched an address-only key, serving the old weight's packing.
    An inference tensor (made in torch.inference_mode) has no version counter: its in-place updates (possible only
    inside inference_mode) are not seen, as torch.compile's freezing takes parameters to be constants; assign a new
    tensor to update such a weight."""

    def __init__(self, tensors):
        self.refs = [weakref.ref(t) for t in tensors]
        self.state = _state(tensors)

    def matches(self, tensors):
        return (len(tensors) == len(self.refs) and all(ref() is t for ref, t in zip(self.refs, tensors))
                and _state(tensors) == self.state)


def _state(tensors):
    return [(t.device, t.dtype, t.data_ptr(), None if t.is_inference() else t._version) for t in tensors]


class DerivedWeights(nn.Module):
    """A module mixin holding at most one derived form of its weights: derived(kind, sources, make) returns make(),
    made on first use and made again whenever kind changes or a source tensor does (another tensor, or the same
    one updated in place: SourcesKey). .to()/.cuda()/.half() drop it; copies and pickles never carry it: it is
    rebuilt on use (an MKLDNN tensor cannot be pickled, and FFT spectra can take gigabytes)."""

    _derived = None  # (kind, SourcesKey, value); a class default, so older pickled modules have it too

    def derived(self, kind, sources, make):
        entry = self._derived  # read once: another thread may replace it meanwhile (make() releases the GIL)
        if entry is None or entry[0] != kind or not entry[1].matches(sources):
            self._derived = None  # free the old form before making the new one
            entry = (kind, SourcesKey(sources), make())
            self._derived = entry
        return entry[2]

    def _apply(self, fn, recurse=True):
        self._derived = None
        return super()._apply(fn, recurse)

    def train(self, mode=True):
        # Dropped when train()/eval() switches the mode too: a training loop's updates need not bump the version
        # counter (torch.optim's fused=True steps do not), and the switch to evaluation comes after them.
        if mode != self.training:
            self._derived = None
        return super().train(mode)

    _transient = ("_derived",)  # attributes that copies and pickles do not carry (a subclass may add its caches)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._transient:
            state[name] = None
        return state
