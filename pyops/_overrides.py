"""PyTorch's __torch_function__ protocol for pyops' public functions, as torch.nn.functional's functions follow it.

A call whose arguments include an object with its own __torch_function__ (a tensor subclass, a torch.fx Proxy
during symbolic tracing) or that runs under a TorchFunctionMode is handed to that override before any check runs.
Without it torch.fx.symbolic_trace failed on every model using pyops (the argument checks refused the Proxy, or
Python control flow read its shape); with it the traced graph holds one call of the pyops function, which runs the
real function when the graph runs. Plain tensors cost one C-level check (about 0.1 µs).
"""
import functools

from torch.nn import Module
from torch.overrides import handle_torch_function, has_torch_function


def _candidates(args, kwargs):
    """The arguments an override may come from: every argument and the elements of list/tuple arguments
    (sliding_head takes lists of weights), but no nn.Module (a fused layer's forward hands its module on): looking
    for __torch_function__ on a module goes through nn.Module.__getattr__'s failure, ~1 µs of a layer's call."""
    relevant = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, (list, tuple)):
            relevant.extend(a)
        elif not isinstance(a, Module):
            relevant.append(a)
    return relevant


def overridable(fn):
    """fn, first offered to the __torch_function__ overrides of its arguments (see the module docstring).

    Each wrapper gets its own code object, named after fn: torch.compile keeps its compiled entries per code object
    and allows a few per code (torch._dynamo.config.recompile_limit, 8), so with one shared `public` code, compiling
    a ninth pyops function failed under fullgraph=True (and fell back to eager without it)."""
    def public(*args, **kwargs):
        relevant = _candidates(args, kwargs)
        if has_torch_function(relevant):
            return handle_torch_function(public, relevant, *args, **kwargs)
        return fn(*args, **kwargs)
    names = {"co_name": fn.__name__}
    if hasattr(public.__code__, "co_qualname"):  # (Python >= 3.11)
        names["co_qualname"] = fn.__qualname__
    public.__code__ = public.__code__.replace(**names)
    return functools.wraps(fn)(public)
