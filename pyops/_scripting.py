"""TorchScript: pyops' modules refuse torch.jit.script with an error that names them."""


class NotScriptable:
    """Mixin: torch.jit.script of the module, or of a model holding it, raises a RuntimeError naming the module's
    class and what works instead.

    TorchScript cannot compile pyops' forwards (their checks use f-strings and try blocks; their functions are
    wrapped for __torch_function__), and its own errors pointed into those internals, with file names that did not
    match the lines. torch.jit.script calls __prepare_scriptable__ on every module of a model before compiling."""

    def __prepare_scriptable__(self):
        cls = type(self)
        raise RuntimeError(f"{cls.__module__}.{cls.__qualname__} does not support torch.jit.script: use "
                           "torch.jit.trace (TorchScript is deprecated from torch 2.14 on), torch.export or "
                           "torch.compile")
