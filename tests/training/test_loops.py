"""Tests of fedcrypt.training.loops: train() and evaluate()."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.data import hospital_data, load_dataset
from fedcrypt.tasks.models import create_model
from fedcrypt.training import EvalResult, evaluate, train
from fedcrypt.training.loops import _balanced_weights, dataset_labels, recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# -- multi-label, clinical metrics, hooks, custom losses ------------------------------------


def multilabel_loader(n: int = 256, k: int = 5, seed: int = 0, batch_size: int = 32) -> DataLoader:
    """Label j is on when feature j is positive (plus a little noise): learnable."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, :k] + 0.3 * rng.normal(size=(n, k)) > 0.5).astype(np.float32)
    return DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size
    )


def test_multilabel_training_learns_every_label() -> None:
    data = multilabel_loader()
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(8,), num_classes=5, dropout=0.0)
    before = evaluate(model, data)
    result = train(model, data, epochs=30, lr=1e-2, seed=0, label_kind="multilabel")
    after = evaluate(model, multilabel_loader(seed=1))
    assert after.label_kind == "multilabel" and before.label_kind == "multilabel"  # inferred
    assert len(after.auc_per_label) == 5 and min(after.auc_per_label) > 0.9
    assert after.auc == pytest.approx(np.mean(after.auc_per_label))
    assert after.y_true.shape == (256, 5) and after.y_score.shape == (256, 5)
    assert after.confusion is None and math.isnan(after.sensitivity)
    assert np.isfinite(result.loss) and after.loss < before.loss
    # loss is BCE-with-logits averaged over labels and examples, scores are sigmoids
    with torch.no_grad():
        x = torch.cat([b[0] for b in multilabel_loader(seed=1)])
        y = torch.cat([b[1] for b in multilabel_loader(seed=1)])
        logits = model.eval()(x)
    assert after.loss == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, y)), rel=1e-5
    )
    np.testing.assert_allclose(after.y_score, torch.sigmoid(logits).numpy(), rtol=1e-5)
    acc = ((torch.sigmoid(logits) >= 0.5) == (y == 1)).float().mean()
    assert after.accuracy == pytest.approx(float(acc))


def test_multilabel_balanced_pos_weight() -> None:
    y = np.zeros((10, 3), dtype=np.float32)
    y[:2, 0] = 1  # 2 positives, 8 negatives -> 4
    y[:, 1] = 1  # no negatives -> 1
    y[:5, 2] = 1  # 5 / 5 -> 1
    data = DataLoader(TensorDataset(torch.zeros(10, 2), torch.from_numpy(y)), batch_size=4)
    torch.testing.assert_close(_balanced_weights(data, "multilabel"), torch.tensor([4.0, 1.0, 1.0]))
    model = create_model("mlp", input_shape=(2,), num_classes=3)
    train(model, data, class_weight="balanced", seed=0)  # runs with pos_weight


def test_binary_clinical_metrics_and_youden() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 3)).astype(np.float32)
    y = (x[:, 0] + 0.8 * rng.normal(size=120) > 0.4).astype(np.int64)
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(3,), num_classes=2, dropout=0.0)
    train(model, loader(x, y), epochs=20, lr=1e-2, seed=0)
    res = evaluate(model, loader(x, y))
    assert res.label_kind == "binary" and res.threshold == 0.5
    assert res.confusion is not None and res.confusion.total == 120
    pred = res.y_score >= 0.5
    assert res.confusion.tp == int(np.sum(pred & (y == 1)))
    assert res.sensitivity == pytest.approx(np.mean(pred[y == 1]))
    assert res.specificity == pytest.approx(np.mean(~pred[y == 0]))
    assert res.balanced_accuracy == pytest.approx((res.sensitivity + res.specificity) / 2)
    assert res.auc_per_label == pytest.approx((res.auc,))
    t = res.youden_threshold()
    at_t = evaluate(model, loader(x, y), threshold=t)
    assert at_t.threshold == t and at_t.confusion == res.confusion_at(t)
    j = at_t.sensitivity + at_t.specificity
    assert j >= res.sensitivity + res.specificity - 1e-12
    assert at_t.auc == res.auc  # the threshold does not change the ranking


def test_multiclass_metrics() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    res = evaluate(create_model("mlp", input_shape=(4,), num_classes=3), loader(x, y))
    assert res.label_kind == "multiclass" and res.confusion is None
    assert len(res.auc_per_label) == 3
    assert res.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, res.y_score.argmax(1)))
    with pytest.raises(ValueError, match="binary"):
        res.confusion_at(0.5)
    with pytest.raises(ConfigError, match="2 logits"):
        evaluate(
            create_model("mlp", input_shape=(4,), num_classes=3), loader(x, y), label_kind="binary"
        )


def test_wrap_hook_replaces_model_optimizer_and_loader() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.int64)
    model = create_model("mlp", input_shape=(6,), num_classes=2)
    calls: list[tuple[object, ...]] = []

    def wrap(m: torch.nn.Module, opt: torch.optim.Optimizer, data: object) -> tuple:
        calls.append((m, opt, data))
        half = loader(x[:16], y[:16], batch_size=8)  # the loop must train on this one
        return m, torch.optim.SGD(m.parameters(), lr=0.0), half

    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, loader(x, y), epochs=2, wrap=wrap, seed=0)
    assert len(calls) == 1 and calls[0][0] is model
    assert isinstance(calls[0][1], torch.optim.Adam)
    assert result.num_examples == 16
    # lr 0: the replaced optimizer was the one stepping
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ConfigError, match="wrap"):
        train(model, loader(x, y), wrap="not callable")  # type: ignore[arg-type]


