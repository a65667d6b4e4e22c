"""convolutionalize / sliding_classify / SlidingClassifier / the sliding_head op, against the per-crop loop."""

import copy

import pytest
import torch
from torch import nn

import pyops
from pyops import reference
from pyops._checks import convolution_autocast_dtype
from pyops.sliding import plan_tiles
from conftest import run_in_threads, tolerances


def rand(shape, dtype=torch.float64, device="cpu", seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


def mse(a, b):
    return (a.double() - b.double()).pow(2).mean().item()


def randomize_bn(model, seed=1):
    """Non-trivial running statistics and affine parameters, so folding them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


class PoolNet(nn.Module):
    """A 24×24 crop classifier whose features downsample by 4 (two MaxPool2d(2)) and hold a BatchNorm2d; its head
    has a BatchNorm1d after the first Linear and Dropout; flattens with torch.flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3))
        self.fc1, self.bn = nn.Linear(8 * 2 * 2, 16), nn.BatchNorm1d(16)
        self.drop, self.fc2 = nn.Dropout(0.3), nn.Linear(16, 5)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def strided_net():
    """A 21×21 crop classifier with a strided conv and an AvgPool2d (total stride 6), a BatchNorm1d before its
    second Linear, flattened by nn.Flatten."""
    return nn.Sequential(nn.Conv2d(3, 5, 3, stride=2), nn.ReLU(), nn.AvgPool2d(3), nn.Conv2d(5, 6, 2), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 12), nn.ReLU(), nn.BatchNorm1d(12), nn.Linear(12, 4))


def padded_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, 3))


def eval64(model):
    torch.manual_seed(0)
    return randomize_bn(model).double().eval()


# ---- convolutionalize ---------------------------------------------------------------------------------------------

