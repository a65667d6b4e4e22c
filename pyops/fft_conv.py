"""The large-kernel layer of a sliding head by FFT: far fewer operations than the direct convolution.

Issue 5's stretch. The converted classifier's first layer is a valid cross-correlation with a kernel as large as
the crop's feature map (Net1: 256 → 4096 channels, 18×18). Direct: C·kh·kw multiply-adds per output value and
channel. By FFT, with overlap-save tiles of T×T input positions (output tiles of (T−kh+1)×(T−kw+1)):

    out_tile[b, o] = irfft2( Σ_c rfft2(x_tile[b, c]) · conj(rfft2(w[o, c] zero-padded to T×T)) ), first rows/cols

(a circular correlation of size T equals the linear one on the positions that do not wrap). Per tile: C real FFTs
in, one complex GEMM per frequency bin ((tiles, C) × (C, O), T·(T/2+1) bins), O inverse FFTs. The weight spectra
are computed once: T·(T/2+1)·C·O complex values, ~T²/(kh·kw) times the weight's memory (Net1 with T = 36:
5.3 GiB next to its 1.27 GiB weight, ~35 s to compute on our 2-core CPU). Measured on that CPU for a 48×48 image's
34×34 features: 0.50 s vs 2.2 s for the direct convolution (4.4×); on an H200: 1.5 ms vs cuDNN's 29.6 ms (19.8×;
bench/NOTES-sliding.md). sliding_classify takes it by default on CUDA (algorithm="auto"), where the spectra take
milliseconds to make; on the CPU their set-up time and memory keep it opt-in (algorithm="fft").

Exactness: not bitwise the direct sum, but as close to the float64 result as fp32's own direct convolution is:
max error 1.4-2.7e-7 of the output's scale in fp32 where F.conv2d in fp32 gives 1.8e-7-1.8e-6 (the FFT's error
grows with log T, a direct sum's with the reduction length; tests/test_fft_conv.py bounds both at 2e-6); fp64
inputs are transformed in complex128 (~1e-15). The scale is the tile's, not each output's: every output of an
overlap-save tile carries an error relative to the largest values in that tile's input. So a direct convolution's
outputs are better for maps whose values differ by many orders of magnitude (one value of 1e20 put errors of 4e13
on outputs of size ~1 in its tile), and a NaN or inf in the input turns its whole tile's outputs NaN, where a
direct convolution makes only the outputs whose windows see it non-finite.
"""
import warnings

import torch

from ._checks import as_int
from ._flags import tf32
from ._scripting import NotScriptable

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_FAST_SIZES = sorted({2**a * 3**b * 5**c for a in range(9) for b in range(6) for c in range(4)})


def default_fft_size(kernel):
    """The smallest size with only factors 2, 3, 5 that is ≥ 2·kernel − 2 (output tiles about as wide as the
    kernel: fewer tiles than a smaller FFT, fewer spectra bins than a larger one)."""
    return next(n for n in _FAST_SIZES if n >= max(2 * kernel - 2, kernel))


