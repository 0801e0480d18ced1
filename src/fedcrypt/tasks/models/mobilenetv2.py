"""MobileNetV2 (Sandler et al., CVPR 2018) with the seed paper's transfer-learning head.

Reference: M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen, "MobileNetV2:
Inverted Residuals and Linear Bottlenecks", CVPR 2018, arXiv:1801.04381.

The feature extractor follows the paper's Table 2 and torchvision's implementation
(same module names, so torchvision ``features.*`` weights load into :attr:`features`),
with two changes for small medical images:

* the first convolution takes ``C`` input channels (1 for grey MedMNIST);
* the stem convolution has stride 1 when the input is smaller than 64 pixels on a side,
  so a 28x28 image leaves a 2x2 (not 1x1) map for the last blocks (overall stride 16
  instead of 32); inputs of 64 pixels and more use the standard stride 2.

The head is the seed paper's: ``Dropout -> Linear(1280, 320) -> Linear(320, K)``
(no non-linearity between the two linear layers, as in that paper), producing logits.
"""

from __future__ import annotations

import torch
from torch import nn

LAST_CHANNEL = 1280
HEAD_WIDTH = 320
STEM_STRIDE2_MIN_SIZE = 64
"""Inputs with ``min(H, W)`` below this use a stride-1 stem."""

# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going down by > 10 %."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU6(nn.Sequential):
    """``Conv2d (no bias) -> BatchNorm2d -> ReLU6`` with "same" padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), with a skip when shapes match.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out.
    stride : int
        1 or 2 (of the depthwise convolution).
    expand_ratio : int
        Hidden width is ``round(in_channels * expand_ratio)``; 1 skips the expansion.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]``."""
        out: torch.Tensor = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 features, global average pooling, and the seed paper's head.

    Parameters
    ----------
    in_channels : int
        ``C`` of the ``[batch_size, C, H, W]`` input.
    num_classes : int
        Number of output logits ``K``.
    width_mult : float
        Width multiplier applied to every layer's channels, rounded to multiples of 8
        (default: 1.0). The last conv keeps 1280 channels when ``width_mult < 1``.
    dropout : float
        Dropout probability before the head (default: 0.2).
    stem_stride : int
        Stride of the first convolution: 2 as in the paper, 1 for small inputs
        (default: 2; :func:`mobilenetv2` picks it from the input size).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        channels = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(LAST_CHANNEL * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, channels, stride=stem_stride)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(
                    InvertedResidual(channels, out, stride=s if i == 0 else 1, expand_ratio=t)
                )
                channels = out
        layers.append(ConvBNReLU6(channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.last_channel, HEAD_WIDTH),
            nn.Linear(HEAD_WIDTH, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch_size, C, H, W]`` images to ``[batch_size, num_classes]`` logits."""
        features = torch.flatten(self.pool(self.features(x)), 1)
        out: torch.Tensor = self.classifier(features)
        return out


def mobilenetv2(
    input_shape: tuple[int, ...], num_classes: int, *, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    """Build a :class:`MobileNetV2` for ``input_shape = (C, H, W)``.

    The stem stride is 1 when ``min(H, W) < 64`` and 2 otherwise.
    """
    channels, height, width = input_shape
    stem_stride = 1 if min(height, width) < STEM_STRIDE2_MIN_SIZE else 2
    return MobileNetV2(
        channels, num_classes, width_mult=width_mult, dropout=dropout, stem_stride=stem_stride
    )