def test_net1_convolutionalize_equal_on_32x32():
    net1 = reference.homework_net1(small=True, dtype=torch.float64)
    before = {k: v.clone() for k, v in net1.state_dict().items()}
    fcn = pyops.convolutionalize(net1, 32)
    assert not any(isinstance(m, nn.Linear) for m in fcn.modules())
    assert fcn.stride == (1, 1) and fcn.window == (32, 32) and not fcn.padded
    x = rand((3, 3, 32, 32))
    with torch.no_grad():
        out, ref = fcn(x), net1(x)
    assert out.shape == (3, 10, 1, 1)
    assert mse(out.flatten(1), ref) < 1e-12
    torch.testing.assert_close(out.flatten(1), ref, rtol=1e-10, atol=1e-12)
    # the input model is untouched: same modules, same values, and no shared parameter storage
    assert isinstance(net1.classifier[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in net1.state_dict().items())
    ours = {p.data_ptr() for p in fcn.parameters()}
    assert not ours & {p.data_ptr() for p in net1.parameters()}


def test_homework_36x38_map_equals_crop_loop():
    net1 = reference.homework_net1(small=True, dtype=torch.float64)
    x = rand((2, 3, 36, 38), seed=1)
    scores = pyops.sliding_classify(net1, x, 32)
    ref = reference.crop_loop(net1, x, 32)
    assert scores.shape == (2, 10, 5, 7) == ref.shape
    assert mse(scores, ref) < 1e-12
    torch.testing.assert_close(scores, ref, rtol=1e-10, atol=1e-12)


def test_hand_written_net2_lives_with_net1_and_equals_crop_loop(device):
    net1 = reference.homework_net1(small=True, dtype=torch.float64).to(device)
    net2 = reference.homework_net2(net1)
    assert all(p.device == net1.features[0].weight.device for p in net2.parameters())
    x = rand((1, 3, 36, 38), seed=3).to(device)
    with torch.no_grad():
        torch.testing.assert_close(net2(x), reference.crop_loop(net1, x, 32), rtol=1e-10, atol=1e-12)


def test_full_size_net1_36x38():
    """The homework's Net1 at full size (340M weights in its first Linear), fp32: one pass vs the 35 crops (in one
    batched call here: the one-crop-at-a-time loop reads the 1.36 GB Linear 35 times; the small Net1 tests it)."""
    net1 = reference.homework_net1()
    x = rand((1, 3, 36, 38), torch.float32, seed=2)
    scores = pyops.sliding_classify(net1, x, 32)
    ref = reference.crop_batch(net1, x, 32)
    assert scores.shape == (1, 10, 5, 7)
    assert mse(scores, ref) < 1e-12
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make,window,size", [(PoolNet, 24, (31, 33)), (strided_net, 21, (29, 32))])
@pytest.mark.parametrize("stride", [1, 2, 3, 4, (2, 3)])
def test_downsampling_features_equal_crop_loop_at_every_offset(make, window, size, stride):
    model = eval64(make())
    x = rand((1, 3) + size, seed=3)
    scores = pyops.sliding_classify(model, x, window, stride)
    ref = reference.crop_loop(model, x, window, stride)
    assert scores.shape == ref.shape
    torch.testing.assert_close(scores, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("exact,stride", [(False, 1), (False, 6), (True, 2)])  # stitched, the FCN's grid, crops
def test_gradients_reach_images_that_require_them(exact, stride):
    """With images requiring grad the pass is recorded: the images' gradient equals the crop loop's (float64);
    without, it runs as inference (no graph), whatever the weights' requires_grad."""
    model = eval64(strided_net())
    x = rand((2, 3, 29, 32), seed=5).requires_grad_()
    crops = [[model(x[:, :, i:i + 21, j:j + 21]) for j in range(0, 32 - 21 + 1, stride)]
             for i in range(0, 29 - 21 + 1, stride)]
    loop = torch.stack([torch.stack(row, -1) for row in crops], -2)  # reference.crop_loop, with autograd
    weight = rand(loop.shape, seed=6)
    (expected,) = torch.autograd.grad((loop * weight).sum(), x)
    (got,) = torch.autograd.grad((pyops.sliding_classify(model, x, 21, stride, exact=exact) * weight).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not pyops.sliding_classify(model, x.detach(), 21, stride, exact=exact).requires_grad


def test_total_stride_is_inferred():
    assert pyops.convolutionalize(eval64(PoolNet()), 24).stride == (4, 4)
    assert pyops.convolutionalize(eval64(strided_net()), 21).stride == (6, 6)


def test_any_integer_total_stride_is_inferred():
    """Total strides with large prime factors (27 = 3·3·3 over three convs, 11 in one) are found, not refused."""
    torch.manual_seed(0)
    for layers, window in (([nn.Conv2d(1, 2, 3, stride=3), nn.Conv2d(2, 2, 3, stride=3),
                             nn.Conv2d(2, 2, 3, stride=3)], 27), ([nn.Conv2d(1, 2, 11, stride=11)], 22)):
        features = nn.Sequential(*layers)
        classes_in = features(torch.zeros(1, 1, window, window)).numel()
        model = eval64(nn.Sequential(features, nn.Flatten(), nn.Linear(classes_in, 3)))
        x = rand((1, 1, window + 30, window + 25), seed=2)
        assert pyops.convolutionalize(model, window).stride == (window // (2 if window == 22 else 1),) * 2
        torch.testing.assert_close(pyops.sliding_classify(model, x, window), reference.crop_loop(model, x, window),
                                   rtol=1e-10, atol=1e-12)


class _Center(nn.Module):
    def forward(self, x):
        return x - x.mean((2, 3), keepdim=True)


class _PadInForward(nn.Module):
    def forward(self, x):
        return nn.functional.pad(x, (1, 1, 1, 1))


class _SwapHW(nn.Module):
    def forward(self, x):
        return x.transpose(2, 3)


@pytest.mark.parametrize("layer", [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), _Center(), _PadInForward(), _SwapHW()],
                         ids=["GroupNorm", "InstanceNorm2d", "mean over HxW", "F.pad in forward", "H/W transpose"])
def test_features_that_do_not_slide_are_refused(layer):
    """Features that look past a crop or at the whole map: the FCN's map is not the per-crop scores, and no list of
    layers could tell (an F.pad or a mean in a forward); the conversion's probe refuses them by name, where the
    crop loop is the answer (exact=True)."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), layer, nn.ReLU())
    model = eval64(nn.Sequential(features, nn.Flatten(), nn.Linear(features(torch.zeros(1, 3, 10, 10)).numel(), 3)))
    x = rand((1, 3, 14, 13), seed=3)
    with pytest.raises(ValueError, match="do not slide"):
        pyops.sliding_classify(model, x, 10)
    torch.testing.assert_close(pyops.sliding_classify(model, x, 10, exact=True), reference.crop_loop(model, x, 10),
                               rtol=1e-10, atol=1e-12)


class _MaxNormalized(nn.Module):
    """Features normalized by the image's largest value (or its range): whole-image statistics a probe whose
    extremes every crop shared let through."""

    def __init__(self, min_max):
        super().__init__()
        self.min_max = min_max
        self.conv, self.pool, self.fc = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        if self.min_max:
            low = x.amin(dim=(1, 2, 3), keepdim=True)
            x = (x - low) / (x.amax(dim=(1, 2, 3), keepdim=True) - low)
        else:
            x = x / x.abs().amax(dim=(1, 2, 3), keepdim=True)
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class _PadWithLargeBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 16 * 16, 3)
        with torch.no_grad():
            self.fc.bias[0] = 1000.0  # one class's large constant score

    def forward(self, x):
        return self.fc(torch.relu(self.conv(nn.functional.pad(x, (1, 1, 1, 1)))).flatten(1))


@pytest.mark.parametrize("make,window", [(lambda: _MaxNormalized(False), 16), (lambda: _MaxNormalized(True), 16),
                                         (_PadWithLargeBias, 16)], ids=["x/amax", "min-max", "bias 1000"])
def test_whole_image_statistics_and_large_scores_do_not_hide_a_mismatch(make, window):
    """The probe puts its extremes in one corner crop each, and each class is compared at its own scale (a class
    scoring 1000 set the tolerance for all of them: the others' 0.12 errors passed); both were converted and gave
    wrong maps, 22 % off."""
    torch.manual_seed(0)
    model = make().eval()
    with pytest.raises(ValueError, match="do not slide"):
        pyops.convolutionalize(model, window)


class KeepsFeatures(nn.Module):
    """Stores its feature map on itself (as code for Grad-CAM does)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        self.last = f
        return self.fc(f.flatten(1))


class ReturnsPair(KeepsFeatures):
    def forward(self, x):
        f = torch.relu(self.conv(x))
        return self.fc(f.flatten(1)), f


def test_fused_stem_tuple_outputs_hooks_and_attributes():
    """A fused model whose first layer is a ConvBNReLU2d (its channels were not found: the graph records the fused
    forward as a function of the module); a model returning (scores, features) (silently cut to the scores, or an
    AttributeError); hooks on the head or the model (dropped: every score wrong) are refused, hooks in the features
    kept; an attribute forward stores (`self.last = x`) is not left as a torch.fx Proxy (unpicklable model)."""
    torch.manual_seed(0)
    bn = randomize_bn(nn.BatchNorm2d(8))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 12, 4)).eval()
    fused, x = pyops.fuse(model), rand((1, 3, 14, 16), torch.float32, seed=1)
    torch.testing.assert_close(pyops.sliding_classify(fused, x, (12, 14)), reference.crop_loop(model, x, (12, 14)),
                               rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="inside a tuple, list or dict"):
        pyops.convolutionalize(ReturnsPair().eval(), 10)
    kept = KeepsFeatures().eval()
    pyops.convolutionalize(kept, 10)
    assert "last" not in kept.__dict__
    import io
    torch.save(kept, io.BytesIO())
    hooked = KeepsFeatures().eval()
    handle = hooked.fc.register_forward_hook(lambda mod, args, out: out * 3 + 100)
    with pytest.raises(ValueError, match="'fc' \\(Linear\\) after the flatten has hooks"):
        pyops.convolutionalize(hooked, 10)
    handle.remove()
    hooked.register_forward_pre_hook(lambda mod, args: None)
    with pytest.raises(ValueError, match="has hooks on KeepsFeatures itself"):
        pyops.convolutionalize(hooked, 10)
    features_hooked = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten(),
                                    nn.Linear(4 * 8 * 8, 3)).eval()
    features_hooked[0].register_forward_hook(lambda mod, args, out: out * 2)  # on a module traced through before
    x = rand((1, 3, 13, 12), torch.float32, seed=2)
    torch.testing.assert_close(pyops.sliding_classify(features_hooked, x, 10),
                               reference.crop_loop(features_hooked, x, 10), rtol=1e-5, atol=1e-5)


def test_hooked_feature_container_and_half_precision_models_convert():
    """A hook on the features' Sequential (Grad-CAM) makes it a leaf: its first layer gives the channels (refused
    before); half-precision models are compared at their rounding's scale (1 in 10 bf16 1000-class models refused)."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
    model = nn.Sequential(features, nn.Flatten(), nn.Linear(72, 5)).eval()
    seen = []
    features.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    x = rand((1, 3, 12, 12), torch.float32, seed=7)
    torch.testing.assert_close(pyops.sliding_classify(model, x, 8), reference.crop_loop(model, x, 8), rtol=1e-5,
                               atol=1e-5)
    assert seen  # the hook ran in the converted features
    for dtype, seed in [(torch.bfloat16, 6), (torch.float16, 44)]:
        torch.manual_seed(seed)
        half = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(),
                             nn.Flatten(), nn.Linear(288, 64), nn.ReLU(), nn.Linear(64, 1000)).eval().to(dtype)
        pyops.convolutionalize(half, 12)


class _BatchMaxNormalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(288, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x / x.amax()), 1))  # the max over the whole batch


class _LogThenGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn, self.fc = nn.Conv2d(3, 8, 3), nn.GroupNorm(1, 8), nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.gn(self.conv(torch.log(x))), 1))


class _MeanSubtracted(nn.Module):
    def forward(self, x):
        return x - x.mean()


def test_slide_check_runs_each_crop_alone_survives_nan_and_fits_each_dtype():
    """A batch of all the probe's crops shared its max (x / x.amax() over the batch passed, 25 % off); a probe
    giving NaN (log of its negative pixels) passed anything (NaN > tol is False): a non-negative probe is tried,
    and non-finite values refuse; float16 is held to its own rounding (x - x.mean() passed at bfloat16's 3e-2, 5 %
    off). And no per-class scale: a valid float32 model whose classes score ~1e-4 was refused (rounding follows the
    terms, not the score)."""
    torch.manual_seed(0)
    half = nn.Sequential(_MeanSubtracted(), nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 2), nn.Flatten(),
                         nn.Linear(200, 10)).eval().half()
    for model in (_BatchMaxNormalized().eval(), _LogThenGroupNorm().eval(), half):
        with pytest.raises(ValueError, match="do not slide"):
            pyops.convolutionalize(model, 8)
    torch.manual_seed(6)
    small = nn.Sequential(nn.Conv2d(3, 8, 2), nn.Flatten(), nn.Linear(800, 100)).eval()
    with torch.no_grad():
        small[0].weight.mul_(1e-3)
    pyops.convolutionalize(small, 11)
    log_features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10)).eval()
    sliding_log = nn.Sequential(_Log(), log_features)  # log of a non-negative probe: finite, converts
    x = torch.rand(1, 3, 12, 11) + 0.1
    torch.testing.assert_close(pyops.sliding_classify(sliding_log, x, 8), reference.crop_loop(sliding_log, x, 8),
                               rtol=1e-5, atol=1e-5)


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x + 1e-3)


@pytest.mark.parametrize("flatten", [lambda f: torch.flatten(input=f, start_dim=1),
                                     lambda f: torch.reshape(f, (f.shape[0], -1)), lambda f: f.view(f.size(0), -1),
                                     lambda f: f.reshape(f.shape[0], -1), lambda f: f.flatten(1)],
                         ids=["torch.flatten(input=)", "torch.reshape", "view", "reshape", "flatten"])
def test_flatten_spellings(flatten):
    """Every spelling of the flatten splits the model into features and head."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(flatten(torch.relu(self.conv(x))))

    torch.manual_seed(0)
    model, x = eval64(Net()), rand((1, 3, 13, 12), seed=4)
    torch.testing.assert_close(pyops.sliding_classify(model, x, 10), reference.crop_loop(model, x, 10),
                               rtol=1e-10, atol=1e-12)


def test_input_channels_from_the_images_and_clear_geometry_errors():
    """The crops' channels need not be the first conv's (PixelUnshuffle, a grayscale mean in forward):
    sliding_classify takes the images', convolutionalize and SlidingClassifier take in_channels. Features whose map
    does not grow with the image are named for that, not for a crop that runs."""
    torch.manual_seed(0)
    unshuffle = eval64(nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 4, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 3 * 4, 3)))

    class Gray(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x.mean(1, keepdim=True))).flatten(1))

    for model, window in [(unshuffle, (10, 12)), (eval64(Gray()), 10)]:
        x = rand((2, 3, 16, 19), seed=6)
        torch.testing.assert_close(pyops.sliding_classify(model, x, window, stride=2),
                                   reference.crop_loop(model, x, window, 2), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pyops.nn.SlidingClassifier(model, window, 2, in_channels=3)(x),
                                   reference.crop_loop(model, x, window, 2), rtol=1e-10, atol=1e-12)
    wrong = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 5)).eval()
    with pytest.raises(ValueError, match="argument 'images' has 1 channels, but the model's first layer takes 3"):
        pyops.sliding_classify(wrong, torch.randn(1, 1, 12, 12), 8)
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 8, 8]), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    with pytest.raises(ValueError, match="no integer total stride .* LayerNorm"):
        pyops.convolutionalize(fixed, 10)


