"""Local training and evaluation loops (Adam, cross-entropy, softmax at evaluation)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.training.metrics import roc_auc

CLASS_WEIGHTS: tuple[str, ...] = ("none", "balanced")

Batches = DataLoader[tuple[torch.Tensor, ...]] | Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train` did.

    Attributes
    ----------
    loss : float
        Mean training cross-entropy per example over the *last* epoch (with class
        weights when ``class_weight="balanced"``).
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
    """Metrics of a model on one loader.

    Attributes
    ----------
    loss : float
        Mean (unweighted) cross-entropy per example.
    accuracy : float
        Fraction of examples whose arg-max class is the label, in ``[0, 1]``.
    auc : float
        ROC AUC (:func:`~fedcrypt.training.metrics.roc_auc`); ``nan`` if the loader
        holds a single class.
    num_examples : int
        Number of examples evaluated.
    y_true : numpy.ndarray
        int64 labels ``(N,)``.
    y_score : numpy.ndarray
        float64 softmax probabilities: of class 1, shape ``(N,)``, for two classes;
        ``(N, C)`` otherwise.
    """

    loss: float
    accuracy: float
    auc: float
    num_examples: int
    y_true: NDArray[np.int64]
    y_score: NDArray[np.float64]


def train(
    model: nn.Module,
    loader: Batches,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    class_weight: Literal["none", "balanced"] = "none",
    seed: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with Adam on cross-entropy.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``[batch_size, ...]`` inputs to ``[batch_size, C]`` logits; batches are
        moved to the device of its parameters (the CPU by default).
    loader : torch.utils.data.DataLoader
        Yields ``(x, y)`` batches with int64 labels ``y`` of shape ``[batch_size]``.
    epochs : int
        Passes over ``loader`` (>= 1, default: 1).
    lr : float
        Adam learning rate (> 0, default: 1e-3).
    weight_decay : float
        Adam L2 penalty (>= 0, default: 0.0).
    class_weight : {"none", "balanced"}
        ``"balanced"`` weights the loss of class ``k`` by ``n / (K * n_k)`` (as
        scikit-learn's ``compute_class_weight``) with counts ``n_k`` of the ``K`` classes
        present in the loader's labels, against class imbalance (default: ``"none"``).
    seed : int, optional
        If given, ``torch.manual_seed(seed)`` first, so dropout and
        unseeded loader shuffling repeat exactly (default: ``None``).

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        If an argument is out of range.
    DataError
        If ``loader`` yields no examples.
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
    if seed is not None:
        torch.manual_seed(int(seed))
        gen = getattr(loader, "generator", None)
        if isinstance(gen, torch.Generator):
            # the loader's own shuffling generator too: a round's result must not depend
            # on whether this process trained the hospital before (simulation workers)
            gen.manual_seed(int(seed))
    device = _device(model)
    weights = _balanced_weights(loader) if class_weight == "balanced" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()
    loss_sum, count = 0.0, 0
    for _ in range(epochs):
        loss_sum, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            w = None
            if weights is not None:
                w = _pad(weights, logits.shape[1]).to(device)
            # "sum" so the epoch's loss is an exact per-example mean; the step uses the
            # batch mean (weighted mean with class weights, as nn.CrossEntropyLoss)
            batch_loss = F.cross_entropy(logits, y, weight=w, reduction="sum")
            denom = w[y].sum() if w is not None else torch.tensor(float(y.numel()))
            optimizer.zero_grad(set_to_none=True)
            (batch_loss / denom).backward()
            optimizer.step()
            loss_sum += float(batch_loss.detach()) * y.numel() / float(denom)
            count += int(y.numel())
        if count == 0:
            raise DataError("the training loader yields no examples")
    return TrainResult(
        loss=loss_sum / count, num_examples=count, seconds=time.perf_counter() - start
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches) -> EvalResult:
    """Evaluate ``model`` on ``loader``: loss, accuracy, ROC AUC, and per-example scores.

    The model is put in evaluation mode (BatchNorm running statistics, no dropout) and
    its previous mode is restored afterwards. Softmax turns logits into probabilities.

    Parameters
    ----------
    model : torch.nn.Module
        Maps inputs to ``[batch_size, C]`` logits.
    loader : torch.utils.data.DataLoader
        Yields ``(x, y)`` batches with int64 labels.

    Returns
    -------
    EvalResult

    Raises
    ------
    DataError
        If ``loader`` yields no examples.
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        logits_parts, label_parts = [], []
        for x, y in loader:
            logits_parts.append(model(x.to(device)).float().cpu())
            label_parts.append(y.cpu())
    finally:
        model.train(was_training)
    if not label_parts or sum(int(y.numel()) for y in label_parts) == 0:
        raise DataError("the evaluation loader yields no examples")
    logits = torch.cat(logits_parts)
    labels = torch.cat(label_parts).long()
    loss = float(F.cross_entropy(logits, labels))
    probs = torch.softmax(logits.double(), dim=1).numpy()
    y_true = labels.numpy().astype(np.int64)
    accuracy = float((probs.argmax(axis=1) == y_true).mean())
    y_score = probs[:, 1].copy() if probs.shape[1] == 2 else probs
    return EvalResult(
        loss=loss,
        accuracy=accuracy,
        auc=roc_auc(y_true, y_score),
        num_examples=int(y_true.size),
        y_true=y_true,
        y_score=y_score,
    )


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _loader_labels(loader: Batches) -> torch.Tensor:
    """All labels of ``loader`` (read directly from a ``TensorDataset``, else one pass)."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].reshape(-1).long()
    parts = [y.reshape(-1).long().cpu() for _, y in loader]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _balanced_weights(loader: Batches) -> torch.Tensor:
    """``n / (K * n_k)`` for classes present, 1 for absent ones; shape ``(max_label + 1,)``."""
    labels = _loader_labels(loader)
    if labels.numel() == 0:
        raise DataError("the training loader yields no examples")
    counts = torch.bincount(labels).double()
    present = counts > 0
    weights = torch.ones_like(counts)
    weights[present] = labels.numel() / (int(present.sum()) * counts[present])
    return weights.float()


def _pad(weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    if weights.numel() >= num_classes:
        return weights[:num_classes]
    return torch.cat([weights, torch.ones(num_classes - weights.numel())])
