"""Flattening a state_dict and back is lossless, buffers included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcrypt.protection.flatten import Layout, flatten, unflatten


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 2),
    )


def test_round_trip_restores_every_tensor_and_dtype() -> None:
    model = _model()
    model(torch.randn(5, 1, 8, 8))  # move BatchNorm statistics and num_batches_tracked
    state = model.state_dict()
    layout = Layout.of(state)
    vec = flatten(state)
    assert vec.shape == (layout.size,) and vec.dtype == np.float64
    back = unflatten(vec, layout)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=1e-7)
    assert int(back["1.num_batches_tracked"]) == 1


def test_wrong_length_is_refused() -> None:
    layout = Layout.of(_model().state_dict())
    with pytest.raises(ValueError, match="the model needs"):
        unflatten(np.zeros(layout.size + 1), layout)


def test_tensor_kinds_and_selection() -> None:
    layout = Layout.of(_model().state_dict())
    kinds = {t.name: t.kind for t in layout.tensors}
    assert kinds == {
        "0.weight": "weight",
        "0.bias": "bias",
        "1.weight": "weight",
        "1.bias": "bias",
        "1.running_mean": "bn_mean",
        "1.running_var": "bn_var",
        "1.num_batches_tracked": "integer",
        "3.weight": "weight",
        "3.bias": "bias",
    }
    sub = layout.select(["3.bias", "1.running_var"])
    assert sub.names() == ["1.running_var", "3.bias"]
    assert [t.offset for t in sub.tensors] == [0, 4] and sub.size == 6
    with pytest.raises(ValueError, match="no tensor"):
        layout.select(["nope"])
