"""Tests of fedcrypt.tasks.models.resnet against the published ResNet-18 and MedMNIST's
28-px variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcrypt.tasks.models import create_model
from fedcrypt.tasks.models.resnet import ResNet18, resnet18

# torchvision.models.resnet18() (ImageNet stem, 1000 classes): 11,689,512 parameters
TORCHVISION_RESNET18_PARAMS = 11_689_512


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_imagenet_variant_matches_torchvision_count() -> None:
    model = ResNet18(3, 1000, small_input=False)
    assert count(model) == TORCHVISION_RESNET18_PARAMS
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.conv1.kernel_size == (7, 7)


def test_28px_variant_keeps_a_4x4_map() -> None:
    model = resnet18((1, 28, 28), 2).eval()
    assert model.small_input and isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    # 7x7x3 stem and max-pool replaced: 9408 - 576 fewer stem weights; 2-class head
    assert count(model) == TORCHVISION_RESNET18_PARAMS - 9_408 + 576 - 512 * 998 - 998
    seen: list[tuple[int, ...]] = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 2) and seen == [(2, 512, 4, 4)]


def test_registry_builds_resnet18_with_no_dropout_by_default() -> None:
    model = create_model("resnet18", input_shape=(3, 28, 28), num_classes=5)
    assert isinstance(model, ResNet18) and model.dropout.p == 0.0
    assert model.eval()(torch.randn(1, 3, 28, 28)).shape == (1, 5)
    larger = create_model("resnet18", input_shape=(1, 96, 96), num_classes=2)
    assert isinstance(larger, ResNet18) and not larger.small_input