@pytest.mark.parametrize("exact", [False, True])
def test_empty_batch_stays_in_the_graph_of_images(exact):
    net1 = reference.homework_net1(small=True)
    images = torch.rand(0, 3, 40, 40, requires_grad=True)
    out = pyops.sliding_classify(net1, images, 32, exact=exact)
    assert out.shape == (0, 10, 9, 9) and out.requires_grad
    out.sum().backward()
    assert images.grad.shape == images.shape


def test_padding_layers_and_fused_padded_convs_count_as_padded():
    """A padding module (nn.ZeroPad2d) or a model fused by pyops.fuse (ConvBNReLU2d with padding): the known border
    difference, warned about as for nn.Conv2d's padding."""
    torch.manual_seed(0)
    unfused = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    for model in (nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)),
                  pyops.fuse(randomize_bn(unfused).eval())):
        assert pyops.convolutionalize(model.eval(), 10).padded
        with pytest.warns(UserWarning, match="exact=True"):
            pyops.sliding_classify(model, rand((1, 3, 13, 12), torch.float32, seed=5), 10)


def test_train_mode_model_is_used_with_eval_semantics_and_left_unchanged():
    """A model in training mode: converted and (exact=True) run with eval semantics, as documented, its BatchNorm
    statistics and training flags untouched."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                                       nn.Linear(4 * 8 * 8, 3))).double().train()
    before = before_model = {k: v.clone() for k, v in model.state_dict().items()}
    x = rand((2, 3, 13, 12), seed=6)
    expected = reference.crop_loop(eval64(copy.deepcopy(model)), x, 10)
    for exact in (False, True):
        torch.testing.assert_close(pyops.sliding_classify(model, x, 10, exact=exact), expected, rtol=1e-10,
                                   atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    empty = pyops.sliding_classify(model, x[:0], 10, exact=True)
    assert empty.shape == (0, 3, 4, 3)
    # A converted model in training mode (a SlidingClassifier inside a model being trained) is evaluated the same
    # way, and left as it was.
    for classifier in (pyops.nn.SlidingClassifier(model, 10).train(), pyops.convolutionalize(model, 10).train()):
        fcn = getattr(classifier, "fcn", classifier)
        before = {k: v.clone() for k, v in fcn.state_dict().items()}
        scores = classifier(x) if classifier is not fcn else pyops.sliding_classify(fcn, x, 10)
        torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
        assert all(m.training for m in fcn.modules())
        for k, v in fcn.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed"
    # Mixed flags (eval_mode leaves a submodule already in eval mode alone): only the BatchNorm in training mode
    model.eval()
    model[1].train()
    torch.testing.assert_close(pyops.sliding_classify(model, x, 10), expected, rtol=1e-10, atol=1e-12)
    assert [m.training for m in model.modules()] == [m is model[1] for m in model.modules()]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), f"{k} changed"


class FunctionalDropoutNet(nn.Module):
    """Dropout written F.dropout(x, p, self.training): the trace records the training flag it reads."""

    def __init__(self, pad):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=pad), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * (2 + 2 * pad) ** 2, 5)

    def forward(self, x):
        x = nn.functional.dropout(torch.relu(self.c1(x)), 0.5, self.training)
        return self.fc(torch.flatten(self.c2(x), 1))


@pytest.mark.filterwarnings("ignore:pyops.sliding_classify. the model's features pad")
def test_train_mode_model_reading_its_training_flag_is_traced_in_eval_mode():
    """convolutionalize traced a train-mode model before switching it to eval: F.dropout(x, p, self.training) ran
    dropout in the converted features (random scores; unpadded features were refused as not sliding)."""
    torch.manual_seed(0)
    x = rand((1, 3, 10, 10), seed=7).float()
    for pad in (0, 1):
        model = FunctionalDropoutNet(pad).eval()
        expected = pyops.sliding_classify(model, x, 6)
        model.train()
        torch.testing.assert_close(pyops.sliding_classify(model, x, 6), expected)
        assert model.training


def test_exact_empty_batch_and_numpy_max_memory():
    """exact=True on an empty batch called the model on (0, C, h, w) crops, which its view(x.size(0), -1) cannot
    reshape; a numpy integer max_memory was refused (window and stride take them)."""
    import numpy as np
    net1 = reference.homework_net1(small=True)
    images = torch.rand(0, 3, 40, 40)
    assert pyops.sliding_classify(net1, images, 32, exact=True).shape == (0, 10, 9, 9)
    x = torch.rand(1, 3, 34, 33)
    torch.testing.assert_close(pyops.sliding_classify(net1, x, 32, max_memory=np.int64(1 << 26)),
                               pyops.sliding_classify(net1, x, 32))


def test_batchnorm_after_a_dropout_folds_into_the_linear_before_it():
    """Linear → Dropout → BatchNorm1d: the dropout is the identity in eval, so the BatchNorm folds into the Linear's
    output (it was refused as having no Linear to fold into)."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6),
                                       nn.Dropout(0.3), nn.BatchNorm1d(6))).double().eval()
    x = rand((1, 3, 11, 10), seed=7)
    torch.testing.assert_close(pyops.sliding_classify(model, x, 8), reference.crop_loop(model, x, 8), rtol=1e-10,
                               atol=1e-12)


