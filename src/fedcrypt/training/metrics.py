"""Classification metrics via scikit-learn: ROC AUC, ROC curves, clinical metrics, means.

ROC AUC for binary, multi-class and multi-label data, per-class ROC curves, clinical
metrics from confusion counts, the Youden threshold, weighted means.

Conventions
-----------
* **Binary**: ``y_true`` holds 0/1 labels ``(N,)``, class 1 is the *positive* class and
  ``y_score`` is its probability (or any score), ``(N,)``. An example is called positive
  when ``y_score >= threshold`` (scikit-learn's ``roc_curve`` uses the same ``>=``).
* **Multi-class**: ``y_true`` int labels ``(N,)`` in ``[0, C)``, ``y_score`` class
  probabilities ``(N, C)``; AUC is the one-vs-rest macro average.
* **Multi-label**: ``y_true`` 0/1 ``(N, K)``, ``y_score`` per-label probabilities
  ``(N, K)``; AUC is the macro average of the per-label AUCs (labels whose AUC is defined).

Sensitivity, specificity and balanced accuracy pooled over hospitals are computed from the
*summed* confusion counts (:func:`pool_confusions`), not by averaging per-hospital rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve
from sklearn.preprocessing import label_binarize

LABEL_KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel")


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


def _check_multilabel(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    yt = np.asarray(y_true)
    ys = np.asarray(y_score, dtype=np.float64)
    if yt.ndim != 2 or ys.shape != yt.shape:
        raise ValueError(
            f"multi-label y_true and y_score must both have shape (N, K), got {yt.shape} "
            f"and {ys.shape}"
        )
    if yt.size and not np.isin(yt, (0, 1)).all():
        raise ValueError("multi-label y_true must hold 0/1 values")
    return yt.astype(np.int64), ys


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``), binary or multi-class.

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


def auc_per_label(y_true: ArrayLike, y_score: ArrayLike) -> NDArray[np.float64]:
    """ROC AUC of every label (multi-label) or every class one-vs-rest (multi-class).

    Parameters
    ----------
    y_true : array_like
        Multi-label: 0/1 ``(N, K)``. Multi-class: int labels ``(N,)`` with ``y_score``
        ``(N, C)``. Binary: 0/1 labels ``(N,)`` with ``y_score`` ``(N,)``.
    y_score : array_like
        Scores, ``(N, K)``, ``(N, C)`` or ``(N,)``.

    Returns
    -------
    numpy.ndarray
        float64 ``(K,)``, ``(C,)``, or ``(1,)`` for binary (the positive class). A label
        (class) that is all-0 or all-1 in ``y_true`` gets ``nan``.

    Raises
    ------
    ValueError
        If the shapes do not agree or labels are out of range.
    """
    yt_raw = np.asarray(y_true)
    if yt_raw.ndim == 2:
        yt, ys = _check_multilabel(yt_raw, y_score)
        columns = yt
    else:
        yt1, ys = _check(yt_raw, y_score)
        if ys.ndim == 1:
            ys = ys[:, None]
            columns = yt1[:, None]
        else:
            columns = label_binarize(yt1, classes=np.arange(ys.shape[1]))  # C > 2
    out = np.full(ys.shape[1], math.nan)
    for k in range(ys.shape[1]):
        col = columns[:, k]
        if 0 < col.sum() < col.size:
            out[k] = roc_auc_score(col, ys[:, k])
    return out


def auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """The headline ROC AUC of a binary, multi-class or multi-label evaluation.

    Binary: the AUC of the positive class. Multi-class: the one-vs-rest macro average
    (:func:`roc_auc`). Multi-label (``y_true`` of shape ``(N, K)``): the macro average of
    :func:`auc_per_label` over the labels whose AUC is defined (a label present in every
    example or in none is left out), as MedMNIST v2 reports ChestMNIST.

    Returns
    -------
    float
        ``nan`` if no AUC is defined.

    Raises
    ------
    ValueError
        If the shapes do not agree or labels are out of range.
    """
    if np.asarray(y_true).ndim == 2:
        per = auc_per_label(y_true, y_score)
        return math.nan if np.isnan(per).all() else float(np.nanmean(per))
    return roc_auc(y_true, y_score)


@dataclass(frozen=True)
class Confusion:
    """Confusion counts of a binary decision (class 1 is the positive class).

    Counts add up across hospitals (``a + b`` or :func:`pool_confusions`); rates derived
    from pooled counts are the consortium's rates.

    Attributes
    ----------
    tp, fp, tn, fn : int
        True/false positives, true/false negatives.
    """

    tp: int
    fp: int
    tn: int
    fn: int

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "tn", "fn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"confusion count {name} must be an integer >= 0, got {value!r}")

    def __add__(self, other: Confusion) -> Confusion:
        if not isinstance(other, Confusion):
            return NotImplemented
        return Confusion(
            tp=self.tp + other.tp,
            fp=self.fp + other.fp,
            tn=self.tn + other.tn,
            fn=self.fn + other.fn,
        )

    @property
    def total(self) -> int:
        """Examples counted."""
        return int(self.tp + self.fp + self.tn + self.fn)

    @property
    def sensitivity(self) -> float:
        """``tp / (tp + fn)``: recall of the positive class (true-positive rate); nan if
        there are no positives."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """``tn / (tn + fp)``: recall of the negative class; nan if there are no negatives."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def balanced_accuracy(self) -> float:
        """``(sensitivity + specificity) / 2``; nan unless both classes occur."""
        return (self.sensitivity + self.specificity) / 2

    @property
    def accuracy(self) -> float:
        """``(tp + tn) / total``."""
        return _ratio(self.tp + self.tn, self.total)

    @property
    def precision(self) -> float:
        """``tp / (tp + fp)``: positive predictive value; nan if nothing is called positive."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        """``tn / (tn + fn)``: negative predictive value."""
        return _ratio(self.tn, self.tn + self.fn)

    @classmethod
    def from_counts(cls, counts: Mapping[str, float], *, suffix: str = "") -> Confusion:
        """Rebuild counts from a metrics record (``tp``, ``fp``, ``tn``, ``fn`` + ``suffix``,
        e.g. a hospital's reply; floats holding whole numbers are accepted).

        Raises
        ------
        ValueError
            If a count is missing, negative or not a whole number.
        """
        values: dict[str, int] = {}
        for name in ("tp", "fp", "tn", "fn"):
            key = f"{name}{suffix}"
            if key not in counts:
                raise ValueError(f"confusion count {key!r} missing")
            value = float(counts[key])
            if not (math.isfinite(value) and value >= 0 and value == int(value)):
                raise ValueError(
                    f"confusion count {key!r} must be a whole number >= 0, got {value!r}"
                )
            values[name] = int(value)
        return cls(**values)

    def as_dict(self) -> dict[str, float]:
        """Counts and rates, for records: ``tp fp tn fn sensitivity specificity
        balanced_accuracy precision npv``."""
        return {
            "tp": float(self.tp),
            "fp": float(self.fp),
            "tn": float(self.tn),
            "fn": float(self.fn),
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "balanced_accuracy": self.balanced_accuracy,
            "precision": self.precision,
            "npv": self.npv,
        }


def _ratio(num: int, den: int) -> float:
    return float(num) / float(den) if den else math.nan


def confusion(y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5) -> Confusion:
    """Binary confusion counts when ``y_score >= threshold`` is called positive.

    Parameters
    ----------
    y_true : array_like
        0/1 labels ``(N,)`` (1 = positive class).
    y_score : array_like
        Positive-class probabilities ``(N,)`` (or ``(N, 2)``).
    threshold : float
        Decision threshold (default: 0.5).

    Returns
    -------
    Confusion

    Raises
    ------
    ValueError
        If the data are not binary, the shapes disagree, or ``threshold`` is NaN.
    """
    yt, ys = _check(y_true, y_score)
    if ys.ndim != 1:
        raise ValueError("confusion counts need a binary task (y_score of shape (N,))")
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    pred = ys >= threshold
    pos = yt == 1
    return Confusion(
        tp=int(np.sum(pred & pos)),
        fp=int(np.sum(pred & ~pos)),
        tn=int(np.sum(~pred & ~pos)),
        fn=int(np.sum(~pred & pos)),
    )


def pool_confusions(counts: Iterable[Confusion]) -> Confusion:
    """Sum confusion counts across hospitals (or batches).

    Pooled sensitivity is ``sum(tp) / sum(tp + fn)``, which weights each hospital by
    its number of positives, unlike a mean of per-hospital sensitivities.

    Raises
    ------
    ValueError
        If ``counts`` is empty.
    """
    items = list(counts)
    if not items:
        raise ValueError("no confusion counts to pool")
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def sensitivity(y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5) -> float:
    """True-positive rate of the binary decision ``y_score >= threshold``; nan without
    positives. See :func:`confusion`."""
    return confusion(y_true, y_score, threshold=threshold).sensitivity


def specificity(y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5) -> float:
    """True-negative rate of the binary decision ``y_score >= threshold``; nan without
    negatives. See :func:`confusion`."""
    return confusion(y_true, y_score, threshold=threshold).specificity


def balanced_accuracy(y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5) -> float:
    """Mean per-class recall.

    Binary (``y_score`` ``(N,)``): ``(sensitivity + specificity) / 2`` at ``threshold``.
    Multi-class (``y_score`` ``(N, C)``): scikit-learn's ``balanced_accuracy_score`` of
    the arg-max prediction over the classes present in ``y_true`` (``threshold`` unused).
    Multi-label (``(N, K)`` both): the mean over labels of each label's balanced
    accuracy at ``threshold`` (labels where it is undefined left out).

    Returns
    -------
    float
        ``nan`` when undefined (a single class).

    Raises
    ------
    ValueError
        If the shapes do not agree or labels are out of range.
    """
    yt_raw = np.asarray(y_true)
    if yt_raw.ndim == 2:
        yt, ys = _check_multilabel(yt_raw, y_score)
        per = [confusion(yt[:, k], ys[:, k], threshold=threshold) for k in range(yt.shape[1])]
        values = np.array([c.balanced_accuracy for c in per])
        return math.nan if np.isnan(values).all() else float(np.nanmean(values))
    yt1, ys = _check(yt_raw, y_score)
    if ys.ndim == 1:
        return confusion(yt1, ys, threshold=threshold).balanced_accuracy
    if yt1.size == 0:
        return math.nan
    return float(balanced_accuracy_score(yt1, ys.argmax(axis=1)))


def youden_threshold(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1.

    Youden, "Index for rating diagnostic tests", Cancer 3(1), 1950. Chosen on
    *validation* scores and then applied unchanged to test scores (choosing it on the
    test split would overstate the test metrics).

    Parameters
    ----------
    y_true : array_like
        0/1 labels ``(N,)``.
    y_score : array_like
        Positive-class probabilities ``(N,)``.

    Returns
    -------
    float
        One of the observed scores (use as ``y_score >= threshold``); among thresholds
        with equal J, the largest. ``nan`` when ``y_true`` holds a single class (the
        caller then keeps 0.5).

    Raises
    ------
    ValueError
        If the data are not binary or the shapes disagree.
    """
    yt, ys = _check(y_true, y_score)
    if ys.ndim != 1:
        raise ValueError("the Youden threshold needs a binary task (y_score of shape (N,))")
    if np.unique(yt).size < 2:
        return math.nan
    fpr, tpr, thresholds = roc_curve(yt, ys, drop_intermediate=False)
    j = tpr - fpr
    finite = np.isfinite(thresholds)
    j = np.where(finite, j, -np.inf)
    return float(thresholds[int(np.argmax(j))])


def roc_curve_points(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve points (scikit-learn's ``roc_curve``), for plotting.

    Parameters
    ----------
    y_true : array_like
        Integer labels, shape ``(N,)``; or 0/1 ``(N, K)`` for multi-label.
    y_score : array_like
        As for :func:`roc_auc` (or ``(N, K)`` multi-label). For ``C > 2`` classes and
        for multi-label data the micro-averaged curve is returned (all one-vs-rest /
        per-label decisions pooled).

    Returns
    -------
    fpr, tpr : numpy.ndarray
        False- and true-positive rates, float64, same length, from (0, 0) to (1, 1).

    Raises
    ------
    ValueError
        If the shapes do not agree, or ``y_true`` holds a single class (no curve).
    """
    if np.asarray(y_true).ndim == 2:
        yt2, ys2 = _check_multilabel(y_true, y_score)
        flat_t, flat_s = yt2.ravel(), ys2.ravel()
        if np.unique(flat_t).size < 2:
            raise ValueError("the ROC curve is undefined: y_true holds a single class")
        fpr, tpr, _ = roc_curve(flat_t, flat_s)
        return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    yt, ys = _check(y_true, y_score)
    if np.unique(yt).size < 2:
        raise ValueError("the ROC curve is undefined: y_true holds a single class")
    if ys.ndim == 1:
        fpr, tpr, _ = roc_curve(yt, ys)
    else:
        onehot = label_binarize(yt, classes=np.arange(ys.shape[1]))
        fpr, tpr, _ = roc_curve(onehot.ravel(), ys.ravel())
    return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)


@dataclass(frozen=True)
class RocCurve:
    """One ROC curve for a plot.

    Attributes
    ----------
    name : str
        The positive class of this curve (binary: the positive class; multi-class: the
        class against the rest; multi-label: the label), or ``"micro-average"``.
    fpr, tpr : tuple of float
        False- and true-positive rates from (0, 0) to (1, 1).
    auc : float
        Area under this curve.
    """

    name: str
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    auc: float


def roc_curves(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    class_names: Sequence[str] | None = None,
    micro: bool = True,
) -> list[RocCurve]:
    """Per-class ROC curves for plots, each naming its positive class.

    Parameters
    ----------
    y_true, y_score : array_like
        Binary ``(N,)``/``(N,)``, multi-class ``(N,)``/``(N, C)`` or multi-label
        ``(N, K)``/``(N, K)``.
    class_names : sequence of str, optional
        One name per class (binary: two, index 1 positive) or label (default: ``class k``).
    micro : bool
        Also return the micro-average curve for multi-class and multi-label data
        (default: True).

    Returns
    -------
    list of RocCurve
        Binary: one curve, for the positive class. Otherwise one per class/label whose
        curve is defined (both outcomes present), then ``micro-average`` if asked.

    Raises
    ------
    ValueError
        If the shapes disagree, the names do not match, or no curve is defined.
    """
    yt_raw = np.asarray(y_true)
    ys_raw = np.asarray(y_score, dtype=np.float64)
    if yt_raw.ndim == 2:
        yt, ys = _check_multilabel(yt_raw, ys_raw)
        columns, scores = yt, ys
        binary = False
    else:
        yt1, ys = _check(yt_raw, ys_raw)
        binary = ys.ndim == 1
        if binary:
            columns, scores = yt1[:, None], ys[:, None]
        else:
            columns, scores = label_binarize(yt1, classes=np.arange(ys.shape[1])), ys
    width = 2 if binary else scores.shape[1]
    names = (
        list(class_names)
        if class_names is not None
        else [f"{'label' if yt_raw.ndim == 2 else 'class'} {k}" for k in range(width)]
    )
    if len(names) != width:
        raise ValueError(f"{len(names)} class names for {width} classes")
    curves: list[RocCurve] = []
    for k in range(scores.shape[1]):
        col = columns[:, k]
        if not 0 < col.sum() < col.size:
            continue
        fpr, tpr, _ = roc_curve(col, scores[:, k])
        curves.append(
            RocCurve(
                name=names[1] if binary else names[k],
                fpr=tuple(float(v) for v in fpr),
                tpr=tuple(float(v) for v in tpr),
                auc=float(roc_auc_score(col, scores[:, k])),
            )
        )
    if not curves:
        raise ValueError("no ROC curve is defined: every class is all-present or all-absent")
    if micro and not binary:
        flat_t, flat_s = columns.ravel(), scores.ravel()
        fpr, tpr, _ = roc_curve(flat_t, flat_s)
        curves.append(
            RocCurve(
                name="micro-average",
                fpr=tuple(float(v) for v in fpr),
                tpr=tuple(float(v) for v in tpr),
                auc=float(roc_auc_score(flat_t, flat_s)),
            )
        )
    return curves


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
