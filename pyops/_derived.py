"""One derived form of a module's weights kept between calls: ConvBNReLU2d's packed (oneDNN) or re-laid-out weight,
FullyConvolutional's FFT spectra."""
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._scripting import NotScriptable


# torch.optim steps, counted per parameter storage by a global post-step hook (registered with the first key:
# importing pyops hooks nothing). A fused=True step (Adam, AdamW, SGD) updates the weights in place without bumping
# their version counters, and an optimizer may write through `.data`: a derived form is stale once an optimizer
# holding one of its sources has stepped (only then: an inference model beside a training loop keeps its forms).
_steps_by_storage = {}  # untyped storage's _cdata -> steps of optimizers holding it (an address reused after a
_step_hook = None       # storage is freed may inherit a count: a spurious rebuild at most)


def _count_optimizer_step(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            try:
                key = p.untyped_storage()._cdata
            except (RuntimeError, NotImplementedError):  # (a tensor subclass without a storage of its own)
                continue
            _steps_by_storage[key] = _steps_by_storage.get(key, 0) + 1


def _steps_of(storage_keys):
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    return [_steps_by_storage.get(key, 0) for key in storage_keys]


class SourcesKey:
    """Which tensors a derived form was made from, and their state then: matches(tensors) is True only for the same
    tensor objects (by id) on the same storages, with the same device, dtype, data pointer, sizes, strides and
    version counter, and no step since of a torch.optim optimizer holding them (_steps_by_storage). The storages
    are held by weak references to the storage (a cache keeps no replaced weight alive, and no new storage can take
    a referenced one's identity); the tensors are not weakly referenced at all: torch.utils.swap_tensors refuses a
    tensor that has a Python weak reference, and load_state_dict swaps under
    torch.__future__.set_swap_module_params_on_conversion(True).

    The storage matters twice. A freed weight's memory is reused: a new weight at the same address with the same
    version (0) matched an address-only key. And `param.data = t` (torch.nn.utils.vector_to_parameters does it)
    keeps the Parameter object and its version counter while swapping its storage: a t at a freed weight's address
    matched a key of (object, address, version), and the freed weight's derived form served.
    What no key can see: writes outside a torch.optim step through another tensor with its own version counter
    that shares the storage (a `.data` alias; the vector that vector_to_parameters viewed, updated in place and
    passed again); a train()/eval() switch drops the derived form after such writes. An inference tensor (made in
    torch.inference_mode) has no version counter: its in-place updates (possible only inside inference_mode) are
    not seen either, as torch.compile's freezing takes parameters to be constants; assign a new tensor to update
    such a weight."""

    __slots__ = ("ids", "storages", "state", "steps")

    def __init__(self, tensors):
        self.storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]
        self.steps = _steps_of([s.cdata for s in self.storages])  # (before the state: a step meanwhile makes stale)
        self.ids = [id(t) for t in tensors]
        self.state = _state(tensors)

    def matches(self, tensors):
        return (len(tensors) == len(self.ids) and all(id(t) == i for i, t in zip(self.ids, tensors))
                and all(s.cdata == t.untyped_storage()._cdata for s, t in zip(self.storages, tensors))
                and _steps_of([s.cdata for s in self.storages]) == self.steps
                and _state(tensors) == self.state)


def _state(tensors):
    return [(t.device, t.dtype, t.data_ptr(), t.shape, t.stride(), None if t.is_inference() else t._version)
            for t in tensors]


class _Entry:
    """A slot's derived form: its kind, the SourcesKey it was made from, the value, and the slot's older forms still
    kept (most recent first). Copies never carry one (a deep copy is None): torch's parametrized modules deep-copy
    their __dict__ directly, past __getstate__, which copied the MKLDNN value (an error) and the storages' weak
    references (each copy released the same one: a crash)."""

    __slots__ = ("kind", "key", "value", "older")

    def __init__(self, kind, key, value, older=()):
        self.kind, self.key, self.value, self.older = kind, key, value, older

    def matches(self, kind, sources):
        return self.kind == kind and self.key.matches(sources)

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


class DerivedWeights(NotScriptable, nn.Module):
    """A module mixin holding derived forms of its weights, by default one per slot (an attribute named in
    _transient): derived(kind, sources, make, slot, keep) returns make(), made on first use and made again whenever
    kind changes or a source tensor does (another tensor, or the same one updated in place: SourcesKey). keep > 1
    keeps that many forms of different kinds made from the same sources (a layer run on several input shapes keeps
    a packed weight per shape; the least recently used goes first, and a change of the sources drops them all).
    .to()/.cuda()/.half() and train()/eval() switches drop them; copies and pickles never carry them: they are
    rebuilt on use (an MKLDNN tensor cannot be pickled, and FFT spectra can take gigabytes). Under torch.compile or
    torch.export nothing is kept: make() runs inside the trace (its tensors are fake, without data to key on, and
    the compiled graph must compute the form from the weights it is given)."""

    _derived = None  # an _Entry; a class default, so older pickled modules have it too
    _transient = ("_derived",)  # the slots; copies and pickles do not carry them (a subclass may add its own)

    def derived(self, kind, sources, make, slot="_derived", keep=1):
        if torch.compiler.is_compiling():
            return make()
        head = getattr(self, slot)  # read once: another thread may replace it meanwhile (make() releases the GIL)
        if isinstance(head, _Entry) and head.matches(kind, sources):
            return head.value  # (the common case, first: this runs on every call of a layer)
        entries = [head, *head.older] if isinstance(head, _Entry) else []
        hit = next((e for e in entries[1:] if e.matches(kind, sources)), None)
        # the forms of a slot are made from the same sources: those that no longer match them are stale; of the
        # others, the keep - 1 most recent stay
        rest = [_Entry(e.kind, e.key, e.value) for e in entries  # (re-made: an entry's own `older` would keep the
                if e is not hit and e.kind != kind and e.key.matches(sources)][:keep - 1]  # dropped ones alive)
        if hit is None:
            setattr(self, slot, _Entry(rest[0].kind, rest[0].key, rest[0].value, tuple(rest[1:])) if rest else None)
            hit = _Entry(kind, SourcesKey(sources), make())  # (the dropped forms are freed before it is made)
        setattr(self, slot, _Entry(kind, hit.key, hit.value, tuple(rest)))
        return hit.value

    def _drop_derived(self):
        for name in self._transient:
            setattr(self, name, None)

    def _apply(self, fn, recurse=True):
        self._drop_derived()
        return super()._apply(fn, recurse)

    def train(self, mode=True):
        # Dropped when train()/eval() switches the mode too: a training loop's own updates need not bump the
        # version counter (writes through `.data` outside torch.optim), and the switch to evaluation comes after them.
        if mode != self.training:
            self._drop_derived()
        return super().train(mode)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._transient:
            state[name] = None
        return state