def test_empty_batches_are_skipped() -> None:
    # Poisson sampling (Opacus) may draw empty batches
    model = create_model("mlp", input_shape=(2,), num_classes=2)
    batches = [
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)),
        (torch.randn(4, 2), torch.tensor([0, 1, 0, 1])),
    ]
    assert train(model, batches, seed=0).num_examples == 4
    assert evaluate(model, batches).num_examples == 4


def test_custom_loss_fn() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    seen: list[int] = []

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(int(target.shape[0]))
        return F.cross_entropy(logits, target) * 2.0

    model = create_model("mlp", input_shape=(3,), num_classes=2, dropout=0.0)
    result = train(model, loader(x, y, 8), loss_fn=loss_fn, seed=0)
    assert seen == [8, 8, 8, 8] and result.num_examples == 32
    res = evaluate(model, loader(x, y, 8), loss_fn=loss_fn)
    plain = evaluate(model, loader(x, y, 8))
    assert res.loss == pytest.approx(2.0 * plain.loss, rel=1e-5)
    with pytest.raises(ConfigError, match="loss_fn"):
        train(model, loader(x, y), loss_fn=loss_fn, class_weight="balanced")
    with pytest.raises(ConfigError, match="label_kind"):
        train(model, loader(x, y), label_kind="regression")  # type: ignore[arg-type]


def test_class_weights_read_labels_without_reading_images() -> None:
    from fedcrypt.tasks.data.images import ImageDataset, ImageSource

    class Exploding(ImageSource):
        def __len__(self) -> int:
            return 6

        def read(self, index: int, *, channels: int, size: tuple[int, int]) -> np.ndarray:
            raise AssertionError("an image was read")

    ds = ImageDataset(Exploding(), np.array([0, 0, 0, 0, 1, 1]), channels=1, size=(4, 4))
    weights = _balanced_weights(DataLoader(ds, batch_size=2))
    torch.testing.assert_close(weights, torch.tensor([6 / 8, 6 / 4]))
    sub = torch.utils.data.Subset(ds, [0, 4, 5])
    torch.testing.assert_close(dataset_labels(sub), torch.tensor([0, 1, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_and_evaluate_on_cuda() -> None:
    data = multilabel_loader()
    model = create_model("cnn", input_shape=(1, 8, 8), num_classes=2).cuda()
    x = torch.randn(16, 1, 8, 8)
    y = torch.tensor([0, 1] * 8)
    batches = DataLoader(TensorDataset(x, y), batch_size=8)
    train(model, batches, epochs=1, class_weight="balanced", seed=0)
    res = evaluate(model, batches)
    assert res.num_examples == 16 and next(model.parameters()).is_cuda
    mlp = create_model("mlp", input_shape=(8,), num_classes=5).cuda()
    train(mlp, data, label_kind="multilabel", class_weight="balanced", seed=0)
    assert len(evaluate(mlp, data).auc_per_label) == 5


def test_recalibrate_batchnorm_gives_exact_statistics() -> None:
    x = torch.randn(10, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.0])
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3, momentum=0.3)).eval()
    one_batch = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=10)
    assert recalibrate_batchnorm(model, one_batch) == 10
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, x.mean(0))
    torch.testing.assert_close(bn.running_var, x.var(0, unbiased=True))
    assert bn.momentum == 0.3 and not model.training  # restored
    assert recalibrate_batchnorm(torch.nn.Linear(3, 2), one_batch) == 0  # no BatchNorm


def test_train_recalibrates_batchnorm_to_the_final_weights() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    data = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=64)

    def run(recalibrate: bool) -> torch.nn.Sequential:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )
        train(net, data, epochs=5, lr=0.05, seed=0, recalibrate_bn=recalibrate)
        return net

    for recalibrate in (True, False):
        net = run(recalibrate)
        with torch.no_grad():
            hidden = net[0](torch.from_numpy(x))
        exact = torch.allclose(net[1].running_mean, hidden.mean(0), atol=1e-5)
        assert exact == recalibrate  # momentum 0.1 lags behind the weights


def test_metrics_record_and_pooling_across_hospitals() -> None:
    from fedcrypt.training.metrics import Confusion, pool_confusions

    rng = np.random.default_rng(7)
    x = rng.normal(size=(80, 3)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=80) > 0).astype(np.int64)
    model = create_model("mlp", input_shape=(3,), num_classes=2, dropout=0.0)
    train(model, loader(x, y), epochs=5, lr=1e-2, seed=0)
    val, test = evaluate(model, loader(x[:40], y[:40])), evaluate(model, loader(x[40:], y[40:]))
    record = test.metrics(youden=val.youden_threshold())
    for key in ("sensitivity", "specificity", "balanced_accuracy", "tp", "fn"):
        assert key in record and f"{key}_youden" in record
    assert record["auc"] == test.auc and record["threshold"] == 0.5
    assert record["youden_threshold"] == val.youden_threshold()
    assert record["sensitivity_youden"] == test.confusion_at(val.youden_threshold()).sensitivity
    # two hospitals' counts pool into the whole set's counts
    both = evaluate(model, loader(x, y))
    pooled = pool_confusions(
        [Confusion.from_counts(val.metrics()), Confusion.from_counts(test.metrics())]
    )
    assert pooled == both.confusion
    multi = evaluate(create_model("mlp", input_shape=(8,), num_classes=5), multilabel_loader())
    assert {f"auc_{k}" for k in range(5)} <= set(multi.metrics()) and "tp" not in multi.metrics()
    with pytest.raises(ValueError, match="whole number"):
        Confusion.from_counts({"tp": 1.5, "fp": 0, "tn": 0, "fn": 0})