def test_threads_sharing_a_train_mode_classifier():
    """Threads calling one SlidingClassifier (in training mode) at once: each call has eval semantics until the
    last ends, and the flags and global settings are left as they were (a save/restore per call let one thread
    restore training mode while another computed, and left the features in eval mode and cuDNN's TF32 flag off)."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                       nn.Flatten(), nn.Linear(4 * 8 * 8, 3))).double()
    dense = pyops.nn.SlidingClassifier(model, 10).train()
    x = rand((2, 3, 16, 15), seed=8)
    expected = reference.crop_loop(eval64(copy.deepcopy(model)), x, 10)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    tf32 = torch.backends.cudnn.allow_tf32
    results = []

    def work(index):
        for _ in range(10):
            with torch.no_grad():
                results.append(dense(x))

    errors = run_in_threads(work)
    assert not errors and len(results) == 40
    for scores in results:
        torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    assert all(m.training for m in dense.modules()) and torch.backends.cudnn.allow_tf32 == tf32
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_conversion_inside_an_autocast_region():
    """The slide check compares the converted network with the model in the parameters' dtype, whatever region the
    caller is in (under autocast the head op and the model's Linears computed in different dtypes: refused)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)).eval()
    x = torch.randn(1, 3, 20, 20)
    expected = reference.crop_loop(copy.deepcopy(model).double(), x.double(), 16)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            scores = pyops.sliding_classify(model, x, 16)
        torch.testing.assert_close(scores.double(), expected, rtol=3e-2, atol=3e-2)


def test_gradients_under_autocast_keep_the_ops_result():
    """With images requiring grad the head runs as plain modules, which CPU autocast ran in bfloat16 where the op
    computed in float32: the scores changed dtype and values with requires_grad. They compute as the op does (in
    the region's bfloat16 on a CPU computing it natively, else float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 16), nn.ReLU(),
                          nn.Linear(16, 4)).eval()
    dense = pyops.nn.SlidingClassifier(model, 16)
    x = torch.randn(1, 3, 20, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = dense(x)
        images = x.clone().requires_grad_()
        scores = dense(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype = convolution_autocast_dtype(x.device)
    assert scores.dtype == plain.dtype == dtype
    rtol, _ = tolerances(dtype)  # (bfloat16: the op and the modules round their layers' sums differently)
    torch.testing.assert_close(scores.detach(), plain, rtol=rtol, atol=rtol * plain.abs().max().item())
    scores.sum().backward()
    assert images.grad is not None and images.grad.dtype == torch.float32


def test_inference_mode_parameters():
    """Parameters made in torch.inference_mode have no version counter: the bf16 operands are cast from them
    (keyed by identity; replacing a weight is seen)."""
    net = reference.homework_net1(small=True)
    x = torch.randn(1, 3, 36, 36, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fcn = pyops.convolutionalize(net, 32)
        first = pyops.sliding_classify(fcn, x, 32, precision="bf16")
        fp32 = pyops.sliding_classify(fcn, x, 32)
        assert ((first - fp32).norm() / fp32.norm()).item() < 2e-2
        fcn.head[0].weight = nn.Parameter(fcn.head[0].weight * 2)
        second = pyops.sliding_classify(fcn, x, 32, precision="bf16")
        assert not torch.equal(first, second)
    # a replaced weight may land at the freed one's address with the same version: keyed by identity, not address
    weight = fcn.head[0].weight.detach().clone()
    for scale in (1.0, 2.0, 1.0, 2.0):
        fcn.head[0].weight = nn.Parameter(weight * scale)
        expected = pyops.sliding_classify(fcn, x, 32)
        got = pyops.sliding_classify(fcn, x, 32, precision="bf16")
        assert ((got - expected).norm() / expected.norm()).item() < 2e-2


def test_padded_network_exact_equals_loop_and_fcn_warns():
    model = eval64(padded_net())
    x = rand((2, 3, 23, 20), seed=4)
    ref = reference.crop_loop(model, x, 16, 2)
    exact = pyops.sliding_classify(model, x, 16, 2, exact=True, max_memory=200_000)  # several crop batches
    torch.testing.assert_close(exact, ref, rtol=1e-10, atol=1e-12)
    with pytest.warns(UserWarning, match="exact=True"):
        approx = pyops.sliding_classify(model, x, 16, 2)
    # the documented difference: the FCN sees neighbouring pixels where a crop sees zero padding
    assert approx.shape == ref.shape and (approx - ref).abs().max() > 1e-6


def test_exact_takes_channels_last_images():
    """exact=True gathered the crops in the images' layout: channels_last images gave channels_last crops, and a
    classifier flattening with .view(n, -1) (the homework's) failed on them, where the FCN path took the images."""
    model = eval64(reference.homework_net1(small=True, dtype=torch.float64))
    x = rand((2, 3, 35, 34), seed=7)
    ref = reference.crop_loop(model, x, 32, 1)
    exact = pyops.sliding_classify(model, x.contiguous(memory_format=torch.channels_last), 32, exact=True)
    torch.testing.assert_close(exact, ref, rtol=1e-10, atol=1e-12)


# ---- tiling and the memory bound ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make,window,small", [
    (lambda: reference.homework_net1(small=True, dtype=torch.float64), 32, 1 << 20), (PoolNet, 24, 500_000)])
