"""A module's hooks: whether it has any that change or observe what it computes, and moving them to another module."""
from .fold import WEIGHT_REPARAMETRIZATIONS

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def move_hooks(source, target):
    """target gets source's forward, forward-pre and backward hooks (the dicts themselves: handles still remove
    them)."""
    for name in HOOK_DICTS:
        setattr(target, name, getattr(source, name))
    target._is_full_backward_hook = source._is_full_backward_hook


def has_hooks(module):
    """Whether module has hooks: forward hooks, backward hooks, or pre-hooks other than the old-style
    weight_norm/spectral_norm ones that fold_bn reads through (fold.current_weight). A hook may change or observe
    what the module computes, which a fused module would not reproduce."""
    pre = [h for h in module._forward_pre_hooks.values() if not isinstance(h, WEIGHT_REPARAMETRIZATIONS)]
    return bool(pre or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks)
