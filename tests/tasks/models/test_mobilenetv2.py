"""Tests of fedcrypt.tasks.models.mobilenetv2 against the published architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcrypt.tasks.models.mobilenetv2 import (
    BN_MOMENTUM,
    DEFAULT_INPUT_SIZE,
    InvertedResidual,
    MobileNetV2,
    make_divisible,
    mobilenetv2,
)

# torchvision.models.mobilenet_v2() has 3,504,872 parameters, of which its classifier
# Linear(1280, 1000) holds 1,281,000: the feature extractor holds 2,223,872.
TORCHVISION_FEATURES_PARAMS = 2_223_872


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("side", [28, 64])
def test_forward_on_28_and_64_pixels(side: int) -> None:
    model = mobilenetv2((1, side, side), 2).eval()
    assert model(torch.randn(2, 1, side, side)).shape == (2, 2)


def test_small_inputs_are_upsampled_inside_the_model() -> None:
    small = mobilenetv2((1, 28, 28), 2)
    assert small.input_size == DEFAULT_INPUT_SIZE >= 64
    seen: list[tuple[int, ...]] = []
    small.features[0].register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape)))
    small.features.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        small.eval()(torch.randn(1, 1, 28, 28))
    side = DEFAULT_INPUT_SIZE
    assert seen[0] == (1, 1, side, side)  # upsampled before the stem
    assert seen[1][2] >= 2, "the last feature map must not be 1x1"
    # non-square inputs keep their aspect ratio
    seen.clear()
    with torch.no_grad():
        small(torch.randn(1, 1, 28, 56))
    assert seen[0] == (1, 1, side, 2 * side)
    # large inputs pass unchanged
    seen.clear()
    with torch.no_grad():
        small(torch.randn(1, 1, 2 * side, 2 * side))
    assert seen[0] == (1, 1, 2 * side, 2 * side)


def test_stem_stride_depends_on_input_size() -> None:
    small = mobilenetv2((1, 28, 28), 2, input_size=None)  # no upsampling: stride-1 stem
    large = mobilenetv2((3, 64, 64), 2)
    stems = [
        next(m for m in net.features.modules() if isinstance(m, nn.Conv2d))
        for net in (small, large)
    ]
    assert stems[0].stride == (1, 1) and stems[1].stride == (2, 2)
    assert stems[0].in_channels == 1 and stems[1].in_channels == 3
    # 28 px keeps a 2x2 map before pooling, 64 px too (28/16, 64/32)
    with torch.no_grad():
        assert small.eval().features(torch.randn(1, 1, 28, 28)).shape == (1, 1280, 2, 2)
        assert large.eval().features(torch.randn(1, 3, 64, 64)).shape == (1, 1280, 2, 2)


def test_batchnorm_momentum_and_zero_init_residual() -> None:
    model = mobilenetv2((1, 28, 28), 2)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == BN_MOMENTUM for m in bns)
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    for block in blocks:
        last = block.conv[-1]
        assert isinstance(last, nn.BatchNorm2d)
        assert bool((last.weight == 0).all()) == block.use_res_connect
    # a residual block starts as the identity
    block = next(b for b in blocks if b.use_res_connect).eval()
    x = torch.randn(1, block.conv[0][0].in_channels, 8, 8)
    torch.testing.assert_close(block(x), x)


def test_parameter_counts_match_the_paper() -> None:
    rgb = mobilenetv2((3, 224, 224), 2)
    assert count(rgb.features) == TORCHVISION_FEATURES_PARAMS
    grey = mobilenetv2((1, 28, 28), 2)
    head = 1280 * 320 + 320 + 320 * 2 + 2
    stem_saving = 2 * 32 * 3 * 3  # two fewer input channels in the first conv
    assert count(grey) == TORCHVISION_FEATURES_PARAMS - stem_saving + head == 2_633_858
    assert 2_200_000 < count(grey) < 2_700_000


def test_head_is_the_seed_papers() -> None:
    model = mobilenetv2((1, 28, 28), 4, dropout=0.3)
    layers = list(model.classifier)
    assert isinstance(layers[0], nn.Dropout) and layers[0].p == 0.3
    assert (layers[1].in_features, layers[1].out_features) == (1280, 320)
    assert (layers[2].in_features, layers[2].out_features) == (320, 4)
    assert len(layers) == 3


def test_building_blocks() -> None:
    blocks = [m for m in mobilenetv2((1, 28, 28), 2).features if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_res_connect for b in blocks) == 10
    assert any(isinstance(m, nn.ReLU6) for m in blocks[0].modules())


def test_width_multiplier_rounds_channels_to_multiples_of_8() -> None:
    assert make_divisible(32 * 0.35) == 16 and make_divisible(16 * 0.75) == 16
    model = MobileNetV2(1, 2, width_mult=0.35, stem_stride=1)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert model.last_channel == 1280
    assert count(model) < 1_000_000
    assert model.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 2)


def test_random_affine_identity_flip_and_shapes() -> None:
    from torch.nn import functional as F  # noqa: N812

    from fedcrypt.tasks.models.mobilenetv2 import random_affine

    x = torch.rand(6, 1, 28, 28)
    still = random_affine(x, size=(64, 64), max_scale=0, max_degrees=0, max_shift=0, flip=False)
    torch.testing.assert_close(
        still, F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    )
    torch.manual_seed(0)
    flipped = random_affine(x, size=(28, 28), max_scale=0, max_degrees=0, max_shift=0)
    kinds = [
        "flip" if torch.allclose(f, i.flip(-1), atol=1e-5) else "same"
        for f, i in zip(flipped, x, strict=True)
        if torch.allclose(f, i.flip(-1), atol=1e-5) or torch.allclose(f, i, atol=1e-5)
    ]
    assert len(kinds) == 6 and {"flip", "same"} == set(kinds)
    moved = random_affine(x, size=(64, 64))
    assert moved.shape == (6, 1, 64, 64) and not torch.allclose(moved, still)


def test_augmentation_only_in_training_mode() -> None:
    model = MobileNetV2(1, 2, stem_stride=2, input_size=64, augment=True)
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # deterministic at evaluation
    model.train()
    torch.manual_seed(1)
    seen: list[torch.Tensor] = []
    model.features[0].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with torch.no_grad():
        model(x)
        model(x)
    assert seen[0].shape == (4, 1, 64, 64) and not torch.allclose(seen[0], seen[1])
