"""Argument validation shared by the Python entry points: errors name the argument, as PyTorch's do."""
import numbers
import operator

import torch

from . import _C


def check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(x).__name__}")


def check_floating(x, name):
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"argument '{name}' must be a floating-point tensor, got {x.dtype}")


AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def in_autocast_region(device):
    """Whether a torch.autocast region is active for device's type (never for types autocast lacks, e.g. meta)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


# The C++ kernels' own answer (csrc/common/onednn.h), asked once, at import: a constant costs nothing to trace under
# torch.compile, and torch.jit.trace records nothing of it.
_CPU_COMPUTES_BF16 = _C.cpu_computes_bf16()


def cpu_computes_bf16():
    """Whether oneDNN computes bfloat16 convolutions natively on this CPU (AVX-512 BF16 / AMX), as the ops decide."""
    return _CPU_COMPUTES_BF16


def convolution_autocast_dtype(device):
    """The dtype the ops' convolutions compute in inside device's torch.autocast region (csrc/common/autocast.h):
    the region's on CUDA and where the CPU computes it natively (bfloat16 with AVX-512 BF16 / AMX), else float32."""
    region = torch.get_autocast_dtype(device.type)
    return region if device.type != "cpu" or (region is torch.bfloat16 and cpu_computes_bf16()) else torch.float32


def autocast_mixes(t, ref):
    """Whether t's and ref's dtypes may differ: inside a torch.autocast region of ref's device, half, bfloat16 and
    float32 mix (the ops' autocast kernels cast them to one dtype: csrc/common/autocast.h; autocast does for ATen's)."""
    return t.dtype in AUTOCAST_DTYPES and ref.dtype in AUTOCAST_DTYPES and in_autocast_region(ref.device)


def check_like(t, ref, name, ref_name):
    """t must share ref's dtype (else TypeError; but see autocast_mixes) and device (else ValueError), as the C++
    checks require."""
    if t.dtype != ref.dtype and not autocast_mixes(t, ref):
        raise TypeError(f"argument '{name}' has dtype {t.dtype} but '{ref_name}' has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def check_number(value, name):
    """value must be a real number: a Python or numpy int/float, or (under torch.compile, where a number that changes
    between calls is symbolic) a torch.SymInt/SymFloat. bools and tensors are refused (TypeError)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"argument '{name}' must be a number, got {type(value).__name__}")


def check_devices(ref, ref_name, **tensors):
    """Every tensor given by name (None skipped) must be on ref's device, else ValueError naming it. The fake
    kernels need it too: a meta tensor among CPU ones sends the call to them, and they returned uninitialized CPU
    tensors where the real kernels refuse the mix."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def as_int(value, name, minimum=None):
    """value as a Python int: an int or an integer-like (a numpy integer: operator.index), as PyTorch's int
    arguments take them; bools and tensors are refused. TypeError for a non-integer, ValueError below minimum."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"argument '{name}' must be an int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"argument '{name}' must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"argument '{name}' must be >= {minimum}, got {value}")
    return value


def int_tuple(value, name, n, minimum=None):
    """value as a tuple of n ints (each as as_int takes it): one int stands for all n, or a tuple/list of n."""
    items = list(value) if isinstance(value, (tuple, list)) else [value] * n
    if len(items) != n:
        raise ValueError(f"argument '{name}' must be an int or a sequence of {n}, got {value!r}")
    return tuple(as_int(v, name, minimum) for v in items)


def wrap_dim(dim, ndim, name="dim"):
    """A possibly negative dim wrapped into [0, ndim) (a 0-d tensor takes 0 and -1), else IndexError."""
    dim = as_int(dim, name)
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"argument '{name}' = {dim} is out of range for a tensor of {ndim} dimensions "
                         f"(expected in [{-n}, {n - 1}])")
    return dim % n
