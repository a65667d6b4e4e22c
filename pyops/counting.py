"""Exact operation counts: the multiplications and additions of every layer of a model, from one run.

`count_ops(model, example_input)` runs the model once under `torch.no_grad()` inside a TorchDispatchMode, which sees
every ATen and pyops op call with its real shapes, and looks each op up in one table, op name -> counter. Module
forward hooks keep the current module path, so each counted op becomes a row named after the module that ran it
("features.0"; "" for the model itself). The run happens on whatever device the model and input are on; the meta
device works too (shapes only, no arithmetic), which is what `python -m pyops.count` uses.

Conventions (exact integers; batch size multiplies everything):
- Convolution, per output element: mults = (C_in/groups)·∏kernel, adds = mults − 1 + (1 if bias). Products with
  zero padding count (the homework's convention: C_in·F²·C_out·h_out² multiplications for a conv layer, and as
  many additions when it has a bias).
- Transposed convolution, per input element: each input value is multiplied by (C_out/groups)·∏kernel weights,
  one product for every output it reaches; products that land in the cropped border (`padding`) reach no output
  and are not counted, so with padding = 0 mults = N·C_in·∏in·(C_out/groups)·∏kernel exactly. Each output sums
  the c products that reach it with c − 1 additions, plus 1 for the bias: adds = mults − (outputs reached) without
  bias and adds = mults with bias (an output no product reaches, possible when stride > dilated kernel, is just
  the bias: no arithmetic).
- Linear / matmul (addmm, mm, bmm, baddbmm, addbmm, mv, addmv, dot, vdot), per output element: mults = the
  contracted length (n_in for Linear), adds = mults − 1 + (1 if there is an added term, beta ≠ 0). alpha/beta
  scalings are not counted. nn.Linear reaches addmm for contiguous inputs of any rank (a 1-D input's row has
  output shape (1, n_out), addmm's); on a non-contiguous input of rank 1 or ≥ 3 (e.g. the input projection of a
  batch_first nn.MultiheadAttention, nn.RNN or nn.GRU) PyTorch runs mm/mv followed by a separate elementwise bias
  add, which is not counted. Scaled dot-product attention counts as its two matmuls (Q·Kᵀ and P·V, kind 'linear');
  masks are not counted, except where nn.MultiheadAttention with need_weights=True adds a float attn_mask inside
  baddbmm (one addition per score, as baddbmm's added term). nn.MultiheadAttention's fused inference fast path is
  switched off while counting.
- pyops ops: conv2d_bn_relu and conv2d_bias_act count their convolution as a convolution with the op's own bias
  argument (conv2d_bn_relu: exactly the row the unfused nn.Conv2d gives; a fused model's conv2d_bias_act has the
  folded bias, so a bias-free conv's row gains one addition per output), and their epilogue as kind 'other': batch norm as one
  scale multiplication and one shift addition per output, the residual as one addition per output; activations
  (ReLU and the like) are comparisons or transcendentals, neither multiplications nor additions. conv1d is a
  convolution, conv1d_bias_act one with conv2d_bias_act's epilogue (a fused Conv1d → BatchNorm1d's folded bias).
  linear_bias_act counts as addmm, the Linear it computes (a fused Linear → BatchNorm1d's folded bias included).
  smooth_max ν_β = (1/β)·log Σ exp(β·x) over n values counts, per output, the formula's n multiplications by β,
  its n − 1 additions and the final multiplication by 1/β ('other'; exp, log and the
  max-subtraction that keeps it stable are not multiplications or additions of the formula); at β = ±inf it is
  the max / min, nothing.
- Everything else (pooling, elementwise ops, batch norm as ATen runs it, softmax, ...) is not counted.
A pyops op without a counter is reported by a warning, not skipped silently, and so are the fused ATen kernels that
hide a layer's matrix products from the ops above (FUSED_ARITHMETIC_OPS: nn.LSTM's oneDNN/cuDNN kernels,
nn.Bilinear's _trilinear); nn.GRU and nn.RNN on the CPU run addmm and are counted (with batch_first=True but for
the input projection's bias, as for Linear above).

Extending: `register_op_counter("pyops::sliding_head", fn)` (or as a decorator) adds or replaces the counter of an
op, keyed by its qualified name "namespace::name", so it works before the op itself is registered. `fn(args, out)`
gets the op's arguments as a dict by schema name (defaults filled in) and its output, and returns a list of
`Work(kind, mults, adds)`, one per kind of work it did ('conv', 'linear', 'other'). Every built-in rule below
is registered the same way; `conv_work`, `matmul_work` and `elementwise_work` build the usual `Work`s.

PyTorch's FlopCounterMode counts 2·(multiply-adds) of matmul- and conv-like ops only. pyops' conv-like ops register
their formulas with `torch.utils.flop_counter.register_flop_formula` in their own modules: the fused conv ops use
`conv_flops` below (PyTorch's own conv formula, so they count what the ATen conv they replace counts; their backward
is ATen's convolution_backward, counted by PyTorch); conv1d and its two backward ops count 2·(the products each
computes), which is PyTorch's count for F.conv1d except for the weight gradient of a grouped layer, which PyTorch's
formula (torch 2.14) counts `groups` times. `conv_backward_flops` gives PyTorch's backward count, quirk included,
for conv-like ops of other packages that want to match it. smooth_max registers none: it is a reduction, which
FlopCounterMode ignores as it ignores logsumexp. Internal shape probes (pyops.convolutionalize's fake runs) are
hidden from both counters.
"""
import contextlib
import dataclasses
import math
import warnings
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count

