"""Global flags (torch.backends.*, autocast's cache, the TorchScript tracer) set for the duration of a block."""
import contextlib
import threading

import torch


# Overrides of shared state (process-wide flags, a module's training flag) active now, per key: the original value
# and the active blocks' (token, value) in the order they began. Threads that run pyops calls at once share the
# state; a plain save/restore per block let one thread restore the original while another was still inside (its
# BatchNorm then ran in training mode) and left behind the value of whichever block ended last.
_lock = threading.Lock()
_active = {}


@contextlib.contextmanager
def _override(key, read, write, value):
    """write(value) for the block. While blocks overlap (nested or in other threads), the value is that of the latest
    one still active; the original is written back when the last one ends, also on an exception."""
    if torch.compiler.is_compiling():
        # Traced by torch.compile/torch.export, which cannot trace a lock (strict export and fullgraph=True failed
        # on it): a plain save/restore, which the trace records (a module's training flag, eval_mode).
        original = read()
        write(value)
        try:
            yield
        finally:
            write(original)
        return
    token = object()
    with _lock:
        original, blocks = _active.setdefault(key, (read(), []))
        blocks.append((token, value))
        write(value)
    try:
        yield
    finally:
        with _lock:
            blocks.pop(next(i for i, (t, _) in enumerate(blocks) if t is token))
            if blocks:
                write(blocks[-1][1])
            else:
                del _active[key]
                write(original)


def temporarily(namespace, name, value):
    """namespace.name = value inside the block (see _override for overlapping blocks). For the process-wide flags
    it is used on (torch.backends.*): nothing under torch.compile/torch.export, whose graphs read those flags when
    they run (Dynamo guards on them), so the caller's settings apply there; a write would only be a side effect
    replayed after the graph."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _override((id(namespace), name), lambda: getattr(namespace, name),
                     lambda v: setattr(namespace, name, v), value)


def tf32(backend, allow):
    """TF32 allowed (allow=True) or exact fp32 inside the block, for backend "conv" (cuDNN's convolutions) or
    "matmul" (cuBLAS's): its per-backend fp32_precision ("tf32" / "ieee") where this torch has one
    (torch.backends.cudnn.conv, torch.backends.cuda.matmul), else its allow_tf32 flag. Not the flag where the
    setting exists: reading allow_tf32 raises once a user has set the per-backend settings apart, and writing it
    back did not restore them (matmul's "none" came back "ieee"). Nothing under torch.compile/torch.export
    (`temporarily` says why; Dynamo cannot trace the settings' attribute lookups either)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    flags = torch.backends.cudnn if backend == "conv" else torch.backends.cuda.matmul
    setting = getattr(flags, "conv", None) if backend == "conv" else flags
    if setting is not None and hasattr(setting, "fp32_precision"):
        return temporarily(setting, "fp32_precision", "tf32" if allow else "ieee")
    return temporarily(flags, "allow_tf32", allow)


@contextlib.contextmanager
def autocast_cache_disabled():
    """No caching of autocast's casts inside the block (the caller's setting is restored after it). The setting is
    per thread in PyTorch: a plain save/restore (the shared _override let one thread's block end write another
    thread's value into it: two threads each came out with the cache disabled)."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


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
    BatchNorm would otherwise update its statistics and num_batches_tracked). Calls in several threads at once keep
    eval mode until the last one ends (_override). The flags are set directly, both ways, not through
    train()/eval(), whose overrides (pyops' DerivedWeights drops its cache) are for real mode switches. A submodule
    already in eval mode that no other block holds is left alone: nothing can make it train during the block but a
    train() call from another thread, which is unsupported anyway (and a block that begins on it meanwhile reads
    and restores False). The common case, a model in eval mode, then costs one walk over its modules instead of
    two writes and two lock round trips each (0.1-0.2 ms of a 1.5 ms sliding_classify call on a small model)."""
    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if not m.training and (id(m), "training") not in _active:
                continue
            stack.enter_context(_override((id(m), "training"), lambda m=m: m.training,
                                          lambda v, m=m: setattr(m, "training", v), False))
        yield module
