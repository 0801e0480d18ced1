"""A multilayer perceptron for tabular features (or flattened images)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Two hidden layers with ReLU and dropout, then a linear layer to the logits.

    Inputs of any shape ``[batch_size, *input_shape]`` are flattened first, so the
    model also runs on images.

    Parameters
    ----------
    in_features : int
        ``prod(input_shape)``, e.g. 30 for WDBC or 784 for 28x28 grey images.
    num_classes : int
        Number of output logits.
    hidden : tuple of int
        Widths of the hidden layers (default: ``(64, 32)``).
    dropout : float
        Dropout probability after each hidden layer (default: 0.2).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch_size, *input_shape]`` inputs to ``[batch_size, num_classes]`` logits."""
        out: torch.Tensor = self.net(x)
        return out


def mlp(
    input_shape: tuple[int, ...], num_classes: int, *, width_mult: float = 1.0, dropout: float = 0.2
) -> MLP:
    """Build an :class:`MLP` with hidden widths ``(64, 32)`` scaled by ``width_mult``."""
    hidden = tuple(max(4, round(w * width_mult)) for w in (64, 32))
    return MLP(math.prod(input_shape), num_classes, hidden=hidden, dropout=dropout)