def test_tiled_equals_untiled(make, window, small):
    model = eval64(make())
    x = rand((2, 3, 52, 57), seed=6)
    fcn = pyops.convolutionalize(model, window)
    plan = plan_tiles(fcn, x.shape, x.dtype, x.device, small)
    assert plan_tiles(fcn, x.shape, x.dtype, x.device).tiles == 1
    assert plan.tiles > 1 and plan.peak_bytes <= small
    tiled = pyops.sliding_classify(fcn, x, window, max_memory=small)
    untiled = pyops.sliding_classify(fcn, x, window)
    torch.testing.assert_close(tiled, untiled, rtol=1e-12, atol=1e-14)


def test_memory_bound_respected_on_a_large_image():
    fcn = pyops.convolutionalize(reference.homework_net1(small=True), 32)
    shape = (2, 3, 1024, 1024)
    bound = 128 << 20  # the (2, 10, 993, 993) output itself takes 79 MB
    untiled = plan_tiles(fcn, shape, torch.float32, "cpu", 1 << 40)
    plan = plan_tiles(fcn, shape, torch.float32, "cpu", bound)
    assert untiled.tiles == 1 and untiled.peak_bytes > 3 * bound  # the whole image would not fit
    assert plan.peak_bytes <= bound and plan.tiles > 1
    # the estimate covers at least the activations a tile really holds: its input, feature map and scores
    rows, cols = plan.rows, plan.cols
    tile_in = plan.batch * 3 * (rows + 31) * (cols + 31) * 4
    tile_fmap = plan.batch * 16 * (rows + 17) * (cols + 17) * 4
    assert plan.peak_bytes >= tile_in + tile_fmap
    with pytest.raises(ValueError, match="max_memory"):
        plan_tiles(fcn, shape, torch.float32, "cpu", 10_000)


# ---- module form, precision, layouts ------------------------------------------------------------------------------

def test_sliding_classifier_module(device):
    net1 = reference.homework_net1(small=True).to(device)
    clf = pyops.nn.SlidingClassifier(net1, 32, stride=2)
    assert not any(isinstance(m, nn.Linear) for m in clf.modules())
    x = rand((2, 3, 41, 37), torch.float32, device, seed=8)
    out = clf(x)
    ref = reference.crop_loop(net1, x, 32, 2)
    rtol, atol = tolerances(torch.float32)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(clf(x[:1]), ref[:1], rtol=rtol, atol=atol)  # reused, converted once


def test_layouts_and_empty_batch(device):
    net1 = reference.homework_net1(small=True).to(device)
    x = rand((2, 3, 40, 36), torch.float32, device, seed=9)
    ref = pyops.sliding_classify(net1, x, 32)
    for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        torch.testing.assert_close(pyops.sliding_classify(net1, variant, 32), ref, rtol=1e-5, atol=1e-6)
    empty = pyops.sliding_classify(net1, x[:0], 32)
    assert empty.shape == (0, 10, 9, 5)


