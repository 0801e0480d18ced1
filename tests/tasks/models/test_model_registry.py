"""Tests of the fedcrypt.tasks.models registry: create_model and weights files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.models import MODELS, create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (30,)), ("mlp", (1, 28, 28)), ("cnn", (1, 28, 28)), ("mobilenetv2", (3, 28, 28))],
)
def test_every_model_outputs_logits(name: str, shape: tuple[int, ...]) -> None:
    model = create_model(name, input_shape=shape, num_classes=3).eval()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 3)
    assert not torch.allclose(out.sum(1), torch.ones(2))  # logits, not probabilities


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnet50", input_shape=(1, 28, 28), num_classes=2)
    assert all(name in str(info.value) for name in MODELS)


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2"])
def test_image_models_reject_tabular_input(name: str) -> None:
    with pytest.raises(ConfigError, match="mlp"):
        create_model(name, input_shape=(30,), num_classes=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"width_mult": 0.0},
        {"dropout": 1.0},
        {"input_shape": (1, 0, 28)},
        {"input_shape": (1, 8, 8)},  # too small for mobilenetv2
    ],
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"input_shape": (1, 28, 28), "num_classes": 2} | kwargs
    with pytest.raises(ConfigError):
        create_model("mobilenetv2", **args)  # type: ignore[arg-type]


def test_weights_round_trip(tmp_path: Path) -> None:
    source = create_model("cnn", input_shape=(1, 28, 28), num_classes=2)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "cnn.pt"
    torch.save(source.state_dict(), path)
    loaded = create_model("cnn", input_shape=(1, 28, 28), num_classes=2, weights=path)
    for (k, a), (_, b) in zip(
        source.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(source.eval()(x), loaded.eval()(x))


def test_mismatched_weights_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "three_classes.pt"
    torch.save(create_model("cnn", input_shape=(1, 28, 28), num_classes=3).state_dict(), path)
    with pytest.raises(ConfigError, match="shape mismatch"):
        create_model("cnn", input_shape=(1, 28, 28), num_classes=2, weights=path)
    with pytest.raises(ConfigError, match="missing key"):
        create_model("mlp", input_shape=(1, 28, 28), num_classes=3, weights=path)


def test_unreadable_weights_are_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        create_model("mlp", input_shape=(30,), num_classes=2, weights=tmp_path / "none.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(DataError, match="cannot read"):
        create_model("mlp", input_shape=(30,), num_classes=2, weights=garbage)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(DataError, match="state_dict"):
        create_model("mlp", input_shape=(30,), num_classes=2, weights=tensor_only)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module needs unpickling code
    with pytest.raises(DataError):
        create_model("mlp", input_shape=(30,), num_classes=2, weights=path)
