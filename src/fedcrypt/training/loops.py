"""Local training and evaluation loops: Adam, cross-entropy or BCE, clinical metrics.

Cross-entropy for binary and multi-class labels, BCE-with-logits for multi-label ones;
softmax / sigmoid scores and clinical metrics at evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, Subset, TensorDataset

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.training.metrics import (
    Confusion,
    auc,
    auc_per_label,
    balanced_accuracy,
    confusion,
    youden_threshold,
)

CLASS_WEIGHTS: tuple[str, ...] = ("none", "balanced")
LABEL_KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel")

LabelKind = Literal["binary", "multiclass", "multilabel"]
Batches = DataLoader[Any] | Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Wrap = Callable[
    [nn.Module, torch.optim.Optimizer, Any], tuple[nn.Module, torch.optim.Optimizer, Any]
]


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train` did.

    Attributes
    ----------
    loss : float
        Mean training loss per example over the *last* epoch: cross-entropy (with class
        weights when ``class_weight="balanced"``), BCE-with-logits averaged over the
        labels (multi-label), or the mean of ``loss_fn`` over the batches weighted by
        their sizes.
    num_examples : int
        Examples in one pass over the loader (the hospital's FedAvg weight, not
        multiplied by ``epochs``).
    seconds : float
        Wall-clock training time in seconds.
    """

    loss: float
    num_examples: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one loader, and the scores they come from.

    Attributes
    ----------
    loss : float
        Mean (unweighted) loss per example: cross-entropy, BCE-with-logits averaged over
        labels (multi-label), or ``loss_fn``'s batch means weighted by batch sizes.
    accuracy : float
        Fraction of examples whose arg-max class is the label; multi-label: fraction of
        (example, label) decisions ``score >= 0.5`` that are right. In ``[0, 1]``.
    auc : float
        ROC AUC: binary AUC of the positive class (class 1); multi-class one-vs-rest
        macro average; multi-label macro average of :attr:`auc_per_label` over the
        labels whose AUC is defined (:func:`~fedcrypt.training.metrics.auc`). ``nan``
        if undefined (e.g. the loader holds a single class).
    num_examples : int
        Number of examples evaluated.
    y_true : numpy.ndarray
        int64 labels ``(N,)``; multi-label: int64 0/1 ``(N, K)``.
    y_score : numpy.ndarray
        float64 probabilities: of class 1, ``(N,)``, for a binary task (softmax);
        ``(N, C)`` class probabilities (softmax) for multi-class; ``(N, K)`` per-label
        probabilities (sigmoid) for multi-label.
    label_kind : {"binary", "multiclass", "multilabel"}
        What the labels are.
    auc_per_label : tuple of float
        Per-label AUCs (multi-label, ``K``), per-class one-vs-rest AUCs (multi-class,
        ``C``), or ``(auc,)`` (binary); ``nan`` where undefined.
    balanced_accuracy : float
        Mean per-class recall: binary at :attr:`threshold`; multi-class of the arg-max;
        multi-label the mean over labels at 0.5.
    threshold : float
        The decision threshold of :attr:`confusion` (binary; 0.5 unless asked).
    confusion : Confusion or None
        Binary confusion counts at :attr:`threshold` (class 1 positive); None otherwise.
    """

    loss: float
    accuracy: float
    auc: float
    num_examples: int
    y_true: NDArray[np.int64]
    y_score: NDArray[np.float64]
    label_kind: LabelKind = "binary"
    auc_per_label: tuple[float, ...] = field(default=())
    balanced_accuracy: float = math.nan
    threshold: float = 0.5
    confusion: Confusion | None = None

    @property
    def sensitivity(self) -> float:
        """Binary: true-positive rate at :attr:`threshold`; nan otherwise."""
        return self.confusion.sensitivity if self.confusion is not None else math.nan

    @property
    def specificity(self) -> float:
        """Binary: true-negative rate at :attr:`threshold`; nan otherwise."""
        return self.confusion.specificity if self.confusion is not None else math.nan

    def confusion_at(self, threshold: float) -> Confusion:
        """Binary confusion counts of these scores at another ``threshold``.

        Raises
        ------
        ValueError
            If the task is not binary.
        """
        if self.label_kind != "binary":
            raise ValueError(f"confusion counts need a binary task, this one is {self.label_kind}")
        return confusion(self.y_true, self.y_score, threshold=threshold)

    def metrics(self, *, youden: float | None = None) -> dict[str, float]:
        """Flat figures for a metrics record.

        Always ``loss``, ``accuracy``, ``auc``, ``balanced_accuracy``, ``examples``.
        Binary: ``threshold`` and, at it, ``tp fp tn fn sensitivity specificity
        precision npv`` (from :attr:`confusion`); with ``youden`` (a threshold chosen on
        validation scores) the same again at that threshold, suffixed ``_youden``, and
        ``youden_threshold``. Multi-label and multi-class: ``auc_0`` ... ``auc_{K-1}``
        (:attr:`auc_per_label`; nan where undefined).

        Parameters
        ----------
        youden : float, optional
            The validation split's Youden threshold (:meth:`youden_threshold`); nan or
            None leaves the ``_youden`` figures out.
        """
        out = {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "auc": self.auc,
            "balanced_accuracy": self.balanced_accuracy,
            "examples": float(self.num_examples),
        }
        if self.confusion is not None:
            out["threshold"] = self.threshold
            out.update(self.confusion.as_dict())
            if youden is not None and not math.isnan(youden):
                out["youden_threshold"] = float(youden)
                at = self.confusion_at(float(youden)).as_dict()
                out.update({f"{k}_youden": v for k, v in at.items()})
        else:
            out.update({f"auc_{k}": v for k, v in enumerate(self.auc_per_label)})
        return out

    def youden_threshold(self) -> float:
        """The Youden threshold of these scores (choose it on *validation* scores and pass
        it to :func:`evaluate` or :meth:`confusion_at` on test); nan if undefined.

        Raises
        ------
        ValueError
            If the task is not binary.
        """
        if self.label_kind != "binary":
            raise ValueError(f"the Youden threshold needs a binary task, not {self.label_kind}")
        return youden_threshold(self.y_true, self.y_score)


def _check_kind(label_kind: str | None) -> None:
    if label_kind is not None and label_kind not in LABEL_KINDS:
        raise ConfigError(f"label_kind must be one of {', '.join(LABEL_KINDS)}, got {label_kind!r}")


def _infer_kind(logits: torch.Tensor, y: torch.Tensor) -> LabelKind:
    if y.ndim == 2 and y.shape == logits.shape:
        return "multilabel"
    if y.ndim != 1:
        raise DataError(
            f"labels of shape {tuple(y.shape)} fit neither class labels [batch_size] nor "
            f"multi-hot labels {tuple(logits.shape)}"
        )
    return "binary" if logits.shape[1] == 2 else "multiclass"


def train(
    model: nn.Module,
    loader: Batches,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    class_weight: Literal["none", "balanced"] = "none",
    seed: int | None = None,
    label_kind: LabelKind | None = None,
    loss_fn: LossFn | None = None,
    wrap: Wrap | None = None,
    recalibrate_bn: bool = True,
) -> TrainResult:
    """Train ``model`` in place with Adam.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``[batch_size, ...]`` inputs to ``[batch_size, C]`` (or ``[batch_size, K]``)
        logits; batches are moved to the device of its parameters (CPU or CUDA).
    loader : torch.utils.data.DataLoader
        Yields ``(x, y)`` batches: int64 class labels ``y`` of shape ``[batch_size]``, or
        float 0/1 multi-hot labels ``[batch_size, K]`` (multi-label).
    epochs : int
        Passes over ``loader`` (>= 1, default: 1).
    lr : float
        Adam learning rate (> 0, default: 1e-3).
    weight_decay : float
        Adam L2 penalty (>= 0, default: 0.0).
    class_weight : {"none", "balanced"}
        ``"balanced"`` against class imbalance (default: ``"none"``). Binary and
        multi-class: the loss of class ``k`` is weighted by ``n / (K * n_k)`` (as
        scikit-learn's ``compute_class_weight``) with counts ``n_k`` of the ``K`` classes
        present in the loader's labels. Multi-label: BCE's ``pos_weight`` of label ``k``
        is ``n_neg_k / n_pos_k`` (1 for a label with no positives or no negatives).
        Labels are read without reading inputs where the dataset exposes them
        (``TensorDataset``, a ``labels`` array, ``Subset`` of those).
    seed : int, optional
        If given, ``torch.manual_seed(seed)`` first and the loader's own generator is
        reseeded, so dropout and shuffling repeat exactly (default: ``None``).
    label_kind : {"binary", "multiclass", "multilabel"}, optional
        The loss to use: cross-entropy for ``binary``/``multiclass``, BCE-with-logits for
        ``multilabel`` (default: ``None``: inferred from the first batch: labels shaped
        like the logits are multi-label).
    loss_fn : callable, optional
        ``loss_fn(logits, y) -> scalar`` (a batch mean) replacing the built-in loss
        (default: ``None``). Cannot be combined with ``class_weight="balanced"``.
    wrap : callable, optional
        ``wrap(model, optimizer, loader) -> (model, optimizer, loader)``, called once
        after the Adam optimizer is made and before the first epoch; the loop then
        trains with what it returns. This is the hook for Opacus DP-SGD
        (``PrivacyEngine.make_private(module=..., optimizer=..., data_loader=...)``
        returns such a triple). The returned model must share its parameters with
        ``model`` (Opacus' ``GradSampleModule`` does), so ``model`` holds the trained
        weights. Empty batches (Poisson sampling) are skipped (default: ``None``).
    recalibrate_bn : bool
        After the last epoch, recompute every BatchNorm layer's running mean and variance
        with the final weights, as exact averages over one more pass of the loader
        (no gradients) (default: True). Without it the statistics an evaluated model
        uses lag behind its weights after the few dozen steps of a federated round, and
        the model can predict one class ("precise BN": Wu and Johnson, "Rethinking
        'Batch' in BatchNorm", arXiv:2105.07576, 2021). A model without BatchNorm is
        not affected.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        If an argument is out of range, or ``loss_fn`` is combined with class weights.
    DataError
        If ``loader`` yields no examples or labels that fit neither kind.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, Integral) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if class_weight not in CLASS_WEIGHTS:
        raise ConfigError(
            f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, got {class_weight!r}"
        )
    _check_kind(label_kind)
    if loss_fn is not None and class_weight != "none":
        raise ConfigError(
            "class_weight='balanced' weights the built-in loss; a custom loss_fn must "
            "weight classes itself"
        )
    if wrap is not None and not callable(wrap):
        raise ConfigError("wrap must be callable (model, optimizer, loader) -> same triple")
    if seed is not None:
        torch.manual_seed(int(seed))
        gen = getattr(loader, "generator", None)
        if isinstance(gen, torch.Generator):
            # the loader's own shuffling generator too: a round's result must not depend
            # on whether this process trained the hospital before (simulation workers)
            gen.manual_seed(int(seed))
    device = _device(model)
    weights = _balanced_weights(loader, label_kind) if class_weight == "balanced" else None
    optimizer: torch.optim.Optimizer = torch.optim.Adam(
        model.parameters(), lr=lr, weight_decay=weight_decay
    )
    net: nn.Module = model
    own_loader = loader
    if wrap is not None:
        net, optimizer, loader = wrap(model, optimizer, loader)
    net.train()
    start = time.perf_counter()
    kind = label_kind
    loss_sum, count = 0.0, 0
    for _ in range(epochs):
        loss_sum, count = 0.0, 0
        for x, y in loader:
            if y.shape[0] == 0:
                continue  # Poisson sampling (DP) may draw an empty batch
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = net(x)
            if kind is None:
                kind = _infer_kind(logits, y)
            n = int(y.shape[0])
            if loss_fn is not None:
                step_loss = loss_fn(logits, y)
                example_loss = float(step_loss.detach()) * n
            elif kind == "multilabel":
                pos_weight = weights.to(device) if weights is not None else None
                per = F.binary_cross_entropy_with_logits(
                    logits, y.to(logits.dtype), pos_weight=pos_weight, reduction="none"
                )
                step_loss = per.mean()
                example_loss = float(per.detach().mean(dim=1).sum())
            else:
                w = _pad(weights, logits.shape[1]).to(device) if weights is not None else None
                y = y.long()
                # "sum" so the epoch's loss is an exact per-example mean; the step uses the
                # batch mean (weighted mean with class weights, as nn.CrossEntropyLoss)
                total = F.cross_entropy(logits, y, weight=w, reduction="sum")
                denom = w[y].sum() if w is not None else torch.tensor(float(n), device=device)
                step_loss = total / denom
                example_loss = float(step_loss.detach()) * n
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            loss_sum += example_loss
            count += n
        if count == 0:
            raise DataError("the training loader yields no examples")
    if recalibrate_bn:
        # on the unwrapped model and loader (a DP wrapper's hooks need gradients; a model
        # Opacus accepts has no BatchNorm anyway)
        recalibrate_batchnorm(model, own_loader)
    return TrainResult(
        loss=loss_sum / count, num_examples=count, seconds=time.perf_counter() - start
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Batches,
    *,
    label_kind: LabelKind | None = None,
    loss_fn: LossFn | None = None,
    threshold: float = 0.5,
) -> EvalResult:
    """Evaluate ``model`` on ``loader``: loss, accuracy, ROC AUC, clinical metrics, scores.

    The model is put in evaluation mode (BatchNorm running statistics, no dropout) and
    its previous mode is restored afterwards. Softmax turns logits into class
    probabilities (binary, multi-class), the sigmoid into label probabilities
    (multi-label).

    Parameters
    ----------
    model : torch.nn.Module
        Maps inputs to ``[batch_size, C]`` (``[batch_size, K]``) logits, on any device.
    loader : torch.utils.data.DataLoader
        Yields ``(x, y)`` batches with int64 labels ``[batch_size]`` or 0/1 multi-hot
        labels ``[batch_size, K]``.
    label_kind : {"binary", "multiclass", "multilabel"}, optional
        Default ``None``: inferred (multi-hot labels: multi-label; else binary for two
        logits, multi-class for more).
    loss_fn : callable, optional
        ``loss_fn(logits, y) -> scalar`` batch mean replacing the built-in loss.
    threshold : float
        Binary decision threshold of :attr:`EvalResult.confusion` and
        :attr:`EvalResult.balanced_accuracy` (default: 0.5); e.g. the Youden threshold
        chosen on validation scores (:meth:`EvalResult.youden_threshold`).

    Returns
    -------
    EvalResult

    Raises
    ------
    ConfigError
        If ``label_kind`` is unknown, ``threshold`` is NaN, or ``binary`` is asked for
        with other than two logits.
    DataError
        If ``loader`` yields no examples or labels that do not fit the logits.
    """
    _check_kind(label_kind)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number, got {threshold!r}") from None
    if math.isnan(threshold):
        raise ConfigError("threshold must be a number, got NaN")
    device = _device(model)
    was_training = model.training
    model.eval()
    loss_total = 0.0
    try:
        logits_parts, label_parts = [], []
        for x, y in loader:
            if y.shape[0] == 0:
                continue
            out = model(x.to(device, non_blocking=True))
            if loss_fn is not None:
                loss_total += float(loss_fn(out, y.to(device))) * int(y.shape[0])
            logits_parts.append(out.float().cpu())
            label_parts.append(y.cpu())
    finally:
        model.train(was_training)
    if not label_parts:
        raise DataError("the evaluation loader yields no examples")
    logits = torch.cat(logits_parts)
    labels = torch.cat(label_parts)
    kind: LabelKind = label_kind or _infer_kind(logits, labels)
    n = int(labels.shape[0])
    if kind == "multilabel":
        if labels.shape != logits.shape:
            raise DataError(
                f"multi-label labels of shape {tuple(labels.shape)} do not fit logits "
                f"{tuple(logits.shape)}"
            )
        target = labels.double()
        loss = float(F.binary_cross_entropy_with_logits(logits.double(), target))
        probs = torch.sigmoid(logits.double()).numpy()
        y_true = target.round().long().numpy()
        y_score = probs
        accuracy = float(((probs >= 0.5) == (y_true == 1)).mean())
        bal = balanced_accuracy(y_true, y_score, threshold=0.5)
        conf = None
        used_threshold = 0.5
    else:
        if labels.ndim != 1:
            raise DataError(f"class labels must have shape [batch_size], got {tuple(labels.shape)}")
        if kind == "binary" and logits.shape[1] != 2:
            raise ConfigError(f"a binary task needs 2 logits, the model returns {logits.shape[1]}")
        target_l = labels.long()
        if n and (int(target_l.min()) < 0 or int(target_l.max()) >= logits.shape[1]):
            raise DataError(
                f"labels outside the model's {logits.shape[1]} classes "
                f"(min {int(target_l.min())}, max {int(target_l.max())})"
            )
        loss = float(F.cross_entropy(logits, target_l))
        probs = torch.softmax(logits.double(), dim=1).numpy()
        y_true = target_l.numpy().astype(np.int64)
        accuracy = float((probs.argmax(axis=1) == y_true).mean())
        if kind == "binary":
            y_score = probs[:, 1].copy()
            conf = confusion(y_true, y_score, threshold=float(threshold))
            bal = conf.balanced_accuracy
            used_threshold = float(threshold)
        else:
            y_score = probs
            conf = None
            bal = balanced_accuracy(y_true, y_score)
            used_threshold = 0.5
    if loss_fn is not None:
        loss = loss_total / n
    return EvalResult(
        loss=loss,
        accuracy=accuracy,
        auc=auc(y_true, y_score),
        num_examples=n,
        y_true=y_true,
        y_score=y_score,
        label_kind=kind,
        auc_per_label=tuple(float(v) for v in auc_per_label(y_true, y_score)),
        balanced_accuracy=bal,
        threshold=used_threshold,
        confusion=conf,
    )


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Batches) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers on ``loader``.

    The statistics are reset and then accumulated as exact (cumulative) averages over
    one pass, in training mode and without gradients; the layers' momentum and the
    model's mode are restored afterwards. Weights do not change.

    Returns
    -------
    int
        Examples passed (0, and nothing done, if the model has no BatchNorm layer).
    """
    layers = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.track_running_stats]
    if not layers:
        return 0
    device = _device(model)
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over batches
    model.train()
    seen = 0
    try:
        for x, y in loader:
            if y.shape[0] < 2:
                continue  # a batch of one has no variance
            model(x.to(device, non_blocking=True))
            seen += int(y.shape[0])
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return seen


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def dataset_labels(dataset: Any) -> torch.Tensor | None:
    """A dataset's labels without reading its inputs, where it exposes them; else None.

    Understood: a ``TensorDataset`` (second tensor), any dataset with a ``labels``
    array (the built-in image datasets), and ``torch.utils.data.Subset`` of those.

    Returns
    -------
    torch.Tensor or None
        ``(N,)`` class labels or ``(N, K)`` multi-hot labels.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        if inner is None:
            return None
        return inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, np.ndarray):
        return torch.from_numpy(labels)
    if isinstance(labels, torch.Tensor):
        return labels
    return None


