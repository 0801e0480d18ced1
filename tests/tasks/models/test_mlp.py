"""Tests of fedcrypt.tasks.models.mlp."""

from __future__ import annotations

import torch

from fedcrypt.tasks.models.mlp import MLP, mlp


def test_tabular_forward_shape_and_size() -> None:
    model = mlp((30,), 2)
    assert isinstance(model, MLP)
    out = model(torch.randn(5, 30))
    assert out.shape == (5, 2) and out.dtype == torch.float32
    # 30*64+64 + 64*32+32 + 32*2+2
    assert sum(p.numel() for p in model.parameters()) == 1984 + 2080 + 66


def test_flattens_images_and_scales_width() -> None:
    model = mlp((1, 28, 28), 3, width_mult=0.5)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [32, 16, 3]
    assert linears[0].in_features == 784


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    model = mlp((10,), 2, dropout=0.5)
    x = torch.randn(8, 10)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
