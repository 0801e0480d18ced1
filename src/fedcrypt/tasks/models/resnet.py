"""ResNet-18 (He et al., CVPR 2016) as MedMNIST v2 uses it: the 28-px variant for small images.

References: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016, arXiv:1512.03385; J. Yang et al., "MedMNIST v2", Scientific Data
10, 41 (2023), whose "ResNet-18 (28)" baseline replaces the 7x7 stride-2 stem and its
max-pool by one 3x3 stride-1 convolution, so a 28x28 image leaves a 4x4 map for the last
stage.

Module names follow torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1`` ...
``layer4``, ``fc``), so torchvision weights map key for key
(:mod:`fedcrypt.tasks.models.torchvision_weights`).
"""

from __future__ import annotations

import torch
from torch import nn

#: Inputs with ``min(H, W)`` below this use the 28-px stem (3x3, stride 1, no max-pool).
SMALL_INPUT_MAX = 64
STAGE_CHANNELS: tuple[int, int, int, int] = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a skip connection (1x1 projection when the
    shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in, H, W] -> [B, out, H / stride, W / stride]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + identity)
        return result


class ResNet18(nn.Module):
    """ResNet-18: a stem, four stages of two :class:`BasicBlock` each, average pooling, a
    linear layer.

    Parameters
    ----------
    in_channels : int
        ``C`` of the ``[batch_size, C, H, W]`` input.
    num_classes : int
        Number of output logits.
    small_input : bool
        True: the MedMNIST 28-px stem (3x3 conv, stride 1, no max-pool); False:
        torchvision's ImageNet stem (7x7 conv, stride 2, 3x3 max-pool) (default: True).
    width_mult : float
        Multiplier of the stage widths 64/128/256/512 (default: 1.0).
    dropout : float
        Dropout probability before the linear layer (default: 0.0, as the baseline).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        small_input: bool = True,
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [max(8, round(c * width_mult)) for c in STAGE_CHANNELS]
        self.small_input = small_input
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        previous = widths[0]
        stages = []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(previous, w, stride=stride), BasicBlock(w, w)))
            previous = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(previous, num_classes)
        for m in self.modules():
            # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[batch_size, C, H, W]`` images to ``[batch_size, num_classes]`` logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: torch.Tensor = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        return out


def resnet18(
    input_shape: tuple[int, ...], num_classes: int, *, width_mult: float = 1.0, dropout: float = 0.0
) -> ResNet18:
    """Build a :class:`ResNet18` for ``input_shape = (C, H, W)``: the 28-px stem when
    ``min(H, W) < 64``, torchvision's ImageNet stem otherwise."""
    channels, height, width = input_shape
    return ResNet18(
        channels,
        num_classes,
        small_input=min(height, width) < SMALL_INPUT_MAX,
        width_mult=width_mult,
        dropout=dropout,
    )