from ._flags import eval_mode

KINDS = ("conv", "linear", "other")

# ATen kernels that compute a layer's matrix products inside one op, with no counter here: reported by a warning
# (an LSTM's count would otherwise be silently zero).
FUSED_ARITHMETIC_OPS = {"aten::mkldnn_rnn_layer", "aten::_cudnn_rnn", "aten::miopen_rnn", "aten::_trilinear",
                        "aten::_thnn_fused_lstm_cell", "aten::_thnn_fused_gru_cell", "aten::mkldnn_rnn_layer_backward"}


class Work(NamedTuple):
    """Arithmetic of one op, of one kind ('conv', 'linear' or 'other')."""
    kind: str
    mults: int
    adds: int


class LayerCount(NamedTuple):
    """One row of OpCount.by_layer: one op call inside the module at path `name`. output_shape is the op's output
    shape (nn.Linear on an input of rank > 2 multiplies it flattened to a matrix: (N·..., n_out))."""
    name: str
    kind: str
    mults: int
    adds: int
    output_shape: tuple


@dataclasses.dataclass
class OpCount:
    """Totals (mults + adds) per kind and the rows they come from; str() is a readable table."""
    conv: int
    linear: int
    other: int
    total: int
    by_layer: list

    @classmethod
    def from_rows(cls, rows):
        per_kind = {k: sum(r.mults + r.adds for r in rows if r.kind == k) for k in KINDS}
        return cls(**per_kind, total=sum(per_kind.values()), by_layer=list(rows))

    def __str__(self):
        head = ("layer", "kind", "output shape", "mults", "adds", "mults + adds")
        body = [(r.name or "<model>", r.kind, "x".join(map(str, r.output_shape)) or "scalar", f"{r.mults:,}",
                 f"{r.adds:,}", f"{r.mults + r.adds:,}") for r in self.by_layer]
        sums = [(f"{kind} total", "", "", f"{sum(r.mults for r in self.by_layer if r.kind == kind):,}",
                 f"{sum(r.adds for r in self.by_layer if r.kind == kind):,}", f"{getattr(self, kind):,}")
                for kind in KINDS]
        sums.append(("total", "", "", f"{sum(r.mults for r in self.by_layer):,}",
                     f"{sum(r.adds for r in self.by_layer):,}", f"{self.total:,}"))
        widths = [max(len(line[i]) for line in [head, *body, *sums]) for i in range(len(head))]

        def fmt(line):  # text columns left-aligned, numbers right-aligned
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, body), rule, *map(fmt, sums)])


_COUNTERS = {}


def register_op_counter(op_name, fn=None):
    """Counts op `op_name` ("namespace::name", every overload) with fn(args: dict, out) -> [Work, ...].

    Usable as a decorator (`@register_op_counter("pyops::x")`); replaces an earlier counter of the same op.
    """
    if fn is None:
        return lambda f: register_op_counter(op_name, f)
    if not isinstance(op_name, str) or "::" not in op_name:
        raise ValueError(f"argument 'op_name' must be a qualified op name like 'pyops::conv1d', got {op_name!r}")
    if not callable(fn):
        raise TypeError(f"argument 'fn' must be callable, got {type(fn).__name__}")
    _COUNTERS[op_name] = fn
    return fn


# ---- building blocks of the counters -------------------------------------------------------------------------

