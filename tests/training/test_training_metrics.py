"""Tests of fedcrypt.training.metrics against scikit-learn and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedcrypt.training.metrics import roc_auc, roc_curve_points, weighted_mean


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
