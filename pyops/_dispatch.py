"""How our Python code calls our ops: below the autograd layer whenever autograd has nothing to record."""
import torch


def records_grad(*args):
    """Whether autograd records a call with these arguments: grad mode on and some argument requiring grad."""
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


def call_op(op, *args):
    """op(*args), skipping the Python autograd layer when that layer has nothing to do.

    torch.library.register_autograd puts a Python kernel in front of each op. When grad mode is off or no argument
    requires grad it only passes the call on, yet that costs 15-20 µs a call: more than the kernels of a small layer
    take on a GPU, and the difference between fused and eager models there. In that case this calls the op below
    autograd directly. Under torch.compile the tracer sees the op exactly as registered.
    """
    if torch.compiler.is_compiling() or records_grad(*args):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
