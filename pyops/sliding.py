"""sliding_classify: a crop classifier applied densely to whole images, equal to evaluating it on every crop.

How (exact=False, the default): the classifier is convolutionalized once (pyops.convolutionalize) and the fully
convolutional network (FCN) runs on the image. Its output (i, j) is the crop at offset (i·Sy, j·Sx), where (Sy, Sx)
is the features' total stride (the product of the pooling / conv strides). Requested offsets that are not multiples
of it come from shift-and-stitch: the FCN runs on the image shifted by each residue (ry, rx) = offset mod S that the
requested stride needs, and the maps are interleaved. We chose it over the à-trous (dilation) rewrite because it
needs no change to the features (any traced feature extractor works as is, pooling with floor rounding included)
and does exactly the work of the requested offsets (the à-trous network computes all S² residues even when a
stride only needs some); both cost the same per output.

Exactness: for features without padding, every FCN output equals the per-crop evaluation (same inputs, same
operations; only the floating-point summation order may differ). Features that pad (or pool with ceil_mode) see
the neighbouring image pixels where a crop sees zeros, so outputs differ within the receptive field of the crop
borders; exact=True evaluates the crops themselves instead, in batches sized to the memory bound. Features that do
not slide at all (a GroupNorm, a mean over the map, an F.pad in forward) are refused by the conversion's probe
(pyops.convolutionalize) where they do not pad; padded features are not probed (their scores differ near the
borders by design; a GroupNorm among them changes every score): use exact=True for those. The model is evaluated
with eval semantics and left as it was, training flags included.

Memory: the output map is tiled (tiles of output positions plus the input halo they need, and batch chunks) so that
the estimated peak of the activations stays under max_memory; tiled and untiled results are identical up to the
summation order (a few ulps in float32: the head's GEMM blocking follows the workspace bound; ≤ 1e-12 relative in
float64).
"""
import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import autocast_mixes, check_floating, int_tuple
from ._overrides import overridable
from ._flags import eval_mode, jit_tracing_paused
from .convolutionalize import FullyConvolutional, _convolutionalize, _cudnn_tf32, _window, fake_run
from .fft_conv import default_fft_size, fft_tile_counts, fft_workspace_bytes
from .sliding_head import PRECISIONS

DEFAULT_MAX_MEMORY = 4 << 30
# Bound of the head op's im2col/activation workspace (the GEMMs are efficient well below it).
_HEAD_WORKSPACE = {"cpu": 256 << 20, "cuda": 1 << 30}
_MIN_GEMM_POSITIONS = 64


@dataclass(frozen=True)
class TilePlan:
    """How one FCN pass is split: `batch` images × `rows` × `cols` output positions per tile, `tiles` tiles, and
    the estimated peak bytes of one tile plus the whole output (what max_memory bounds)."""
    batch: int
    rows: int
    cols: int
    tiles: int
    peak_bytes: int
    head_workspace: int


