"""Tests of fedcrypt.tasks.models.cnn."""

from __future__ import annotations

import pytest
import torch

from fedcrypt.tasks.models.cnn import SmallCNN, cnn


@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shape(channels: int) -> None:
    model = cnn((channels, 28, 28), 2)
    assert isinstance(model, SmallCNN)
    assert model(torch.randn(3, channels, 28, 28)).shape == (3, 2)


def test_small_enough_for_cpu() -> None:
    n = sum(p.numel() for p in cnn((1, 28, 28), 2).parameters())
    assert 20_000 < n <= 100_000
    assert sum(p.numel() for p in cnn((1, 28, 28), 2, width_mult=0.5).parameters()) < n / 3


def test_other_input_sizes() -> None:
    model = cnn((1, 64, 48), 5).eval()
    assert model(torch.randn(2, 1, 64, 48)).shape == (2, 5)
