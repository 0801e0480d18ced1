"""Tests of fedcrypt.training.metrics against scikit-learn and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedcrypt.training.metrics import (
    Confusion,
    auc,
    auc_per_label,
    balanced_accuracy,
    confusion,
    pool_confusions,
    roc_auc,
    roc_curve_points,
    roc_curves,
    sensitivity,
    specificity,
    weighted_mean,
    youden_threshold,
)

#: Six examples of three classes and their predicted probabilities.
THREE_CLASSES_Y = np.array([0, 1, 2, 2, 1, 0])
THREE_CLASSES_P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.3, 0.6],
        [0.3, 0.3, 0.4],
        [0.1, 0.8, 0.1],
        [0.3, 0.4, 0.3],
    ]
)


def test_binary_auc_known_answer() -> None:
    # pairs (pos, neg): 0.8>0.1, 0.8>0.4, 0.35<0.4, 0.35>0.1 -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    assert roc_auc([0, 0, 1, 1], probs) == pytest.approx(0.75)


def test_multiclass_auc_is_ovr_macro() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=60)
    p = rng.dirichlet(np.ones(3), size=60)
    p[np.arange(60), y] += 0.3
    p /= p.sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert roc_auc(y, p) == pytest.approx(expected)
    # a class missing from y_true: macro over the present classes
    y2 = np.where(y == 2, 0, y)
    per_class = [roc_auc_score(y2 == k, p[:, k]) for k in (0, 1)]
    assert roc_auc(y2, p) == pytest.approx(np.mean(per_class))


def test_auc_nan_for_single_class() -> None:
    assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_auc_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="y_score"):
        roc_auc([0, 1, 1], [0.2, 0.5])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2, 1], [0.2, 0.5, 0.1])


def test_roc_curve_binary_and_micro() -> None:
    fpr, tpr = roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    fpr, tpr = roc_curve_points(y, p)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    micro = roc_auc_score(np.eye(3)[y].ravel(), p.ravel())
    assert np.trapezoid(tpr, fpr) == pytest.approx(micro)
    with pytest.raises(ValueError, match="single class"):
        roc_curve_points([0, 0], [0.1, 0.2])


def test_weighted_mean() -> None:
    assert weighted_mean([0.5, 1.0], [1, 3]) == pytest.approx(0.875)
    assert weighted_mean([0.5, float("nan"), 1.0], [1, 100, 3]) == pytest.approx(0.875)
    assert math.isnan(weighted_mean([float("nan")], [4]))
    assert math.isnan(weighted_mean([0.3, 0.4], [0, 0]))
    with pytest.raises(ValueError, match="equal length"):
        weighted_mean([1.0], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean([1.0, 2.0], [1, -1])


# -- multi-label, clinical metrics, Youden, pooling, per-class curves -----------------------


def multilabel_data(n: int = 80, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.int64)
    s = np.clip(0.5 * y + 0.6 * rng.random((n, k)), 0, 1)
    return y, s


def test_auc_per_label_matches_sklearn_and_macro() -> None:
    y, s = multilabel_data()
    per = auc_per_label(y, s)
    assert per.shape == (4,)
    for k in range(4):
        assert per[k] == pytest.approx(roc_auc_score(y[:, k], s[:, k]))
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s, average="macro"))
    # a label absent everywhere has no AUC and is left out of the macro average
    y[:, 2] = 0
    per = auc_per_label(y, s)
    assert math.isnan(per[2]) and not np.isnan(per[[0, 1, 3]]).any()
    assert auc(y, s) == pytest.approx(np.mean(per[[0, 1, 3]]))
    assert math.isnan(auc(np.zeros((3, 2), dtype=int), np.full((3, 2), 0.5)))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        auc_per_label(y, s[:, :3])
    with pytest.raises(ValueError, match="0/1"):
        auc_per_label(y * 2, s)


def test_auc_per_class_multiclass_and_binary() -> None:
    y, p = THREE_CLASSES_Y, THREE_CLASSES_P
    per = auc_per_label(y, p)
    assert per == pytest.approx([roc_auc_score(y == k, p[:, k]) for k in range(3)])
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert auc_per_label([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx([0.75])


def test_confusion_counts_known_answer() -> None:
    y = [0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.6, 0.5, 0.9, 0.5, 0.4, 0.7]
    c = confusion(y, s)  # >= 0.5 is positive: 0.6 and 0.5 are false positives
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 2, 1, 1)
    assert c.sensitivity == pytest.approx(3 / 4) and c.specificity == pytest.approx(1 / 3)
    assert c.balanced_accuracy == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert c.precision == pytest.approx(3 / 5) and c.npv == pytest.approx(1 / 2)
    assert c.accuracy == pytest.approx(4 / 7) and c.total == 7
    assert sensitivity(y, s, threshold=0.65) == pytest.approx(2 / 4)
    assert specificity(y, s, threshold=0.65) == pytest.approx(1.0)
    assert balanced_accuracy(y, s, threshold=0.65) == pytest.approx(0.75)
    # agrees with scikit-learn
    pred = (np.asarray(s) >= 0.5).astype(int)
    assert balanced_accuracy(y, s) == pytest.approx(balanced_accuracy_score(y, pred))
    assert math.isnan(confusion([1, 1], [0.2, 0.9]).specificity)
    with pytest.raises(ValueError, match="binary"):
        confusion([0, 1, 2], np.eye(3))
    with pytest.raises(ValueError):
        Confusion(tp=-1, fp=0, tn=0, fn=0)


def test_pooled_sensitivity_is_from_counts_not_a_mean_of_rates() -> None:
    a = Confusion(tp=9, fp=0, tn=10, fn=1)  # 90 % of 10 positives
    b = Confusion(tp=0, fp=0, tn=10, fn=2)  # 0 % of 2 positives
    pooled = pool_confusions([a, b])
    assert (pooled.tp, pooled.fp, pooled.tn, pooled.fn) == (9, 0, 20, 3)
    assert pooled.sensitivity == pytest.approx(9 / 12)
    assert pooled.sensitivity != pytest.approx((a.sensitivity + b.sensitivity) / 2)
    assert a + b == pooled
    with pytest.raises(ValueError, match="no confusion"):
        pool_confusions([])


def test_balanced_accuracy_multiclass_and_multilabel() -> None:
    y = np.array([0, 0, 0, 0, 1, 2])
    p = np.eye(3)[[0, 0, 0, 1, 1, 0]]
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    yl, sl = multilabel_data()
    expected = np.mean(
        [balanced_accuracy_score(yl[:, k], sl[:, k] >= 0.5) for k in range(yl.shape[1])]
    )
    assert balanced_accuracy(yl, sl) == pytest.approx(expected)


def test_youden_threshold_maximises_j_on_its_data() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.55, 0.7, 0.8, 0.9, 0.95])
    t = youden_threshold(y, s)
    assert t == pytest.approx(0.7)  # sens 4/5, spec 1: J = 0.8 (0.55: 1 + 3/4 - 1)
    # equal J: the largest threshold
    assert youden_threshold([0, 1, 0, 1], [0.1, 0.3, 0.5, 0.7]) == pytest.approx(0.7)
    best = max(
        confusion(y, s, threshold=c).sensitivity + confusion(y, s, threshold=c).specificity
        for c in np.unique(s)
    )
    at_t = confusion(y, s, threshold=t)
    assert at_t.sensitivity + at_t.specificity == pytest.approx(best)
    assert math.isnan(youden_threshold([1, 1, 1], [0.3, 0.4, 0.5]))
    with pytest.raises(ValueError, match="binary"):
        youden_threshold([0, 1, 2], np.eye(3))


def test_roc_curves_name_their_positive_class() -> None:
    curves = roc_curves([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], class_names=["benign", "malignant"])
    assert [c.name for c in curves] == ["malignant"]
    assert curves[0].auc == pytest.approx(0.75)
    assert curves[0].fpr[0] == 0.0 and curves[0].tpr[-1] == 1.0
    y, p = THREE_CLASSES_Y, THREE_CLASSES_P
    curves = roc_curves(y, p, class_names=["a", "b", "c"])
    assert [c.name for c in curves] == ["a", "b", "c", "micro-average"]
    for k, c in enumerate(curves[:3]):
        assert c.auc == pytest.approx(roc_auc_score(y == k, p[:, k]))
        assert np.trapezoid(c.tpr, c.fpr) == pytest.approx(c.auc)
    yl, sl = multilabel_data()
    yl[:, 1] = 1  # label 1 present everywhere: no curve
    curves = roc_curves(yl, sl, micro=False)
    assert [c.name for c in curves] == ["label 0", "label 2", "label 3"]
    fpr, tpr = roc_curve_points(yl, sl)
    assert fpr[0] == 0 and tpr[-1] == 1
    with pytest.raises(ValueError, match="class names"):
        roc_curves([0, 1], [0.2, 0.7], class_names=["only one"])