@overridable
def sliding_classify(model, images, window, stride=1, exact=False, max_memory=DEFAULT_MAX_MEMORY, precision="fp32",
                     algorithm="auto"):
    """Scores of every crop at offsets 0, s, 2s, … of each image, equal to `model` on each crop.

    Args:
        model: a crop classifier nn.Module ((B, C, h, w) → (B, classes)) as pyops.convolutionalize takes it, or
            a FullyConvolutional it returned (reused, not converted again). Evaluated with eval semantics.
        images: (B, C, H, W) floating tensor, H ≥ h and W ≥ w; any strides.
        window: int or (h, w), the crop size.
        stride: int or (sy, sx) ≥ 1, the step between crops.
        exact: evaluate the crops themselves (batched) instead of the FCN: for features with padding.
        max_memory: bound in bytes on the activations of one pass (default 4 GiB; weights not counted).
        precision: "fp32" (exact, TF32 off), "tf32" or "bf16" (CUDA speed; the head's GEMMs in reduced precision).
        algorithm: the head's large-kernel layer by "direct" convolution (im2col + GEMM) or by "fft" (fp32/float64,
            far fewer operations, error of the order of fp32's direct sum; its weight spectra, ~4x the layer's
            weight memory for Net1, are kept on the converted model). "auto" (the default): the FFT on CUDA for
            kernels of at least 16x16 at precision "fp32" (measured faster there), else direct; see
            FullyConvolutional.resolve_algorithm and bench/NOTES-sliding.md.
    Returns:
        (B, classes, ⌊(H−h)/sy⌋+1, ⌊(W−w)/sx⌋+1) in images' dtype.
    Gradients: with grad mode on and `images` requiring grad, autograd records the pass (plain modules, no fused
    head; max_memory then does not bound the activations saved for backward), e.g. for saliency maps. Otherwise it
    runs as inference, whatever the weights' requires_grad.
    """
    window = _window(window)
    if exact:
        max_memory = _check_common(images, window, stride, max_memory, precision)
        if algorithm not in ("auto", "direct"):
            raise ValueError("argument 'algorithm' applies to the FCN head; exact=True runs the model as is")
        if precision == "bf16":
            raise ValueError("argument 'precision' = 'bf16' applies to the FCN head; exact=True runs the model as is")
        if not isinstance(model, nn.Module) or isinstance(model, FullyConvolutional):
            raise TypeError("argument 'model' must be the crop classifier (nn.Module) for exact=True")
        with eval_mode(model):  # (its size probe too: a train-mode BatchNorm would count that run)
            return _crop_batches(model, images, window, _pair(stride, "stride"), max_memory, precision)
    # (converted for the images' channels: the model's first layer need not take them, e.g. after a PixelUnshuffle)
    channels = images.shape[1] if isinstance(images, torch.Tensor) and images.dim() == 4 else None
    fcn = model if isinstance(model, FullyConvolutional) else _convolutionalize(model, window, channels, "images")
    if fcn.window != window:
        raise ValueError(f"argument 'window' = {window} differs from the window {fcn.window} the model was "
                         "converted for")
    return classify_fcn(fcn, images, stride, max_memory, precision, algorithm)


@overridable
def classify_fcn(fcn, images, stride=1, max_memory=DEFAULT_MAX_MEMORY, precision="fp32", algorithm="auto"):
    """sliding_classify with an already converted FullyConvolutional (shift-and-stitch over tiled FCN passes),
    evaluated with eval semantics whatever its mode (a SlidingClassifier inside a model being trained: no dropout,
    BatchNorm's running statistics, left unchanged). The call holds the modules' training flags at False and
    restores them at its end: a train()/eval() switch made by another thread during a call is not supported (it
    acts on the running call and is then undone)."""
    with eval_mode(fcn):
        return _classify_fcn(fcn, images, stride, max_memory, precision, algorithm)


