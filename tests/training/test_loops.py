"""Tests of fedcrypt.training.loops: train() and evaluate()."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.data import hospital_data, load_dataset
from fedcrypt.tasks.models import create_model
from fedcrypt.training import EvalResult, evaluate, train
from fedcrypt.training.loops import _balanced_weights


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Use one intra-op thread: on a busy 2-core machine more threads are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loader(x: np.ndarray, y: np.ndarray, batch_size: int = 16) -> DataLoader:
    return DataLoader(
        TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(y).long()),
        batch_size=batch_size,
    )


def test_mlp_on_wdbc_reaches_high_auc() -> None:
    ds = load_dataset("wdbc", seed=0)
    data = hospital_data(ds, client_id=0, num_clients=1, val_fraction=0.0, seed=0)
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=ds.input_shape, num_classes=2)
    before = evaluate(model, data.test)
    start = time.perf_counter()
    result = train(model, data.train, epochs=10, lr=3e-3, seed=0)
    after = evaluate(model, data.test)
    assert time.perf_counter() - start < 30
    assert result.num_examples == len(ds.train) == 341
    assert result.seconds > 0 and np.isfinite(result.loss)
    assert after.auc > 0.95 and after.accuracy > 0.9
    assert after.loss < before.loss
    assert after.num_examples == len(ds.test) == 114


def test_evaluate_agrees_with_sklearn() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=50) > 0).astype(np.int64)
    torch.manual_seed(1)
    model = create_model("mlp", input_shape=(5,), num_classes=2)
    res = evaluate(model, loader(x, y))
    assert isinstance(res, EvalResult)
    with torch.no_grad():
        probs = model.eval()(torch.from_numpy(x)).softmax(1).numpy()
    np.testing.assert_array_equal(res.y_true, y)
    np.testing.assert_allclose(res.y_score, probs[:, 1], rtol=1e-5)
    assert res.auc == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert res.accuracy == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert res.loss == pytest.approx(log_loss(y, probs), rel=1e-4)
    assert res.num_examples == 50


def test_evaluate_multiclass_and_restores_mode() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = np.arange(40) % 3
    model = create_model("mlp", input_shape=(4,), num_classes=3)
    model.train()
    res = evaluate(model, loader(x, y))
    assert model.training
    assert res.y_score.shape == (40, 3)
    np.testing.assert_allclose(res.y_score.sum(1), 1.0, rtol=1e-6)
    assert res.auc == pytest.approx(roc_auc_score(y, res.y_score, multi_class="ovr"))


def test_training_is_deterministic_given_seed() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.int64)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(123)
        model = create_model("mlp", input_shape=(6,), num_classes=2, dropout=0.5)
        train(model, DataLoader(data, batch_size=8, shuffle=True), epochs=2, seed=seed)
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_balanced_class_weight() -> None:
    y = np.array([0] * 90 + [1] * 10)
    x = np.zeros((100, 2), dtype=np.float32)
    weights = _balanced_weights(loader(x, y))
    torch.testing.assert_close(weights, torch.tensor([100 / (2 * 90), 100 / (2 * 10)]))
    # with balanced weights an imbalanced set is no longer fitted by predicting the majority
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    y = ((x[:, 0] > 1.0) | (rng.random(200) < 0.02)).astype(np.int64)
    recalls = {}
    for mode in ("none", "balanced"):
        torch.manual_seed(0)
        model = create_model("mlp", input_shape=(2,), num_classes=2, dropout=0.0)
        train(model, loader(x, y, 32), epochs=3, lr=3e-3, class_weight=mode, seed=0)
        res = evaluate(model, loader(x, y))
        pred = res.y_score > 0.5
        recalls[mode] = pred[y == 1].mean()
    assert recalls["balanced"] > recalls["none"]


def test_train_argument_errors() -> None:
    model = create_model("mlp", input_shape=(2,), num_classes=2)
    data = loader(np.zeros((4, 2), dtype=np.float32), np.array([0, 1, 0, 1]))
    for kwargs in ({"epochs": 0}, {"lr": 0.0}, {"weight_decay": -1.0}, {"class_weight": "x"}):
        with pytest.raises(ConfigError):
            train(model, data, **kwargs)
    empty = loader(np.zeros((0, 2), dtype=np.float32), np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError):
        train(model, empty)
    with pytest.raises(DataError):
        evaluate(model, empty)