def test_precisions(device):
    net1 = reference.homework_net1(small=True).to(device)
    x = rand((1, 3, 44, 40), torch.float32, device, seed=10)
    ref = reference.crop_loop(net1.double(), x.double(), 32).float()
    net1.float()
    fp32 = pyops.sliding_classify(net1, x, 32)
    torch.testing.assert_close(fp32, ref, rtol=1e-5, atol=1e-6)
    tf32 = pyops.sliding_classify(net1, x, 32, precision="tf32")
    torch.testing.assert_close(tf32, ref, rtol=1e-2, atol=1e-3)
    bf16 = pyops.sliding_classify(net1, x, 32, precision="bf16")
    assert bf16.dtype == torch.float32
    rel = ((bf16 - ref).norm() / ref.norm()).item()
    assert rel < 2e-2
    if device == "cpu":
        assert torch.equal(tf32, fp32)  # no TF32 on the CPU


# ---- the FFT head (algorithm="fft") -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 3])
def test_fft_algorithm_equals_crop_loop(device, dtype, stride):
    """The head's large-kernel layer by FFT: the crop loop's scores within the dtype's tolerance (fp32: the FFT's
    error is of the order of fp32's direct sum), at stride 1 and with shift-and-stitch; the module keeps its
    spectra between calls and drops them when moved."""
    torch.manual_seed(0)
    net1 = reference.homework_net1(small=True).to(device, dtype)
    x = rand((2, 3, 45, 38), dtype, device, seed=21)
    ref = reference.crop_loop(net1.double(), x.double(), 32, stride)
    net1.to(dtype)
    clf = pyops.nn.SlidingClassifier(net1, 32, stride=stride)
    out = clf(x, algorithm="fft")
    rtol, atol = tolerances(dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * ref.abs().max().item())
    spectra = clf.fcn._derived.value.spectra
    torch.testing.assert_close(clf(x[:1], algorithm="fft"), out[:1], rtol=rtol, atol=atol * ref.abs().max().item())
    assert clf.fcn._derived.value.spectra is spectra  # made once
    torch.testing.assert_close(pyops.sliding_classify(net1, x, 32, stride, algorithm="fft"), out, rtol=rtol,
                               atol=atol * ref.abs().max().item())
    clf.to(torch.float64 if dtype == torch.float32 else torch.float32)
    assert clf.fcn._derived is None


def test_auto_algorithm_rule(device):
    """auto: the FFT on CUDA for a first head layer of at least 16x16 at precision fp32 (float32/float64), else
    the direct head (the CPU, reduced precisions, smaller kernels)."""
    large = pyops.convolutionalize(reference.homework_net1(small=True), 32)  # an 18x18 first head layer
    small = pyops.convolutionalize(eval64(PoolNet()).float(), 24)  # a 2x2 one
    x = rand((1, 3, 40, 40), torch.float32, device)
    on_cuda = device == "cuda"
    assert large.resolve_algorithm("auto", "fp32", x) == ("fft" if on_cuda else "direct")
    assert large.resolve_algorithm("auto", "fp32", x.double()) == ("fft" if on_cuda else "direct")
    assert large.resolve_algorithm("auto", "tf32", x) == "direct"
    assert large.resolve_algorithm("auto", "bf16", x) == "direct"
    assert small.resolve_algorithm("auto", "fp32", x) == "direct"
    assert large.resolve_algorithm("fft", "fp32", x) == "fft" and small.resolve_algorithm("direct", "fp32", x) == \
        "direct"


def test_fft_algorithm_tiles_within_the_memory_bound():
    """With a small max_memory the FFT head runs tile by tile (its workspace counted in the plan) and gives the
    untiled result up to rounding (each tile's overlap-save grid starts at its own origin)."""
    net1 = eval64(reference.homework_net1(small=True, dtype=torch.float64))
    x = rand((2, 3, 70, 66), seed=22)
    fcn = pyops.convolutionalize(net1, 32)
    small = 8 << 20  # the untiled FFT head would take ~40 MB
    plan = plan_tiles(fcn, x.shape, x.dtype, x.device, small, "fft")
    assert plan.tiles > 1 and plan.peak_bytes <= small
    tiled = pyops.sliding_classify(fcn, x, 32, max_memory=small, algorithm="fft")
    untiled = pyops.sliding_classify(fcn, x, 32, algorithm="fft")
    torch.testing.assert_close(tiled, untiled, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(untiled, pyops.sliding_classify(fcn, x, 32), rtol=1e-10, atol=1e-12)


def test_fft_head_without_bias_equals_direct_and_keeps_its_spectra():
    model = eval64(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 6, bias=False),
                                 nn.ReLU(), nn.Linear(6, 3)))
    fcn = pyops.convolutionalize(model, 16)
    x = rand((1, 3, 20, 21), seed=23)
    out = pyops.sliding_classify(fcn, x, 16, algorithm="fft")
    spectra = fcn._derived.value.spectra
    torch.testing.assert_close(out, pyops.sliding_classify(fcn, x, 16, algorithm="direct"), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, reference.crop_loop(model, x, 16), rtol=1e-10, atol=1e-12)
    pyops.sliding_classify(fcn, x, 16, algorithm="fft")
    assert fcn._derived.value.spectra is spectra  # the zero bias made per call does not rebuild them


def test_fft_algorithm_rejects_what_it_cannot_do():
    net1 = reference.homework_net1(small=True)
    x = rand((1, 3, 36, 36), torch.float32)
    with pytest.raises(ValueError, match="algorithm"):
        pyops.sliding_classify(net1, x, 32, algorithm="winograd")
    with pytest.raises(ValueError, match="precision"):
        pyops.sliding_classify(net1, x, 32, precision="bf16", algorithm="fft")
    with pytest.raises(ValueError, match="algorithm"):
        pyops.sliding_classify(net1, x, 32, exact=True, algorithm="fft")
    with pytest.raises(ValueError, match="float32 or float64"):
        pyops.sliding_classify(net1.bfloat16(), x.bfloat16(), 32, algorithm="fft")


# ---- the sliding_head op ------------------------------------------------------------------------------------------

def head_operands(dtype, device, channels=5, kernel=(4, 3), widths=(7, 6, 3), seed=11):
    g = torch.Generator().manual_seed(seed)
    weights, biases, cin = [], [], channels
    for i, n in enumerate(widths):
        k = kernel if i == 0 else (1, 1)
        weights.append((torch.randn(n, cin, *k, generator=g, dtype=torch.float64) * 0.3).to(device, dtype))
        biases.append(torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype))
        cin = n
    return weights, biases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [(1, 1, 0), (0, 1, 1), (1,)])