def matmul_work(kind, outputs, length, bias):
    """Work of `outputs` dot products of `length` terms each, each plus one added term when `bias`."""
    if length == 0:  # empty sums: every output is 0 (or the added term itself), no arithmetic
        return Work(kind, 0, 0)
    mults = outputs * length
    return Work(kind, mults, mults - outputs + (outputs if bias else 0))


def elementwise_work(outputs, mults_each, adds_each):
    """'other' work of an epilogue doing mults_each multiplications and adds_each additions per output."""
    return Work("other", outputs * mults_each, outputs * adds_each)


def _transposed_reach(size_in, size_out, kernel, stride, padding, dilation):
    """Along one dim of a transposed conv: (products landing inside the output, output positions reached)."""
    products, reached = 0, set()
    for k in range(kernel):
        # input i lands at i·stride − padding + k·dilation; keep the i that land in [0, size_out)
        start = k * dilation - padding
        lo = -(start // stride) if start < 0 else 0  # the first i with i·stride + start >= 0
        landing = range(start + lo * stride, min(start + size_in * stride, size_out), stride)
        products += len(landing)
        reached.update(landing)
    return products, len(reached)


def conv_work(input_shape, weight_shape, output_shape, bias, stride, padding, dilation, transposed=False):
    """Work('conv', ...) of one (possibly transposed) convolution with the given shapes and hyper-parameters.

    input_shape (N, C_in, *spatial), weight_shape (C_out, C_in/groups, *kernel), or (C_in, C_out/groups, *kernel)
    when transposed, output_shape (N, C_out, *spatial_out); stride/padding/dilation: one int per spatial dim.
    The groups are implied by the weight's second dim.
    """
    kernel = list(weight_shape[2:])
    if not transposed:
        return matmul_work("conv", math.prod(output_shape), weight_shape[1] * math.prod(kernel), bias)
    n, c_in = input_shape[:2]
    products, reached = 1, output_shape[0] * output_shape[1]
    for dims in zip(input_shape[2:], output_shape[2:], kernel, stride, padding, dilation):
        p, r = _transposed_reach(*dims)
        products, reached = products * p, reached * r
    mults = n * c_in * weight_shape[1] * products
    return Work("conv", mults, mults if bias else mults - reached)


# ---- FlopCounterMode helpers (PyTorch's convention: 2 flops per multiply-add) ---------------------------------

def conv_flops(input_shape, weight_shape, output_shape, transposed=False):
    """FlopCounterMode flops of a convolution forward: 2·N·∏weight_shape·∏output spatial (input's if transposed).

    For `register_flop_formula` of conv-like pyops ops: the count PyTorch gives aten.convolution.
    """
    return conv_flop_count(list(input_shape), list(weight_shape), list(output_shape), transposed=transposed)


def conv_backward_flops(grad_output_shape, input_shape, weight_shape, grad_input=True, grad_weight=True,
                        transposed=False):
    """FlopCounterMode flops of a convolution backward: grad_input (a transposed conv of grad_output with the
    weight) plus grad_weight (a conv of the input with grad_output), each only when computed — the count PyTorch
    gives aten.convolution_backward. Shapes as in conv_flops; grad_output_shape is the forward output's."""
    swap = lambda s: [s[1], s[0], *s[2:]]  # noqa: E731  (batch <-> channels turns the weight grad into a conv)
    flops = 0
    if grad_input:
        flops += conv_flops(grad_output_shape, weight_shape, input_shape, transposed=not transposed)
    if grad_weight:
        a, b = (grad_output_shape, input_shape) if transposed else (input_shape, grad_output_shape)
        flops += conv_flops(swap(a), swap(b), swap(weight_shape))
    return flops


# ---- the built-in counters -------------------------------------------------------------------------------------

def _shape(t):
    return tuple(t.shape)


def _conv_args_work(a, out, transposed=False):
    """conv_work of a conv op whose schema has input, weight, bias, stride, padding, dilation (groups implied)."""
    spatial = a["input"].dim() - 2
    def expand(v):  # ints or lists; one value stands for every spatial dim, as PyTorch's convolutions take it
        v = [v] if isinstance(v, int) else list(v)
        return v * spatial if len(v) == 1 else v

    return conv_work(_shape(a["input"]), _shape(a["weight"]), _shape(out), a["bias"] is not None,
                     expand(a["stride"]), expand(a["padding"]), expand(a["dilation"]), transposed)


@register_op_counter("aten::convolution")
@register_op_counter("aten::_convolution")  # what a torch.jit.trace'd model calls
def _count_convolution(a, out):
    return [_conv_args_work(a, out, a["transposed"])]


def _register_matmuls():
    """The aten matmul family, each op given as (its contracted length, the name of its added term's factor)."""
    table = {
        "aten::mm": (lambda a: a["self"].shape[-1], None),
        "aten::bmm": (lambda a: a["self"].shape[-1], None),
        "aten::mv": (lambda a: a["self"].shape[-1], None),
        "aten::dot": (lambda a: a["self"].numel(), None),
        "aten::vdot": (lambda a: a["self"].numel(), None),
        "aten::addmm": (lambda a: a["mat1"].shape[-1], "beta"),
        "aten::baddbmm": (lambda a: a["batch1"].shape[-1], "beta"),
        "aten::addbmm": (lambda a: a["batch1"].shape[0] * a["batch1"].shape[-1], "beta"),
        "aten::addmv": (lambda a: a["mat"].shape[-1], "beta"),
    }
    for name, (length, beta) in table.items():
        count = (lambda a, out, length=length, beta=beta: [
            matmul_work("linear", out.numel(), length(a), beta is not None and a[beta] != 0)])
        register_op_counter(name, count)
        if beta is not None:  # the in-place forms (addmm_, ...): the same arithmetic into self
            register_op_counter(name + "_", count)


_register_matmuls()


def _count_attention(a, out):
    """Scaled dot-product attention as its two batched matmuls: scores Q·Kᵀ (L·S outputs of E products per batch
    and head) and the weighted sum P·V (L·Ev outputs of S products). The softmax, the scale, masks and dropout are
    not multiply-adds of a matmul; is_causal counts the full L·S scores, as the dense formula does."""
    q, k, v = a["query"], a["key"], a["value"]
    batch, (length_q, dim), length_k = math.prod(q.shape[:-2]), q.shape[-2:], k.shape[-2]
    scores = matmul_work("linear", batch * length_q * length_k, dim, False)
    weighted = matmul_work("linear", batch * length_q * v.shape[-1], length_k, False)
    return [Work("linear", scores.mults + weighted.mults, scores.adds + weighted.adds)]


# the fused kernels F.scaled_dot_product_attention dispatches to (its math fallback is bmm's, counted above)
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_fused_attention_overrideable"):
    register_op_counter(f"aten::{_name}", _count_attention)


def _with_epilogue(conv, out, mults_each, adds_each):
    """[conv, the epilogue's 'other' work] (the epilogue left out when it does no arithmetic)."""
    return [conv] + ([elementwise_work(out.numel(), mults_each, adds_each)] if mults_each or adds_each else [])


@register_op_counter("pyops::conv2d_bn_relu")
def _count_conv2d_bn_relu(a, out):
    # batch norm as an affine map: one scale multiplication and one shift addition; the residual one addition
    return _with_epilogue(_conv_args_work(a, out), out, 1, 1 + (a["residual"] is not None))


@register_op_counter("pyops::conv2d_bias_act")
@register_op_counter("pyops::conv2d_bias_act_packed")  # the same convolution with a prepacked copy of the weight
@register_op_counter("pyops::conv1d_bias_act")
def _count_conv_bias_act(a, out):
    return _with_epilogue(_conv_args_work(a, out), out, 0, int(a["residual"] is not None))


@register_op_counter("pyops::linear_bias_act")
def _count_linear_bias_act(a, out):
    # the Linear's row (addmm's: one added term per output where there is a bias); the activation is no arithmetic
    return [matmul_work("linear", out.numel(), a["weight"].shape[1], a["bias"] is not None)]


@register_op_counter("pyops::conv2d_pack_weight")
def _count_conv2d_pack_weight(a, out):
    return []  # a layout copy of the weight: no arithmetic


@register_op_counter("pyops::conv1d")
def _count_conv1d(a, out):
    return [_conv_args_work(a, out)]


@register_op_counter("pyops::sliding_head")
def _count_sliding_head(a, out):
    # the converted head: the large-kernel conv, then 1x1 convs, each a convolution over every output position and
    # each with its bias add (the op adds one per layer, zeros for a Linear that had none)
    n, _, oh, ow = _shape(out)
    return [matmul_work("conv", n * w.shape[0] * oh * ow, w.shape[1] * w.shape[2] * w.shape[3], True)
            for w in a["weights"]]


@register_op_counter("pyops::smooth_max")
def _count_smooth_max(a, out):
    if math.isinf(a["beta"]):
        return []  # β = ±inf is the max / min: comparisons, no multiplications or additions
    x = a["x"]
    n = x.shape[a["dim"]] if x.dim() else 1
    return [elementwise_work(out.numel(), n + 1, n - 1)]


# ---- the run ---------------------------------------------------------------------------------------------------

def _bind(func, args, kwargs):
    """{schema argument name: value}, defaults filled in."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return next(t for t in out if isinstance(t, torch.Tensor))


class _CountingMode(TorchDispatchMode):
    """Appends a LayerCount for every op call that has a counter, named after the innermost running module."""

    def __init__(self, module_path):
        super().__init__()
        self.module_path = module_path  # the stack the module hooks maintain
        self.rows = []
        self.uncounted = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        counter = _COUNTERS.get(name)
        if counter is None:
            # Inference tensors (made under torch.inference_mode: a model's parameters, its input) carry no autograd
            # keys, so composite ops (aten.conv2d, aten.linear) reach the mode whole, not as the convolution and
            # addmm they decompose into: decomposed here (as FlopCounterMode does), their parts come back counted.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if counter is not None:
            result = _first_tensor(out)
            for work in counter(_bind(func, args, kwargs), result):
                if work.kind not in KINDS:
                    raise ValueError(f"pyops.count_ops: the counter of {name} returned kind {work.kind!r}, "
                                     f"expected one of {KINDS}")
                self.rows.append(LayerCount(self.module_path[-1], work.kind, int(work.mults), int(work.adds),
                                            _shape(result)))
        elif name.startswith("pyops::") or name in FUSED_ARITHMETIC_OPS:
            self.uncounted.add(name)
        return out


def _track_module_path(model, module_path, handles):
    """Forward hooks keeping module_path[-1] the path of the innermost running module; their handles go to
    `handles` as they are made (to be removed whatever happens)."""
    def enter(path):
        def hook(module, args):
            module_path.append(path)  # returns None: a hook's return value would replace the module's input
        return hook

    def leave(module, args, out):
        module_path.pop()

    for path, module in model.named_modules():
        # A scripted submodule takes no hooks: its ops are counted, in the rows of the module that calls it.
        if not isinstance(module, torch.jit.RecursiveScriptModule):
            handles.append(module.register_forward_pre_hook(enter(path)))
            handles.append(module.register_forward_hook(leave, always_call=True))


def count_ops(model, example_input):
    """Multiplications and additions of one forward pass of `model` on `example_input`, per layer and in total.

    Args:
        model: a torch.nn.Module (or any callable; rows are then all named ""). It runs in eval mode (batch norm
            uses its running statistics and does not update them); each module's training flag is restored after.
        example_input: a tensor (N, ...) or a tuple of positional arguments. Its batch size multiplies every count.
    Returns:
        OpCount(conv, linear, other, total, by_layer) with one LayerCount(name, kind, mults, adds, output_shape)
        per counted op call, in execution order. See the module docstring for the conventions.
    """
    if not callable(model):
        raise TypeError(f"argument 'model' must be a torch.nn.Module or callable, got {type(model).__name__}")
    if isinstance(model, torch.jit.RecursiveScriptModule):
        raise TypeError("argument 'model' is a torch.jit.script'ed module: count_ops names rows with module hooks, "
                        "which scripted modules do not take; count the Python module (a torch.jit.trace'd one works, "
                        "its rows all named \"\")")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    is_module = isinstance(model, torch.nn.Module)
    module_path, handles = [""], []
    mode = _CountingMode(module_path)
    # nn.MultiheadAttention / TransformerEncoderLayer's inference fast path is one fused op that hides its
    # projections and attention: turned off, they run as addmm/mm and scaled_dot_product_attention, all counted
    mha_fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        if is_module:
            _track_module_path(model, module_path, handles)
        torch.backends.mha.set_fastpath_enabled(False)
        # (not in inference mode, where the dispatch mode would see aten.conv2d and aten.linear, not the
        # convolution and addmm they decompose into, and count nothing)
        with torch.inference_mode(False), torch.no_grad(), \
                eval_mode(model) if is_module else contextlib.nullcontext(), mode:
            model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(mha_fastpath)
        for handle in handles:
            handle.remove()
    for name in sorted(mode.uncounted):
        warnings.warn(f"pyops.count_ops: no counter for {name}, its arithmetic is not counted "
                      "(add one with pyops.counting.register_op_counter)", stacklevel=2)
    return OpCount.from_rows(mode.rows)
