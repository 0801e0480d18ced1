"""Classification metrics (ROC AUC, ROC curve) via scikit-learn, and weighted means."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.preprocessing import label_binarize


def _check(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    yt = np.asarray(y_true)
    ys = np.asarray(y_score, dtype=np.float64)
    if yt.ndim != 1:
        raise ValueError(f"y_true must have shape (N,), got {yt.shape}")
    if ys.ndim not in (1, 2) or ys.shape[0] != yt.shape[0]:
        raise ValueError(f"y_score must have shape ({yt.size},) or ({yt.size}, C), got {ys.shape}")
    if ys.ndim == 2 and ys.shape[1] == 2:
        ys = ys[:, 1]  # binary given as (N, 2) probabilities
    if ys.ndim == 2 and yt.size and (yt.min() < 0 or yt.max() >= ys.shape[1]):
        raise ValueError(f"y_true holds labels outside [0, {ys.shape[1]})")
    if ys.ndim == 1 and yt.size and not np.isin(yt, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels when y_score is 1-D (binary)")
    return yt.astype(np.int64), ys


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``).

    Parameters
    ----------
    y_true : array_like
        Integer labels, shape ``(N,)``.
    y_score : array_like
        Binary: probability (or any score) of class 1, shape ``(N,)``, or class
        probabilities ``(N, 2)``. Multi-class: probabilities ``(N, C)``.

    Returns
    -------
    float
        Binary AUC; for ``C > 2`` the one-vs-rest macro average over the classes present
        in ``y_true``. ``nan`` when ``y_true`` holds fewer than two classes (AUC is
        undefined, e.g. a hospital's small validation split).

    Raises
    ------
    ValueError
        If the shapes of ``y_true`` and ``y_score`` do not agree, or labels are out of range.
    """
    yt, ys = _check(y_true, y_score)
    present = np.unique(yt)
    if present.size < 2:
        return math.nan
    if ys.ndim == 1:
        return float(roc_auc_score(yt, ys))
    if present.size == ys.shape[1]:
        return float(roc_auc_score(yt, ys, multi_class="ovr", average="macro"))
    # some classes absent: macro average of the defined one-vs-rest AUCs
    return float(np.mean([roc_auc_score(yt == k, ys[:, k]) for k in present]))


def roc_curve_points(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve points (scikit-learn's ``roc_curve``), for plotting.

    Parameters
    ----------
    y_true : array_like
        Integer labels, shape ``(N,)``.
    y_score : array_like
        As for :func:`roc_auc`. For ``C > 2`` classes the micro-averaged curve is
        returned (all one-vs-rest decisions pooled).

    Returns
    -------
    fpr, tpr : numpy.ndarray
        False- and true-positive rates, float64, same length, from (0, 0) to (1, 1).

    Raises
    ------
    ValueError
        If the shapes do not agree, or ``y_true`` holds a single class (no curve).
    """
    yt, ys = _check(y_true, y_score)
    if np.unique(yt).size < 2:
        raise ValueError("the ROC curve is undefined: y_true holds a single class")
    if ys.ndim == 1:
        fpr, tpr, _ = roc_curve(yt, ys)
    else:
        onehot = label_binarize(yt, classes=np.arange(ys.shape[1]))
        fpr, tpr, _ = roc_curve(onehot.ravel(), ys.ravel())
    return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    """``sum(w_i * v_i) / sum(w_i)``, e.g. hospital metrics weighted by example counts.

    NaN values (a metric undefined at one hospital, such as AUC on a single-class
    validation split) are left out together with their weights.

    Parameters
    ----------
    values : sequence of float
        One value per hospital.
    weights : sequence of int
        Non-negative weights (example counts), same length.

    Returns
    -------
    float
        The weighted mean; ``nan`` if every value is NaN or the remaining weights sum to 0.

    Raises
    ------
    ValueError
        If the lengths differ, the sequences are empty, or a weight is negative.
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if v.ndim != 1 or v.shape != w.shape:
        raise ValueError(
            f"values and weights must be 1-D of equal length, got {v.shape}, {w.shape}"
        )
    if v.size == 0:
        raise ValueError("values is empty")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    keep = ~np.isnan(v)
    total = w[keep].sum()
    if total == 0:
        return math.nan
    return float(np.dot(v[keep], w[keep]) / total)
