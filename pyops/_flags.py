"""Global flags (torch.backends.*, autocast's cache, the TorchScript tracer) set for the duration of a block."""
import contextlib

import torch


@contextlib.contextmanager
def temporarily(namespace, name, value):
    """namespace.name = value inside the block; the caller's value is restored after it, also on an exception."""
    saved = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, saved)


@contextlib.contextmanager
def autocast_cache_disabled():
    """No caching of autocast's casts inside the block (the caller's setting is restored after it)."""
    saved = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(saved)


def autocast_off(device):
    """No torch.autocast region for device's type inside the block (nothing to do for types autocast lacks)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def jit_tracing_paused():
    """Nothing inside the block is recorded by torch.jit.trace (if a trace is running; it resumes after the block)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


@contextlib.contextmanager
def eval_mode(module):
    """module and its submodules in eval mode inside the block, each one's own training flag restored after: the
    module is used with eval semantics (BatchNorm's running statistics, no Dropout) and left as it was (a train-mode
    BatchNorm would otherwise update its statistics and num_batches_tracked). The flags are set directly, both
    ways, not through train()/eval(), whose overrides (pyops' DerivedWeights drops its cache) are for real mode
    switches."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
