"""Start MobileNetV2 or ResNet-18 from torchvision's ImageNet weights (a ``state_dict`` file).

torchvision cannot be installed next to this project's torch, but its published weight
files (``mobilenet_v2-b0353104.pth``, ``resnet18-f37072fd.pth``, or any
``torch.save(model.state_dict())`` of ``torchvision.models.mobilenet_v2()`` /
``resnet18()``) are plain ``state_dict`` objects and load here:

* every key of the feature extractor is mapped to the same key of
  :class:`~fedcrypt.tasks.models.mobilenetv2.MobileNetV2` (``features.*``) or
  :class:`~fedcrypt.tasks.models.resnet.ResNet18` (``conv1``, ``bn1``, ``layer1-4``), which
  use torchvision's module names;
* the first convolution is averaged over its three RGB input channels for one-channel
  (grey) images, and replicated for any other channel count (scaled by ``3 / C``);
* ResNet-18's 28-px variant has a 3x3 stem where ImageNet's is 7x7: the 7x7 kernels are
  resampled to 3x3 (antialiased bilinear, times 49/9) and shifted so that each kernel
  keeps its sum (its response to a flat image);
* the ImageNet classifier (``classifier.1.*``, 1000 classes, or ``fc.*``) is dropped and
  the model's own head keeps its fresh initialisation: MobileNetV2 the seed paper's
  transfer head ``Dropout(0.2) -> Linear(1280, 320) -> Linear(320, K)``, ResNet-18
  ``Linear(512, K)``; it is fitted by training.

The width multiplier must be 1 (ImageNet weights exist for the full-width networks only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from fedcrypt.exceptions import ConfigError

#: Keys of torchvision's ImageNet classifiers, by architecture (dropped on import).
HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "mobilenetv2": ("classifier.",),
    "resnet18": ("fc.",),
}
#: The first convolution's weight, by architecture.
STEM_KEYS: dict[str, str] = {"mobilenetv2": "features.0.0.weight", "resnet18": "conv1.weight"}
#: Classes of ImageNet-1k, the width of torchvision's classifiers.
IMAGENET_CLASSES = 1000


def is_torchvision_layout(state: Mapping[str, torch.Tensor], arch: str) -> bool:
    """Whether ``state`` looks like torchvision's ``state_dict`` of architecture ``arch``:
    its stem key is there and its classifier has ImageNet's 1000 outputs."""
    if arch not in STEM_KEYS or STEM_KEYS[arch] not in state:
        return False
    head = "classifier.1.weight" if arch == "mobilenetv2" else "fc.weight"
    weight = state.get(head)
    return weight is not None and weight.ndim == 2 and weight.shape[0] == IMAGENET_CLASSES


def map_torchvision_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, *, arch: str
) -> dict[str, torch.Tensor]:
    """Map torchvision ImageNet weights onto ``model``'s keys (see the module docstring).

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        torchvision's ``state_dict`` of ``mobilenet_v2()`` or ``resnet18()``.
    model : torch.nn.Module
        A :class:`~fedcrypt.tasks.models.mobilenetv2.MobileNetV2` or
        :class:`~fedcrypt.tasks.models.resnet.ResNet18` with ``width_mult=1``.
    arch : {"mobilenetv2", "resnet18"}
        Which architecture ``state`` is.

    Returns
    -------
    dict of str to torch.Tensor
        A complete ``state_dict`` for ``model``: the mapped feature weights, and
        ``model``'s own (freshly initialised) head.

    Raises
    ------
    ConfigError
        If a feature key is missing from ``state``, ``state`` has keys this architecture
        does not, or a shape differs (e.g. ``width_mult`` other than 1).
    """
    if arch not in HEAD_PREFIXES:
        raise ConfigError(f"no torchvision weight mapping for model {arch!r}")
    own = model.state_dict()
    heads = HEAD_PREFIXES[arch]
    # the model's own head (and any layer torchvision lacks) keeps its initialisation
    body = {k for k in own if not k.startswith(heads)}
    source = {k: v for k, v in state.items() if not k.startswith(heads)}
    missing = sorted(body - set(source))
    unexpected = sorted(set(source) - body)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
        raise ConfigError(f"the weights are not torchvision's {arch} layout: " + "; ".join(parts))
    mapped: dict[str, torch.Tensor] = {}
    stem = STEM_KEYS[arch]
    for key in body:
        value = source[key].detach()
        target = own[key]
        if key == stem:
            value = _fit_stem(value, target.shape)
        if value.shape != target.shape:
            raise ConfigError(
                f"torchvision {arch} weight {key} has shape {tuple(value.shape)}, this model "
                f"needs {tuple(target.shape)} (ImageNet weights need width_mult=1)"
            )
        mapped[key] = value.to(target.dtype)
    for key in own:
        if key not in mapped:
            mapped[key] = own[key].detach().clone()
    return mapped


def _fit_stem(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Adapt the ImageNet stem ``(out, 3, k, k)`` to ``shape`` = ``(out, C, k', k')``."""
    if weight.ndim != 4 or len(shape) != 4 or weight.shape[0] != shape[0]:
        return weight  # the shape check reports it
    channels, size = int(shape[1]), (int(shape[2]), int(shape[3]))
    if weight.shape[1] != channels:
        mean = weight.mean(dim=1, keepdim=True)  # (out, 1, k, k)
        weight = mean if channels == 1 else mean.repeat(1, channels, 1, 1) * (3 / channels)
    if tuple(weight.shape[2:]) != size:
        # antialiased resample times the area ratio, then a constant shift so that each
        # kernel keeps its sum exactly (its response to a flat image)
        area = (weight.shape[2] * weight.shape[3]) / (size[0] * size[1])
        resized = area * F.interpolate(
            weight, size=size, mode="bilinear", align_corners=False, antialias=True
        )
        missing = weight.sum(dim=(2, 3), keepdim=True) - resized.sum(dim=(2, 3), keepdim=True)
        weight = resized + missing / (size[0] * size[1])
    return weight
