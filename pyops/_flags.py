"""A global backend flag (torch.backends.*) set for the duration of a block."""
import contextlib


@contextlib.contextmanager
def temporarily(namespace, name, value):
    """namespace.name = value inside the block; the caller's value is restored after it, also on an exception."""
    saved = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, saved)