# 1 position per tile; tiles across images; fp32 on the CPU: layer 0 as one direct convolution, the later layers in
# tiles; one tile (on the CPU: the direct convolution, then one tile).
@pytest.mark.parametrize("workspace", [1, 2000, 8000, 256 << 20])
@pytest.mark.parametrize("batch", [1, 3])
def test_sliding_head_matches_conv_head(device, dtype, relu, workspace, batch):
    widths = (7, 6, 3)[:len(relu)]
    weights, biases = head_operands(dtype, device, widths=widths)
    f = rand((batch, 5, 9, 8), dtype, device, seed=12)
    out = pyops.sliding_head(f, weights, biases, relu, workspace_bytes=workspace)
    ref = reference.sliding_head(f.double(), [w.double() for w in weights], [b.double() for b in biases], relu)
    assert out.shape == (batch, widths[-1], 6, 6) and out.dtype == dtype
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_sliding_head_with_mkldnn_disabled_matches_conv_head():
    # The CPU's direct first layer steps aside (ATen's fallback convolution would im2col the whole map): im2col tiles.
    weights, biases = head_operands(torch.float32, "cpu")
    f = rand((2, 5, 9, 8), torch.float32, "cpu", seed=12)
    # None: the other oneDNN flags stay as they are (setting allow_tf32 warns on a build without Intel GPU support)
    with torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None):
        out = pyops.sliding_head(f, weights, biases, workspace_bytes=8000)
    ref = reference.sliding_head(f.double(), [w.double() for w in weights], [b.double() for b in biases], (1, 1, 0))
    rtol, atol = tolerances(torch.float32)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_sliding_head_refuses_what_autograd_would_record(device):
    weights, biases = head_operands(torch.float32, device)
    f = rand((2, 5, 9, 8), torch.float32, device, seed=13)
    ref = pyops.sliding_head(f, weights, biases)
    params = [torch.nn.Parameter(w) for w in weights]
    cases = {"features": (f.clone().requires_grad_(), weights, biases),
             r"weights\[1\]": (f, [weights[0], params[1], weights[2]], biases),
             r"biases\[2\]": (f, weights, biases[:2] + [biases[2].clone().requires_grad_()])}
    for name, args in cases.items():
        with pytest.raises(NotImplementedError, match=f"inference only.*'{name}' requires grad"):
            pyops.sliding_head(*args)
        with pytest.raises(NotImplementedError, match=f"'{name}' requires grad"):
            torch.ops.pyops.sliding_head(*args, [1, 1, 0])
    with torch.no_grad():  # nothing to record: the same result
        torch.testing.assert_close(pyops.sliding_head(f.clone().requires_grad_(), params, biases), ref)


def test_sliding_head_layouts_and_empty(device):
    weights, biases = head_operands(torch.float32, device)
    f = rand((2, 5, 9, 8), torch.float32, device, seed=13)
    ref = pyops.sliding_head(f, weights, biases)
    torch.testing.assert_close(pyops.sliding_head(f.to(memory_format=torch.channels_last), weights, biases), ref)
    strided = rand((2, 5, 9, 16), torch.float32, device, seed=13)[..., ::2]
    torch.testing.assert_close(pyops.sliding_head(strided, weights, biases),
                               pyops.sliding_head(strided.contiguous(), weights, biases))
    assert pyops.sliding_head(f[:0], weights, biases).shape == (0, 3, 6, 6)
    no_bias = pyops.sliding_head(f, weights, None)
    torch.testing.assert_close(no_bias, reference.sliding_head(f, weights, [None] * 3, (1, 1, 0)),
                               rtol=1e-5, atol=1e-6)


def test_sliding_head_opcheck(device):
    weights, biases = head_operands(torch.float32, device)
    f = rand((2, 5, 9, 8), torch.float32, device, seed=14)
    for args in [(f, weights, biases, [1, 1, 0]), (f.double(), [w.double() for w in weights],
                                                   [b.double() for b in biases], [0, 1, 0], False, 4000)]:
        torch.library.opcheck(torch.ops.pyops.sliding_head.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_sliding_head_flop_count():
    weights, biases = head_operands(torch.float32, "cpu")
    f = rand((2, 5, 9, 8), torch.float32, seed=15)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        pyops.sliding_head(f, weights, biases)
    positions = 2 * 6 * 6
    assert counter.get_total_flops() == 2 * positions * (7 * 5 * 4 * 3 + 6 * 7 + 3 * 6)


def test_sliding_head_torch_compile():
    weights, biases = head_operands(torch.float32, "cpu")
    f = rand((2, 5, 9, 8), torch.float32, seed=16)

    def head(x):
        return torch.ops.pyops.sliding_head(x * 2, weights, biases, [1, 1, 0])

    torch.testing.assert_close(torch.compile(head, fullgraph=True)(f), head(f))


# ---- bad inputs ---------------------------------------------------------------------------------------------------

def test_bad_inputs():
    net1 = reference.homework_net1(small=True)
    with pytest.raises(ValueError, match="window"):
        pyops.sliding_classify(net1, torch.randn(1, 3, 31, 40), 32)
    with pytest.raises(ValueError, match="channels"):
        pyops.sliding_classify(net1, torch.randn(1, 4, 40, 40), 32)
    with pytest.raises(ValueError, match="no flatten|no Linear"):
        pyops.convolutionalize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 8)
    with pytest.raises(ValueError, match="no Linear"):
        pyops.convolutionalize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 8)
    with pytest.raises(ValueError, match=r"'2' \(Sigmoid\)"):
        pyops.convolutionalize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Sigmoid(), nn.Linear(144, 2)), 8)
    with pytest.raises(ValueError, match=r"'classifier.0' \(Linear\).*window"):
        pyops.convolutionalize(net1, 30)
    with pytest.raises(ValueError, match="window"):
        pyops.convolutionalize(net1, (32, 0))
    with pytest.raises(ValueError, match="stride"):
        pyops.sliding_classify(net1, torch.randn(1, 3, 40, 40), 32, stride=0)
    with pytest.raises(ValueError, match="precision"):
        pyops.sliding_classify(net1, torch.randn(1, 3, 40, 40), 32, precision="fp8")
    with pytest.raises(TypeError, match="images"):
        pyops.sliding_classify(net1, torch.randn(1, 3, 40, 40, dtype=torch.float64), 32)
    with pytest.raises(TypeError, match="images"):
        pyops.sliding_classify(net1, torch.ones(1, 3, 40, 40, dtype=torch.int64), 32)


