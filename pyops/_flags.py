"""Global flags (torch.backends.*, autocast's cache) set for the duration of a block."""
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
