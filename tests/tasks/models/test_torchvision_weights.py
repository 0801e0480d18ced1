"""Tests of fedcrypt.tasks.models.torchvision_weights: torchvision ImageNet state_dicts of
MobileNetV2 and ResNet-18 load into the project's models.

torchvision itself cannot be installed here, so the state_dicts are built from the
published architectures with torchvision's key names and shapes (``mobilenet_v2()``:
``features.{i}`` of ``Conv2dNormActivation``/``InvertedResidual``, ``classifier.1``;
``resnet18()``: ``conv1``, ``bn1``, ``layer{1-4}.{0,1}``, ``fc``), independently of the
project's model code, and checked against torchvision's published parameter counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcrypt.exceptions import ConfigError
from fedcrypt.tasks.models import create_model

# torchvision.models.mobilenet_v2().parameters(): 3,504,872; resnet18(): 11,689,512
TORCHVISION_MOBILENET_V2_PARAMS = 3_504_872
TORCHVISION_RESNET18_PARAMS = 11_689_512


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class StateBuilder:
    """Builds a state_dict of random tensors with torchvision's names and shapes."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(0)

    def conv(self, key: str, out: int, inp: int, k: int) -> None:
        self.state[f"{key}.weight"] = torch.randn(out, inp, k, k, generator=self.gen)

    def bn(self, key: str, c: int) -> None:
        self.state[f"{key}.weight"] = torch.rand(c, generator=self.gen) + 0.5
        self.state[f"{key}.bias"] = torch.randn(c, generator=self.gen)
        self.state[f"{key}.running_mean"] = torch.randn(c, generator=self.gen)
        self.state[f"{key}.running_var"] = torch.rand(c, generator=self.gen) + 0.5
        self.state[f"{key}.num_batches_tracked"] = torch.tensor(123)

    def linear(self, key: str, out: int, inp: int) -> None:
        self.state[f"{key}.weight"] = torch.randn(out, inp, generator=self.gen)
        self.state[f"{key}.bias"] = torch.randn(out, generator=self.gen)

    def num_parameters(self) -> int:
        return sum(
            v.numel()
            for k, v in self.state.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )


def torchvision_mobilenet_v2() -> dict[str, torch.Tensor]:
    """``torchvision.models.mobilenet_v2()``'s state_dict layout (Sandler et al. Table 2)."""
    b = StateBuilder()
    b.conv("features.0.0", 32, 3, 3)
    b.bn("features.0.1", 32)
    cin, index = 32, 1
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
        for _ in range(n):
            hidden, p, j = cin * t, f"features.{index}.conv", 0
            if t != 1:
                b.conv(f"{p}.0.0", hidden, cin, 1)  # expand 1x1
                b.bn(f"{p}.0.1", hidden)
                j = 1
            b.conv(f"{p}.{j}.0", hidden, 1, 3)  # depthwise 3x3 (groups=hidden)
            b.bn(f"{p}.{j}.1", hidden)
            b.conv(f"{p}.{j + 1}", c, hidden, 1)  # linear projection
            b.bn(f"{p}.{j + 2}", c)
            cin, index = c, index + 1
    b.conv("features.18.0", 1280, 320, 1)
    b.bn("features.18.1", 1280)
    b.linear("classifier.1", 1000, 1280)
    assert b.num_parameters() == TORCHVISION_MOBILENET_V2_PARAMS
    return b.state