def test_sliding_head_bad_inputs_python_and_cpp():
    weights, biases = head_operands(torch.float32, "cpu")
    f = torch.randn(2, 5, 9, 8)
    op = torch.ops.pyops.sliding_head
    for call in (pyops.sliding_head, lambda *a: op(*a)):
        with pytest.raises(ValueError, match=r"weights\[0\].*input channels"):
            call(f[:, :4], weights, biases, [1, 1, 0])
        with pytest.raises(ValueError, match="smaller than"):
            call(f[:, :, :3], weights, biases, [1, 1, 0])
        with pytest.raises(ValueError, match="biases"):
            call(f, weights, biases[:2], [1, 1, 0])
        with pytest.raises(ValueError, match=r"weights\[1\].*1x1"):
            call(f, [weights[0], weights[1].expand(6, 7, 2, 1), weights[2]], biases, [1, 1, 0])
        with pytest.raises(TypeError, match=r"weights"):
            call(f, [weights[0].double()] + weights[1:], biases, [1, 1, 0])
    with pytest.raises(ValueError, match="workspace_bytes"):
        op(f, weights, biases, [1, 1, 0], False, 0)
    for relu in (["no", True, False], "yes", [None, 1, 0]):  # (bool() took any object: "no" meant a ReLU)
        with pytest.raises(TypeError, match="'relu' must be a list of bools"):
            pyops.sliding_head(f, weights, biases, relu)
    for call in (pyops.sliding_head, lambda *a: op(*a)):
        with pytest.raises(TypeError, match=r"'biases\[2\]'"):  # the index, not a placeholder
            call(f, weights, biases[:2] + [biases[2].double()], [1, 1, 0])
        # zero-size layers (a 0x0 kernel divided the tile planning by zero: SIGFPE)
        for dtype in (torch.float32, torch.float64):
            with pytest.raises(ValueError, match=r"weights\[0\]' has no elements"):
                call(f.to(dtype), [torch.randn(3, 5, 0, 0, dtype=dtype)], [torch.zeros(3, dtype=dtype)], [0])
            with pytest.raises(ValueError, match=r"weights\[0\]' has no elements"):
                call(f[:, :0].to(dtype), [torch.randn(3, 0, 2, 2, dtype=dtype)], [torch.zeros(3, dtype=dtype)], [0])


def test_planned_classifier_loads_with_swapped_parameters():
    """Planning ran the features under a FakeTensorMode whose converter kept weak references to the parameters
    until the garbage collector ran; torch.utils.swap_tensors refuses such tensors, so load_state_dict under
    set_swap_module_params_on_conversion(True) failed after one call."""
    model = pyops.nn.SlidingClassifier(reference.homework_net1(small=True), 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.rand(1, 3, 40, 40))
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_threads_keep_their_own_autocast_cache_setting():
    """torch's autocast cache setting is per thread; planning's fake runs switched it off through the process-wide
    override, and one thread's block ending wrote another thread's value: both came out with the cache off."""
    model = pyops.nn.SlidingClassifier(reference.homework_net1(small=True), 32)
    after = {}

    def work(index):
        with torch.no_grad():
            for size in range(33, 45):
                model(torch.rand(1, 3, size, size + index))  # a new size: a new plan, with fake runs
        after[index] = torch.is_autocast_cache_enabled()

    assert not run_in_threads(work, 2)
    assert after == {0: True, 1: True} and torch.is_autocast_cache_enabled()


@pytest.mark.parametrize("setting", ["cudnn.conv", "cuda.matmul"])
def test_per_backend_tf32_settings_are_kept(setting):
    """Setting torch's per-backend fp32_precision made the old allow_tf32 flags raise when read: every call that
    read one raised (even on the CPU), and writing the flag back turned matmul's 'none' into 'ieee'."""
    namespace = torch.backends.cudnn.conv if setting == "cudnn.conv" else torch.backends.cuda.matmul
    if not hasattr(namespace, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision")  # (older torch: the flags are the only setting)
    before = namespace.fp32_precision
    namespace.fp32_precision = "ieee" if setting == "cudnn.conv" else "tf32"
    chosen = namespace.fp32_precision
    try:
        net1 = reference.homework_net1(small=True)
        x = torch.rand(1, 3, 34, 33)
        for algorithm in ("direct", "fft"):
            pyops.sliding_classify(net1, x, 32, algorithm=algorithm)
            assert namespace.fp32_precision == chosen
    finally:
        namespace.fp32_precision = before
    matmul = torch.backends.cuda.matmul.fp32_precision
    pyops.sliding_classify(reference.homework_net1(small=True), torch.rand(1, 3, 34, 33), 32, algorithm="fft")
    assert torch.backends.cuda.matmul.fp32_precision == matmul


def test_fused_models_slide_under_no_grad_and_with_a_fused_head():
    """A fused model's packed-weight path ran on the shape probes' fake tensors (no grad: the window was blamed,
    UnsupportedOperatorException at the call), and its head's LinearBNReLU was refused ('does not take the
    previous layer's output')."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64),
                        nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                        nn.Linear(32, 10))
    for bn in (net[1], net[4], net[8]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    net.eval()
    fused = pyops.fuse(net)
    assert any(isinstance(m, pyops.nn.LinearBNReLU) for m in fused.modules())
    img = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        want = pyops.sliding_classify(net, img, 12, exact=True)
        clf = pyops.nn.SlidingClassifier(fused, 12)
        for got in (clf(img), pyops.sliding_classify(fused, img, 12, exact=True),
                    pyops.sliding_classify(fused, img, 12)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    relu6 = pyops.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(400, 8), nn.BatchNorm1d(8),
                                     nn.ReLU6(), nn.Linear(8, 2)).eval())
    with pytest.raises(ValueError, match="activation .relu6. is not supported in the head"):
        pyops.nn.SlidingClassifier(relu6, 12)
