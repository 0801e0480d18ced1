"""Gradient inversion: rebuild a hospital's training images from what the server received.

The attack of Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients — How easy is
it to break privacy in federated learning?", NeurIPS 2020: find images ``x'`` whose
gradient on the known global model is most *aligned* (cosine similarity, summed over
all parameter tensors) with the observed gradient, plus a total-variation prior, with
Adam on signed gradients and images kept in ``[0, 1]``. Labels are given to the
attacker (their threat model; for one image they also follow from the sign of the last
layer's gradient, Zhao et al., "iDLG", 2020).

The observed gradient is recovered from a FedSGD-style update: a hospital that takes one
SGD step of learning rate ``lr`` from the global weights ``w`` sends ``w'``; the server,
knowing ``w`` and ``lr``, computes ``g = (w - w') / lr`` (:func:`gradient_from_update`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F  # noqa: N812


class InversionNet(nn.Module):
    """The small CNN of Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019.

    Three 5x5 convolutions (12 channels, strides 2, 2, 1) with sigmoid activations (twice
    differentiable, as gradient matching needs) and one linear layer; for 28x28 grey
    images about 8k parameters.

    Parameters
    ----------
    in_channels : int
        ``C`` of ``[batch_size, C, H, W]`` inputs.
    image_size : int
        ``H = W`` (a multiple of 4).
    num_classes : int
        Number of logits.
    width : int
        Channels of each convolution (default: 12, as in the paper).
    """

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, *, width: int = 12
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, stride=1, padding=2),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch_size, C, H, W]`` to ``[batch_size, num_classes]`` logits."""
        out: torch.Tensor = self.fc(self.body(x))
        return out


def parameter_vector(model: nn.Module) -> NDArray[np.float64]:
    """The model's trainable parameters, flattened in ``parameters()`` order, float64."""
    return np.concatenate(
        [p.detach().double().reshape(-1).cpu().numpy() for p in model.parameters()]
    )


def local_sgd_step(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, lr: float
) -> NDArray[np.float64]:
    """What a hospital trains in one FedSGD step: one SGD step on a batch, in place.

    Parameters
    ----------
    model : torch.nn.Module
        The global model (modified in place: afterwards it holds the local weights).
    images : torch.Tensor
        float32 ``[B, C, H, W]``.
    labels : torch.Tensor
        int64 ``[B]``.
    lr : float
        SGD learning rate.

    Returns
    -------
    numpy.ndarray
        The local parameters after the step (:func:`parameter_vector`).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    opt.step()
    return parameter_vector(model)


def gradient_from_update(
    global_params: NDArray[np.floating], local_params: NDArray[np.floating], *, lr: float
) -> NDArray[np.float64]:
    """``(w - w') / lr``: the gradient of a one-step SGD update (what the server infers)."""
    g = np.asarray(global_params, dtype=np.float64) - np.asarray(local_params, dtype=np.float64)
    return g / float(lr)


def _split(model: nn.Module, vec: NDArray[np.floating]) -> list[torch.Tensor]:
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    flat = np.asarray(vec, dtype=np.float64)
    if flat.shape != (total,):
        raise ValueError(f"gradient has shape {flat.shape}, the model has {total} parameters")
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(torch.from_numpy(flat[offset : offset + n].copy()).float().reshape(p.shape))
        offset += n
    return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels of ``[B, C, H, W]`` images."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy


@dataclass(frozen=True)
class InversionResult:
    """The attacker's best reconstruction.

    Attributes
    ----------
    images : numpy.ndarray
        float32 ``[B, C, H, W]`` in ``[0, 1]``.
    loss : float
        Final objective (``1 - cosine similarity + tv_weight * TV``) of the best restart.
    iterations : int
        Optimisation steps per restart.
    """

    images: NDArray[np.float32]
    loss: float
    iterations: int


def invert_gradients(
    model: nn.Module,
    gradient: NDArray[np.floating],
    *,
    labels: torch.Tensor,
    image_shape: Sequence[int],
    iterations: int = 400,
    lr: float = 0.1,
    tv_weight: float = 1e-2,
    restarts: int = 1,
    seed: int = 0,
) -> InversionResult:
    """Reconstruct training images from a gradient (Geiping et al. 2020).

    Parameters
    ----------
    model : torch.nn.Module
        The model at the weights the gradient was taken at (the global model); twice
        differentiable. Not modified.
    gradient : numpy.ndarray
        The observed gradient, flattened in ``model.parameters()`` order, shape ``(P,)``.
    labels : torch.Tensor
        int64 ``[B]``: the labels of the ``B`` images to rebuild.
    image_shape : sequence of int
        ``(C, H, W)``.
    iterations : int
        Adam steps per restart (default: 400).
    lr : float
        Adam step size on the images (default: 0.1; divided by 10 at 3/8, 5/8 and 7/8 of
        the iterations, as in the paper).
    tv_weight : float
        Weight of the total-variation prior (default: 1e-2).
    restarts : int
        Random initialisations tried; the lowest objective wins (default: 1).
    seed : int
        Seed of the initialisations (default: 0).

    Returns
    -------
    InversionResult

    Raises
    ------
    ValueError
        If ``gradient`` does not match the model.
    """
    target = _split(model, gradient)
    tnorm = float(np.linalg.norm(np.asarray(gradient, dtype=np.float64))) + 1e-12
    params = list(model.parameters())
    shape = (int(labels.numel()), *(int(d) for d in image_shape))
    gen = torch.Generator().manual_seed(seed)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    best: tuple[float, torch.Tensor] | None = None
    was_training = model.training
    model.eval()
    try:
        for _ in range(max(1, restarts)):
            x = torch.rand(shape, generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            loss_value = math.inf
            for _ in range(iterations):
                task_loss = F.cross_entropy(model(x), labels)
                grads = torch.autograd.grad(task_loss, params, create_graph=True)
                dot = torch.stack([(g * t).sum() for g, t in zip(grads, target, strict=True)])
                gsq = torch.stack([(g * g).sum() for g in grads])
                cosine = dot.sum() / (torch.sqrt(gsq.sum() + 1e-12) * tnorm)
                objective = 1 - cosine + tv_weight * total_variation(x)
                (step,) = torch.autograd.grad(objective, [x])  # the model's .grad stays untouched
                x.grad = step.sign()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
                loss_value = float(objective.detach())
            if best is None or loss_value < best[0]:
                best = (loss_value, x.detach().clone())
    finally:
        model.train(was_training)
    assert best is not None
    return InversionResult(
        images=best[1].numpy().astype(np.float32), loss=best[0], iterations=iterations
    )