def torchvision_resnet18() -> dict[str, torch.Tensor]:
    """``torchvision.models.resnet18()``'s state_dict layout (He et al., BasicBlock x 2)."""
    b = StateBuilder()
    b.conv("conv1", 64, 3, 7)
    b.bn("bn1", 64)
    for layer, (cin, cout, stride) in enumerate(
        ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)), start=1
    ):
        for block in (0, 1):
            p, inp = f"layer{layer}.{block}", cin if block == 0 else cout
            b.conv(f"{p}.conv1", cout, inp, 3)
            b.bn(f"{p}.bn1", cout)
            b.conv(f"{p}.conv2", cout, cout, 3)
            b.bn(f"{p}.bn2", cout)
            if block == 0 and (stride != 1 or cin != cout):
                b.conv(f"{p}.downsample.0", cout, cin, 1)
                b.bn(f"{p}.downsample.1", cout)
    b.linear("fc", 1000, 512)
    assert b.num_parameters() == TORCHVISION_RESNET18_PARAMS
    return b.state


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_mobilenetv2_grey_from_imagenet(tmp_path: Path) -> None:
    tv = torchvision_mobilenet_v2()
    model = create_model(
        "mobilenetv2",
        input_shape=(1, 28, 28),
        num_classes=2,
        weights=save(tv, tmp_path / "mobilenet_v2.pth"),
    )
    own = model.state_dict()
    feature_keys = {k for k in tv if k.startswith("features.")}
    assert feature_keys == {k for k in own if k.startswith("features.")}
    for key in feature_keys - {"features.0.0.weight"}:
        assert torch.equal(own[key], tv[key]), key
    # first conv averaged over RGB for one channel
    torch.testing.assert_close(
        own["features.0.0.weight"], tv["features.0.0.weight"].mean(dim=1, keepdim=True)
    )
    # the seed paper's transfer head, freshly initialised
    assert own["classifier.1.weight"].shape == (320, 1280)
    assert own["classifier.2.weight"].shape == (2, 320)
    assert "classifier.1.bias" in own and float(own["classifier.1.bias"].abs().sum()) == 0.0
    out = model.eval()(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_mobilenetv2_rgb_keeps_the_stem(tmp_path: Path) -> None:
    tv = torchvision_mobilenet_v2()
    model = create_model(
        "mobilenetv2", input_shape=(3, 64, 64), num_classes=4, weights=save(tv, tmp_path / "w.pth")
    )
    assert torch.equal(model.state_dict()["features.0.0.weight"], tv["features.0.0.weight"])
    assert model.state_dict()["classifier.2.weight"].shape == (4, 320)


def test_resnet18_28px_resamples_the_7x7_stem(tmp_path: Path) -> None:
    tv = torchvision_resnet18()
    model = create_model(
        "resnet18", input_shape=(1, 28, 28), num_classes=3, weights=save(tv, tmp_path / "r.pth")
    )
    own = model.state_dict()
    body = {k for k in tv if not k.startswith("fc.")}
    assert body == {k for k in own if not k.startswith("fc.")}
    for key in body - {"conv1.weight"}:
        assert torch.equal(own[key], tv[key]), key
    stem = own["conv1.weight"]
    assert stem.shape == (64, 1, 3, 3)
    grey = tv["conv1.weight"].mean(dim=1, keepdim=True)
    torch.testing.assert_close(stem.sum(dim=(2, 3)), grey.sum(dim=(2, 3)), rtol=1e-4, atol=1e-4)
    assert own["fc.weight"].shape == (3, 512)
    assert not torch.equal(own["fc.weight"][:3], tv["fc.weight"][:3, :])


def test_resnet18_imagenet_stem_for_larger_images(tmp_path: Path) -> None:
    tv = torchvision_resnet18()
    model = create_model(
        "resnet18", input_shape=(3, 64, 64), num_classes=2, weights=save(tv, tmp_path / "r.pth")
    )
    assert torch.equal(model.state_dict()["conv1.weight"], tv["conv1.weight"])
    assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 2)


def test_mapping_errors(tmp_path: Path) -> None:
    tv = torchvision_mobilenet_v2()
    with pytest.raises(ConfigError, match="width_mult=1"):
        create_model(
            "mobilenetv2",
            input_shape=(1, 28, 28),
            num_classes=2,
            width_mult=0.5,
            weights=save(tv, tmp_path / "w.pth"),
        )
    broken = dict(tv)
    del broken["features.7.conv.1.0.weight"]
    with pytest.raises(ConfigError, match=r"missing key.*features\.7\.conv\.1\.0\.weight"):
        create_model(
            "mobilenetv2",
            input_shape=(1, 28, 28),
            num_classes=2,
            weights=save(broken, tmp_path / "b.pth"),
        )
    # ResNet weights are no MobileNetV2 weights
    with pytest.raises(ConfigError):
        create_model(
            "mobilenetv2",
            input_shape=(1, 28, 28),
            num_classes=2,
            weights=save(torchvision_resnet18(), tmp_path / "r.pth"),
        )
