"""pyops.fft_conv.FFTConv2d (issue 5's stretch: the large-kernel layer by FFT) against float64 convolutions."""
import pytest
import torch
import torch.nn.functional as F

from pyops.fft_conv import FFTConv2d, default_fft_size


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("b,c,o,k,h,w,fft_size", [
    (2, 5, 7, 18, 34, 34, None),   # Net1's layer in small: one tile
    (1, 3, 4, 5, 23, 17, None),    # several tiles, a partial last tile in each direction
    (3, 4, 6, 3, 9, 11, 4),        # the smallest FFT (output tiles of 2x2)
    (1, 8, 8, 18, 50, 61, 36),     # a larger image: 2x3 tiles
    (2, 4, 3, (4, 7), 12, 20, None),
])
def test_fft_conv_matches_the_float64_convolution(b, c, o, k, h, w, fft_size):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(b, c, h, w, generator=gen(0), dtype=torch.float64)
    weight = torch.randn(o, c, kh, kw, generator=gen(1), dtype=torch.float64)
    bias = torch.randn(o, generator=gen(2), dtype=torch.float64)
    ref = F.conv2d(x, weight, bias)
    scale = ref.abs().max().item()
    out64 = FFTConv2d(weight, bias, fft_size)(x)
    assert out64.shape == ref.shape and out64.dtype == torch.float64
    assert (out64 - ref).abs().max().item() <= 1e-13 * scale
    # fp32: within what fp32's own direct convolution reaches (both ~1e-7..1e-6 of the output's scale)
    out32 = FFTConv2d(weight.float(), bias.float(), fft_size)(x.float())
    assert out32.dtype == torch.float32 and out32.is_contiguous()
    assert (out32.double() - ref).abs().max().item() <= 2e-6 * scale


def test_fft_conv_without_bias_and_default_sizes():
    assert default_fft_size(18) == 36 and default_fft_size(3) == 4 and default_fft_size(1) == 1
    x, weight = torch.randn(1, 2, 10, 10, generator=gen(3)), torch.randn(3, 2, 4, 4, generator=gen(4))
    layer = FFTConv2d(weight)
    torch.testing.assert_close(layer(x), F.conv2d(x, weight), rtol=1e-5, atol=1e-5)
    assert "fft_size=6" in repr(layer)
    assert layer(x[:0]).shape == (0, 3, 7, 7)  # an empty batch: an empty output, as F.conv2d gives


def test_fft_conv_rejects_bad_arguments():
    weight = torch.randn(3, 2, 4, 4)
    with pytest.raises(ValueError, match="fft_size"):
        FFTConv2d(weight, fft_size=3)
    for not_an_int in (8.9, "8"):  # (int() made them 8)
        with pytest.raises(TypeError, match="'fft_size' must be an int"):
            FFTConv2d(weight, fft_size=not_an_int)
    with pytest.raises(ValueError, match="bias"):
        FFTConv2d(weight, torch.randn(4))
    with pytest.raises(ValueError, match="weight"):
        FFTConv2d(weight.half())
    with pytest.raises(TypeError, match="'bias' is torch.float64"):  # (the output silently became float64)
        FFTConv2d(weight, torch.randn(3, dtype=torch.float64))
    for empty in (weight[:, :0], weight[:0], weight[:, :, :0, :0]):
        with pytest.raises(ValueError, match="no elements"):  # (an MKL configuration error)
            FFTConv2d(empty)
    layer = FFTConv2d(weight)
    with pytest.raises(ValueError, match="'x'"):
        layer(torch.randn(1, 3, 8, 8))  # channel mismatch
    with pytest.raises(ValueError, match="smaller"):
        layer(torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.randn(1, 2, 8, 8, dtype=torch.float64))


def test_fft_conv_converts_its_spectra_with_the_bias():
    """.double()/.float() skipped the complex spectra (bias and spectra then disagreed) and .to(float64) made them
    real (dropping the imaginary parts): the spectra follow the bias as its complex counterpart."""
    weight, bias = torch.randn(3, 2, 4, 4, generator=gen(5)), torch.randn(3, generator=gen(6))
    x = torch.randn(1, 2, 10, 9, generator=gen(7), dtype=torch.float64)
    ref = F.conv2d(x, weight.double(), bias.double())
    layer = FFTConv2d(weight, bias)
    for convert, dtype in [(lambda m: m.double(), torch.float64), (lambda m: m.float(), torch.float32),
                           (lambda m: m.to(torch.float64), torch.float64), (lambda m: m.to(dtype=torch.float32),
                                                                            torch.float32)]:
        assert convert(layer) is layer
        assert layer.bias.dtype == dtype and layer.spectra.dtype == (
            torch.complex128 if dtype == torch.float64 else torch.complex64)
        out = layer(x.to(dtype))
        assert out.dtype == dtype
        assert (out.double() - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()  # (spectra made in fp32)
    with pytest.raises(TypeError, match="float16"):
        layer.half()
    assert layer.bias.dtype == torch.float32 and layer.spectra.dtype == torch.complex64  # left as it was


def test_fft_conv_state_dict_carries_the_spectra():
    """The spectra are the layer's weights: loading another layer's state_dict brings them with its bias (with the
    bias alone, the loaded layer mixed the two layers)."""
    x = torch.randn(1, 2, 10, 10, generator=gen(8))
    w1, b1, w2, b2 = (torch.randn(s, generator=gen(9 + i)) for i, s in enumerate([(3, 2, 4, 4), (3,)] * 2))
    source, target = FFTConv2d(w1, b1), FFTConv2d(w2, b2)
    assert set(source.state_dict()) == {"bias", "spectra"}
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), F.conv2d(x, w1, b1), rtol=1e-5, atol=1e-5)
