"""A compact convolutional network for small (e.g. 28x28) images."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (BatchNorm, ReLU), global average pooling, dropout, linear.

    With ``width_mult=1`` the blocks have 32, 64 and 64 channels and two 2x2 max-pools
    (28x28 -> 14x14 -> 7x7); about 56k parameters for grey images and two classes.
    Global average pooling makes it accept any input of at least 4x4 pixels.

    Parameters
    ----------
    in_channels : int
        ``C`` of the ``[batch_size, C, H, W]`` input.
    num_classes : int
        Number of output logits.
    widths : tuple of int
        Channels of the three conv blocks (default: ``(32, 64, 64)``).
    dropout : float
        Dropout probability before the linear layer (default: 0.2).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        widths: tuple[int, int, int] = (32, 64, 64),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(in_channels, c1),
            nn.MaxPool2d(2),
            *block(c1, c2),
            nn.MaxPool2d(2),
            *block(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch_size, C, H, W]`` images to ``[batch_size, num_classes]`` logits."""
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def cnn(
    input_shape: tuple[int, ...], num_classes: int, *, width_mult: float = 1.0, dropout: float = 0.2
) -> SmallCNN:
    """Build a :class:`SmallCNN` for ``input_shape = (C, H, W)``; widths times ``width_mult``."""
    w1, w2, w3 = (max(4, round(w * width_mult)) for w in (32, 64, 64))
    return SmallCNN(input_shape[0], num_classes, widths=(w1, w2, w3), dropout=dropout)