def fft_workspace_bytes(in_channels, out_channels, fft_size, kernel_size, element_size):
    """Estimated peak bytes FFTConv2d.forward allocates per overlap-save tile: the tile, its spectra (and their
    transposed copy), the per-bin products (and theirs), the inverse transforms and the cropped output copies."""
    (kh, kw), bins = kernel_size, fft_size * (fft_size // 2 + 1)
    th, tw = fft_size - kh + 1, fft_size - kw + 1
    complex_size = 2 * element_size
    return (in_channels * fft_size ** 2 * element_size + 2 * in_channels * bins * complex_size
            + 2 * out_channels * bins * complex_size + out_channels * fft_size ** 2 * element_size
            + 2 * out_channels * th * tw * element_size)


def fft_tile_counts(out_h, out_w, fft_size, kernel_size):
    """(ny, nx): overlap-save tiles of an (out_h, out_w) output map."""
    (kh, kw) = kernel_size
    return -(-out_h // (fft_size - kh + 1)), -(-out_w // (fft_size - kw + 1))


class FFTConv2d(NotScriptable, torch.nn.Module):
    """Valid cross-correlation of (B, C, H, W) with a (O, C, kh, kw) weight, plus bias: (B, O, H−kh+1, W−kw+1).

    weight, bias: as nn.Conv2d's (stride 1, no padding, no dilation, groups 1); float32 or float64.
    fft_size: T (≥ kh and kw), default default_fft_size(max(kh, kw)).
    The weight's spectra (T·(T/2+1), C, O) are computed once here (in chunks of output channels) and kept; the
    weight itself is not: they are the layer's state (state_dict holds them and the bias). Inference only (no
    autograd through the cached spectra). .to()/.double()/.float()/.cuda() move and convert the spectra with the
    bias (complex64 for float32, complex128 for float64); other dtypes are refused.
    """

    def __init__(self, weight, bias=None, fft_size=None):
        super().__init__()
        if weight.dim() != 4 or not weight.is_floating_point() or weight.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"argument 'weight' must be a float32/float64 (O, C, kh, kw) tensor, got "
                             f"{weight.dtype} of shape {tuple(weight.shape)}")
        if weight.numel() == 0:
            raise ValueError(f"argument 'weight' has no elements (shape {tuple(weight.shape)}): the FFT needs "
                             "input and output channels and a non-empty kernel")
        out_ch, in_ch, kh, kw = weight.shape
        size = default_fft_size(max(kh, kw)) if fft_size is None else as_int(fft_size, "fft_size")
        if size < max(kh, kw):
            raise ValueError(f"argument 'fft_size' = {size} must be >= the kernel size {(kh, kw)}")
        if bias is not None and bias.shape != (out_ch,):
            raise ValueError(f"argument 'bias' must have shape ({out_ch},), got {tuple(bias.shape)}")
        if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
            raise TypeError(f"argument 'bias' is {bias.dtype} on {bias.device} but 'weight' is {weight.dtype} on "
                            f"{weight.device}")
        self.kernel_size, self.fft_size, self.in_channels, self.out_channels = (kh, kw), size, in_ch, out_ch
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        spectra = torch.empty(size * (size // 2 + 1), in_ch, out_ch, device=weight.device,
                              dtype=_COMPLEX_OF[weight.dtype])
        with torch.no_grad():
            chunk = max(1, (64 << 20) // max(1, in_ch * size * size * weight.element_size()))  # ~64 MB of padding
            for o in range(0, out_ch, chunk):
                w = weight[o:o + chunk]
                # conj(rfft2(w)) turns the FFT's convolution into the cross-correlation conv2d computes
                spec = torch.fft.rfft2(w, s=(size, size)).conj()  # (o, C, T, T/2+1)
                spectra[:, :, o:o + w.shape[0]] = spec.flatten(2).permute(2, 1, 0)
        # persistent: loading another layer's state_dict must bring its spectra with its bias (with the bias alone
        # the loaded layer silently mixed the two layers)
        self.register_buffer("spectra", spectra)

    def _apply(self, fn, recurse=True):
        # Module's conversions misjudge complex buffers: .double()/.float() skip them (the bias changed dtype, the
        # spectra did not) and .to(float64) makes them real, dropping the imaginary parts. The spectra follow the
        # real dtype fn gives the weight's (what fn makes of an empty tensor of it) as its complex counterpart.
        spectra = self.spectra
        probe = fn(torch.empty(0, dtype=spectra.real.dtype, device=spectra.device))
        target = _COMPLEX_OF.get(probe.dtype)
        if target is None:
            raise TypeError(f"FFTConv2d computes in float32 or float64 (spectra in complex64 or complex128); it "
                            f"cannot be converted to {probe.dtype}")
        with warnings.catch_warnings():  # (.to(float64) of a complex tensor warns that it drops the imaginary part)
            warnings.simplefilter("ignore", UserWarning)
            keeps_complex = fn(torch.empty(0, dtype=spectra.dtype, device=spectra.device)).dtype == target
        # fn itself where it keeps them complex of the right kind (.cuda(), share_memory_(), ...), else a conversion
        converted = fn(spectra) if keeps_complex else spectra.to(device=probe.device, dtype=target)
        self._buffers["spectra"] = None  # (the bias goes through Module's own conversion)
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers["spectra"] = spectra
            raise
        self._buffers["spectra"] = converted
        return self

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"argument 'x' must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.dtype != self.spectra.real.dtype or x.device != self.spectra.device:
            raise ValueError(f"argument 'x' must be {self.spectra.real.dtype} on {self.spectra.device}, got "
                             f"{x.dtype} on {x.device}")
        (kh, kw), size = self.kernel_size, self.fft_size
        b, c, h, w = x.shape
        if h < kh or w < kw:
            raise ValueError(f"argument 'x' has a {h}x{w} map, smaller than the {kh}x{kw} kernel")
        oh, ow = h - kh + 1, w - kw + 1
        if b == 0:  # (the FFT libraries refuse zero transforms)
            return x.new_empty(0, self.out_channels, oh, ow)
        th, tw = size - kh + 1, size - kw + 1  # output positions per tile
        ny, nx = fft_tile_counts(oh, ow, size, (kh, kw))
        # Tiles of T×T input positions at steps of the output tile; zero padding past the map's end feeds only
        # output positions that are cut off below.
        padded = torch.nn.functional.pad(x, (0, nx * tw + kw - 1 - w, 0, ny * th + kh - 1 - h))
        tiles = padded.unfold(2, size, th).unfold(3, size, tw)  # (B, C, ny, nx, T, T)
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(b * ny * nx, c, size, size)
        spec = torch.fft.rfft2(tiles)  # (tiles, C, T, T/2+1)
        spec = spec.flatten(2).permute(2, 0, 1)  # (bins, tiles, C)
        with tf32("matmul", False):  # full fp32, whatever the caller set
            prod = torch.bmm(spec, self.spectra)  # (bins, tiles, O): one complex GEMM per frequency bin
        prod = prod.permute(1, 2, 0).reshape(b * ny * nx, self.out_channels, size, size // 2 + 1)
        out = torch.fft.irfft2(prod, s=(size, size))[..., :th, :tw]  # (tiles, O, th, tw)
        out = out.reshape(b, ny, nx, self.out_channels, th, tw).permute(0, 3, 1, 4, 2, 5)
        out = out.reshape(b, self.out_channels, ny * th, nx * tw)[:, :, :oh, :ow]
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.contiguous()

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"fft_size={self.fft_size}, bias={self.bias is not None}")
