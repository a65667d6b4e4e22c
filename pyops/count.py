"""`python -m pyops.count MODEL --input 1,3,224,224`: the per-layer multiplications and additions of a model.

MODEL is a torchvision model name (alexnet, resnet18, ...; built with weights=None) or `module:attr`, where attr
(dotted paths allowed) is a model instance or a zero-argument callable returning one. Counting needs only shapes,
so by default the model is built and run on the meta device (no memory, no arithmetic); a `module:attr` instance
runs where its parameters are.
"""
import argparse
import difflib
import importlib
import sys

import torch

from pyops.counting import count_ops


def parse_shape(text):
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}")
    if not shape or min(shape) < 0 or max(shape) >= 2**63:
        raise argparse.ArgumentTypeError(f"expected sizes from 0 to 2**63 - 1, got {text!r}")
    return shape


def load_model(spec, device):
    """The model named by `spec` (see the module docstring); raises LookupError with a readable message."""
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            obj = importlib.import_module(module_name)
        except Exception as e:  # not found, an empty name (ValueError), or the module's own error at import
            raise LookupError(f"cannot import module {module_name!r} of {spec!r}: {type(e).__name__}: {e}") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise LookupError(f"{module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not isinstance(obj, torch.nn.Module):
            if not callable(obj):
                raise LookupError(f"{spec!r} is neither a torch.nn.Module nor a callable returning one")
            try:
                with torch.device(device):
                    obj = obj()
            except Exception as e:
                raise LookupError(f"calling {spec!r}() failed: {type(e).__name__}: {e}") from None
            if not isinstance(obj, torch.nn.Module):
                raise LookupError(f"{spec!r}() returned {type(obj).__name__}, not a torch.nn.Module")
        return obj
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        raise LookupError(f"unknown model {spec!r}" + (f" (did you mean {' or '.join(close)}?)" if close else "") +
                          ": give a torchvision model name (see torchvision.models.list_models()) or module:attr")
    with torch.device(device):
        return torchvision.models.get_model(spec, weights=None)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyops.count", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", help="torchvision model name (alexnet, resnet18, ...) or module:attr")
    p.add_argument("--input", type=parse_shape, default=(1, 3, 224, 224), metavar="N,C,H,W",
                   help="shape of the example input (default 1,3,224,224); batch size multiplies every count")
    p.add_argument("--device", default="meta", help="where to build and run the model (default meta: shapes only)")
    args = p.parse_args(argv)
    try:
        torch.empty(0, device=args.device)  # an unknown device type, or one this machine does not have
    except (RuntimeError, AssertionError) as e:
        p.error(f"argument --device: cannot use {args.device!r} ({str(e).splitlines()[0]})")
    try:
        model = load_model(args.model, args.device)
    except LookupError as e:
        p.error(str(e))  # exit code 2, like any other bad argument
    device = next(model.parameters(), torch.empty(0, device=args.device)).device
    try:
        count = count_ops(model, torch.randn(args.input, device=device))
    except Exception as e:  # the model's own error (usually a shape mismatch), without the traceback
        print(f"{p.prog}: error: running {args.model} on an input of shape {args.input} failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"{args.model}, input {'x'.join(map(str, args.input))}: multiplications and additions per layer\n")
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