def _classify_fcn(fcn, images, stride, max_memory, precision, algorithm):
    max_memory = _check_common(images, fcn.window, stride, max_memory, precision)
    algorithm = fcn.resolve_algorithm(algorithm, precision, images)
    if images.shape[1] != fcn.in_channels:
        raise ValueError(f"argument 'images' has {images.shape[1]} channels but the model takes {fcn.in_channels}")
    param = next(fcn.parameters())
    if images.device != param.device or (images.dtype != param.dtype and not autocast_mixes(images, param)):
        raise TypeError(f"argument 'images' is {images.dtype} on {images.device} but the model is {param.dtype} on "
                        f"{param.device}")
    if fcn.padded:
        warnings.warn("pyops.sliding_classify: the model's features pad, so the fully convolutional scores differ "
                      "from per-crop evaluation near the crop borders; pass exact=True to evaluate the crops",
                      stacklevel=3)
    (h, w), (sy, sx), (Sy, Sx) = fcn.window, _pair(stride, "stride"), fcn.stride
    # Plain ints: the tiling plan and the stitching depend on the sizes, so a traced call (torch.export,
    # torch.compile) specializes on them; an export that declares them dynamic fails naming the dimension.
    B, _, H, W = (int(d) for d in images.shape)
    ny, nx = (H - h) // sy + 1, (W - w) // sx + 1
    if B == 0:
        classes = [m for m in fcn.head if isinstance(m, nn.Conv2d)][-1].out_channels
        return _connected(images.new_empty(0, classes, ny, nx), images)
    # One plan for every residue: the shifted images are no larger than the whole one, and a plan's tiles fit
    # the bound on any smaller image too.
    plan = cached_plan(fcn, (B, int(images.shape[1]), H, W), images.dtype, images.device, max_memory, algorithm)
    if (sy, sx) == (Sy, Sx):  # the requested offsets are the FCN's own grid: its map is the answer, no stitching
        with _autograd_if_wanted(images):
            return fcn_map(fcn, images, plan, precision, algorithm)
    out = None
    with _autograd_if_wanted(images):
        for rows, map_rows, ry, last_y in _residue_classes(ny, sy, Sy):
            for cols, map_cols, rx, last_x in _residue_classes(nx, sx, Sx):
                # The image shifted by (ry, rx), cut to the last crop this residue needs.
                scores = fcn_map(fcn, images[:, :, ry:last_y + h, rx:last_x + w], plan, precision, algorithm)
                if out is None:
                    out = scores.new_empty(B, scores.shape[1], ny, nx)
                out[:, :, rows, cols] = scores[:, :, map_rows, map_cols]
    return out


