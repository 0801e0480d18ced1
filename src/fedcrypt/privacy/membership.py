"""Membership inference on a trained model: was this patient's image in the training set?

Two attacks, both scored by ROC AUC over known members and non-members (0.5: the model
reveals nothing about membership; 1.0: it reveals it perfectly):

* **Loss threshold** (Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine
  Learning: Analyzing the Connection to Overfitting", CSF 2018): a training example tends
  to have a lower loss; the score is ``-loss``.
* **Offline LiRA** (Carlini, Chien, Nasr, Song, Terzis, Tramèr, "Membership Inference
  Attacks From First Principles", IEEE S&P 2022, §VI-C): the attacker trains shadow
  models the same way on data *without* the target examples, fits a Gaussian to each
  example's logit-scaled confidence ``φ = log(p_y / (1 - p_y))`` under those OUT models,
  and scores the target model's ``φ`` by how far above the OUT distribution it lies
  (one-sided likelihood-ratio test). With few shadow models the variance is pooled over
  examples (their "fixed variance" variant).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F  # noqa: N812


@torch.no_grad()
def example_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> NDArray[np.float64]:
    """Per-example cross-entropy of ``model`` (evaluation mode), float64 ``(N,)``.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``[N, ...]`` inputs to ``[N, K]`` logits.
    x : torch.Tensor
        Inputs ``[N, ...]``.
    y : torch.Tensor
        int64 labels ``[N]``.
    batch_size : int
        Evaluation batch size (default: 256).
    """
    was = model.training
    model.eval()
    try:
        parts = [
            F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="none")
            for i in range(0, len(y), batch_size)
        ]
    finally:
        model.train(was)
    return torch.cat(parts).double().numpy()


@torch.no_grad()
def logit_confidence(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> NDArray[np.float64]:
    """LiRA's ``φ = log(p_y) - log(1 - p_y)`` per example (float64 ``(N,)``), computed
    stably from the logits as ``z_y - logsumexp(z_{≠y})``."""
    was = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(y), batch_size):
            z = model(x[i : i + batch_size]).double()
            yy = y[i : i + batch_size]
            true = z.gather(1, yy[:, None]).squeeze(1)
            others = z.scatter(1, yy[:, None], -math.inf)
            out.append(true - torch.logsumexp(others, dim=1))
    finally:
        model.train(was)
    return torch.cat(out).numpy()


def attack_auc(
    member_scores: NDArray[np.floating], nonmember_scores: NDArray[np.floating]
) -> float:
    """ROC AUC of "higher score means member" (scikit-learn ``roc_auc_score``).

    Raises
    ------
    ValueError
        If either side is empty.
    """
    from sklearn.metrics import roc_auc_score

    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("need at least one member and one non-member score")
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    return float(roc_auc_score(labels, np.concatenate([m, n])))


def loss_threshold_scores(losses: NDArray[np.floating]) -> NDArray[np.float64]:
    """Yeom et al. 2018: the membership score of an example is minus its loss."""
    return -np.asarray(losses, dtype=np.float64)


def lira_offline_scores(
    target_phi: NDArray[np.floating], shadow_out_phi: NDArray[np.floating]
) -> NDArray[np.float64]:
    """Offline LiRA scores (Carlini et al. 2022): ``(φ - μ_out) / σ_out`` per example.

    Monotone in their one-sided test's ``1 - Φ(...)`` p-value, so the AUC is the same.

    Parameters
    ----------
    target_phi : numpy.ndarray
        ``φ`` of the target model, ``(N,)``.
    shadow_out_phi : numpy.ndarray
        ``φ`` of ``S >= 1`` shadow models that did not train on these examples, ``(S, N)``.
        With ``S < 16`` the standard deviation is pooled over examples (fixed variance).

    Returns
    -------
    numpy.ndarray
        float64 ``(N,)``; higher means more likely a member.
    """
    t = np.asarray(target_phi, dtype=np.float64)
    s = np.atleast_2d(np.asarray(shadow_out_phi, dtype=np.float64))
    if s.shape[1] != t.size:
        raise ValueError(f"shadow scores {s.shape} do not match {t.size} target examples")
    mu = s.mean(axis=0)
    if s.shape[0] >= 16:
        sd = s.std(axis=0, ddof=1)
    else:
        pooled = float(np.sqrt(np.mean((s - mu) ** 2))) if s.shape[0] > 1 else float(np.std(s))
        sd = np.full_like(mu, pooled)
    return (t - mu) / np.maximum(sd, 1e-6)