def _loader_labels(loader: Batches) -> torch.Tensor:
    """All labels of ``loader`` (from the dataset where possible, else one pass)."""
    labels = dataset_labels(getattr(loader, "dataset", None))
    if labels is not None:
        return labels if labels.ndim == 2 else labels.reshape(-1).long()
    parts = [y.cpu() for _, y in loader]
    if not parts:
        return torch.empty(0, dtype=torch.long)
    cat = torch.cat(parts)
    return cat if cat.ndim == 2 else cat.reshape(-1).long()


def _balanced_weights(loader: Batches, label_kind: str | None = None) -> torch.Tensor:
    """Class weights ``n / (K * n_k)`` (``(max_label + 1,)``; 1 for absent classes), or
    multi-label ``pos_weight`` ``n_neg_k / n_pos_k`` (``(K,)``; 1 where undefined)."""
    labels = _loader_labels(loader)
    if labels.numel() == 0:
        raise DataError("the training loader yields no examples")
    if labels.ndim == 2 or label_kind == "multilabel":
        lab = labels.double().reshape(labels.shape[0], -1)
        pos = lab.sum(dim=0)
        neg = lab.shape[0] - pos
        pos_weight = torch.ones_like(pos)
        ok = (pos > 0) & (neg > 0)
        pos_weight[ok] = neg[ok] / pos[ok]
        return pos_weight.float()
    counts = torch.bincount(labels).double()
    present = counts > 0
    weights = torch.ones_like(counts)
    weights[present] = labels.numel() / (int(present.sum()) * counts[present])
    return weights.float()


def _pad(weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    if weights.numel() >= num_classes:
        return weights[:num_classes]
    return torch.cat([weights, torch.ones(num_classes - weights.numel())])