def _autograd_if_wanted(images):
    """Grad mode as sliding_classify documents it: on only where the caller wants gradients for the images."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad)


def _residue_classes(n, s, S):
    """The crops at offsets i·s (i < n) grouped by their offset's residue r mod S, the FCN's total stride: for each
    class (its indices i as a slice, the FCN map's indices (i·s − r)/S as a slice, r, the class's last offset).
    Both are arithmetic progressions (i steps by S/g, the map by s/g, g = gcd(s, S)): plain slices, no gather, and
    Python ints throughout, so the same code traces (torch.export, torch.compile) without data-dependent values."""
    g = math.gcd(s, S)
    step_i, step_j = S // g, s // g
    classes = []
    for i0 in range(min(n, step_i)):  # one period of residues: i0 and i0 + S/g share theirs
        r = i0 * s % S
        count = len(range(i0, n, step_i))
        j0 = (i0 * s - r) // S
        last = (i0 + (count - 1) * step_i) * s
        classes.append((slice(i0, n, step_i), slice(j0, j0 + (count - 1) * step_j + 1, step_j), r, last))
    return classes


def fcn_map(fcn, x, plan, precision="fp32", algorithm="direct"):
    """The FCN on x (B, C, H, W) → (B, classes, ⌊(H−h)/Sy⌋+1, ⌊(W−w)/Sx⌋+1), computed tile by tile per the
    TilePlan (of plan_tiles): a tile of output rows [i0, i1) needs input rows [i0·Sy, (i1−1)·Sy + h)."""
    (h, w), (Sy, Sx) = fcn.window, fcn.stride
    B, _, H, W = x.shape
    my, mx = (H - h) // Sy + 1, (W - w) // Sx + 1
    out = None
    for b0 in range(0, B, plan.batch):
        for i0 in range(0, my, plan.rows):
            i1 = min(my, i0 + plan.rows)
            for j0 in range(0, mx, plan.cols):
                j1 = min(mx, j0 + plan.cols)
                tile = x[b0:b0 + plan.batch, :, i0 * Sy:(i1 - 1) * Sy + h, j0 * Sx:(j1 - 1) * Sx + w]
                scores = fcn(tile, precision, plan.head_workspace, algorithm)
                if plan.batch >= B and plan.rows >= my and plan.cols >= mx:
                    return scores  # one tile covers x
                if out is None:
                    out = scores.new_empty(B, scores.shape[1], my, mx)
                out[b0:b0 + plan.batch, :, i0:i1, j0:j1] = scores
    return out


def cached_plan(fcn, shape, dtype, device, max_memory, algorithm="direct"):
    """plan_tiles, remembered per (shape, dtype, device, bound, algorithm) on the FullyConvolutional: a module
    applied to same-sized images plans once (the fake runs cost milliseconds per call)."""
    key = (tuple(shape), dtype, torch.device(device), max_memory, algorithm)
    cache = fcn.__dict__.setdefault("_plans", {})
    plan = cache.get(key)  # read once: another thread may clear the cache meanwhile
    if plan is None:
        if len(cache) >= 32:
            cache.clear()
        with jit_tracing_paused():  # torch.jit.trace: planning is no part of the graph (its sizes stay ints)
            plan = cache[key] = plan_tiles(fcn, shape, dtype, device, max_memory, algorithm)
    return plan


def plan_tiles(fcn, shape, dtype, device, max_memory=DEFAULT_MAX_MEMORY, algorithm="direct"):
    """The largest tiles whose estimated peak memory fits max_memory.

    Shrinks, in this order: the head op's workspace (positions per GEMM, down to _MIN_GEMM_POSITIONS: no recompute),
    the spatial tile (halving its longer side: each tile recomputes the features of its halo), the batch chunk,
    and finally the workspace below _MIN_GEMM_POSITIONS. The estimate comes from fake runs of the features (no
    memory, no compute): the input tile, plus the larger of the largest input+output of any feature layer and the
    feature map + the head's workspace + the tile's scores, plus the whole output map. Raises ValueError when even
    one position of one image does not fit. With algorithm="fft" the head also holds the FFT layer's workspace
    (fft_workspace_bytes per overlap-save tile) and its full output map."""
    (h, w), (Sy, Sx) = fcn.window, fcn.stride
    B, C, H, W = shape
    my, mx = (H - h) // Sy + 1, (W - w) // Sx + 1
    elem = torch.empty(0, dtype=dtype).element_size()
    head_convs = [m for m in fcn.head if isinstance(m, nn.Conv2d)]
    classes, widest = head_convs[-1].out_channels, max(c.out_channels for c in head_convs)
    per_position = (head_convs[0].weight[0].numel() + 2 * widest) * elem  # what the op holds per GEMM column
    first = head_convs[0]
    if algorithm == "fft":  # the op then runs the 1x1 layers only: its im2col copies one position's channels
        per_position = 3 * widest * elem
        fft_size = default_fft_size(max(first.kernel_size))
        fft_tile = fft_workspace_bytes(first.in_channels, first.out_channels, fft_size, first.kernel_size, elem)
    out_bytes = B * classes * my * mx * elem
    cap = min(_HEAD_WORKSPACE.get(torch.device(device).type, 256 << 20), max_memory // 4)
    b, rows, cols = B, my, mx
    gemm_positions = max(1, min(B * my * mx, cap // per_position))
    while True:
        in_shape = (b, C, (rows - 1) * Sy + h, (cols - 1) * Sx + w)
        feat_peak, fmap_bytes = _layer_peak(fcn.features, in_shape, dtype, device)
        positions = b * rows * cols
        gemm_positions = min(gemm_positions, positions)
        head_peak = fmap_bytes + gemm_positions * per_position + positions * classes * elem
        if algorithm == "fft":
            ny, nx = fft_tile_counts(rows, cols, fft_size, first.kernel_size)
            head_peak += b * ny * nx * fft_tile + positions * first.out_channels * elem
        peak = math.prod(in_shape) * elem + max(feat_peak, head_peak) + out_bytes
        if peak <= max_memory:
            tiles = math.ceil(B / b) * math.ceil(my / rows) * math.ceil(mx / cols)
            return TilePlan(b, rows, cols, tiles, peak, gemm_positions * per_position)
        if gemm_positions > _MIN_GEMM_POSITIONS and head_peak > feat_peak:
            gemm_positions = max(_MIN_GEMM_POSITIONS, gemm_positions // 2)
        elif rows > 1 or cols > 1:
            if rows >= cols:
                rows = (rows + 1) // 2
            else:
                cols = (cols + 1) // 2
        elif b > 1:
            b = (b + 1) // 2
        elif gemm_positions > 1:
            gemm_positions //= 2
        else:
            raise ValueError(f"argument 'max_memory' = {max_memory} bytes is below the {peak} bytes that one output "
                             "position of one image needs")


def _layer_peak(module, shape, dtype, device):
    """(largest input + output bytes of any leaf module, bytes of the final output) of module on a fake input."""
    peak = [0]

    def hook(mod, inputs, output):
        size = sum(t.numel() * t.element_size() for t in (*inputs, output) if isinstance(t, torch.Tensor))
        peak[0] = max(peak[0], size)

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        out = fake_run(module, shape, dtype, device)
    finally:
        for hd in handles:
            hd.remove()
    out_bytes = out.numel() * out.element_size()
    return max(peak[0], out_bytes), out_bytes


def _connected(empty, images):
    """An empty result, in the autograd graph of `images` where it records (as the model's own output on an empty
    batch is): adding images.sum(), 0, changes nothing else."""
    if torch.is_grad_enabled() and images.requires_grad:
        return empty + images.sum().to(empty.dtype)
    return empty


def _crop_batches(model, images, window, stride, max_memory, precision):
    """exact=True: the model on the crops themselves, gathered (unfold) in batches whose estimated peak fits."""
    (h, w), (sy, sx) = window, stride
    B, C = images.shape[:2]
    crops = images.unfold(2, h, sy).unfold(3, w, sx).permute(0, 2, 3, 1, 4, 5)  # (B, ny, nx, C, h, w), a view
    ny, nx = crops.shape[1:3]
    n = B * ny * nx
    if n == 0:  # (a model's own view(x.size(0), -1) cannot reshape an empty batch: the classes from a fake run)
        probe = fake_run(model, (1, C, h, w), images.dtype, images.device)
        return _connected(images.new_empty((B, probe.shape[-1], ny, nx), dtype=probe.dtype), images)
    peak_one, out_one = _layer_peak(model, (1, C, h, w), images.dtype, images.device)
    per_crop = peak_one + C * h * w * images.element_size()  # + the gathered crop itself
    out_bytes = out_one * n
    chunk = (max_memory - out_bytes) // per_crop
    if chunk < 1:
        raise ValueError(f"argument 'max_memory' = {max_memory} bytes is below the {per_crop + out_bytes} bytes "
                         "that one crop needs")
    parts = []
    with _autograd_if_wanted(images), _cudnn_tf32(precision == "tf32"):
        for c0 in range(0, n, chunk):
            k = torch.arange(c0, min(n, c0 + chunk), device=images.device)
            # gathers only this chunk, as NCHW crops whatever the images' layout (a channels_last gather kept it,
            # and a classifier flattening with .view(n, -1) failed on it)
            parts.append(model(crops[k // (ny * nx), (k // nx) % ny, k % nx].contiguous()))
    scores = torch.cat(parts)
    return scores.view(B, ny, nx, scores.shape[-1]).permute(0, 3, 1, 2)


def _pair(v, name):
    return int_tuple(v, name, 2, 1)


def _check_common(images, window, stride, max_memory, precision):
    check_floating(images, "images")
    if images.dim() != 4:
        raise ValueError(f"argument 'images' must have 4 dimensions (B, C, H, W), got shape {tuple(images.shape)}")
    h, w = window
    if images.shape[2] < h or images.shape[3] < w:
        raise ValueError(f"argument 'images' is {images.shape[2]}x{images.shape[3]}, smaller than the {h}x{w} "
                         "argument 'window'")
    _pair(stride, "stride")
    if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Integral) or max_memory <= 0:
        raise ValueError(f"argument 'max_memory' must be a positive int (bytes), got {max_memory!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"argument 'precision' must be one of {PRECISIONS}, got {precision!r}")
    return int(max_memory)  # (a numpy integer as a Python int: it reaches the op's int argument)
