"""Model registry: :func:`create_model` builds one of :data:`MODELS` by name."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Integral
from pathlib import Path

import torch
from torch import nn

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.models.cnn import cnn
from fedcrypt.tasks.models.mlp import mlp
from fedcrypt.tasks.models.mobilenetv2 import DEFAULT_INPUT_SIZE, mobilenetv2
from fedcrypt.tasks.models.resnet import resnet18
from fedcrypt.tasks.models.torchvision_weights import (
    is_torchvision_layout,
    map_torchvision_state_dict,
)

MODELS: tuple[str, ...] = ("mlp", "cnn", "mobilenetv2", "resnet18")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "mobilenetv2": mobilenetv2,
    "resnet18": resnet18,
}
_MIN_IMAGE_SIZE = {"cnn": 4, "mobilenetv2": 16, "resnet18": 8}

#: Side (pixels) images are resized to for each model when no image size is given: the
#: model's native input. MobileNetV2 also upsamples smaller inputs to this size itself.
DEFAULT_IMAGE_SIZE: dict[str, int] = {
    "mlp": 28,
    "cnn": 28,
    "resnet18": 28,
    "mobilenetv2": DEFAULT_INPUT_SIZE,
}
#: Dropout before the output layer(s) when none is given, by model.
DEFAULT_DROPOUT: dict[str, float] = {
    "mlp": 0.2,
    "cnn": 0.2,
    "mobilenetv2": 0.2,  # the seed paper's transfer head
    "resnet18": 0.0,  # MedMNIST v2's baseline has none
}
#: Models that accept torchvision's ImageNet weights (:mod:`.torchvision_weights`).
TORCHVISION_MODELS: tuple[str, ...] = ("mobilenetv2", "resnet18")


def create_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width_mult: float = 1.0,
    dropout: float | None = None,
    weights: Path | None = None,
) -> nn.Module:
    """Build a freshly initialised model (or one loaded from ``weights``).

    Every model maps ``[batch_size, *input_shape]`` float32 inputs to
    ``[batch_size, num_classes]`` logits (no softmax).

    Parameters
    ----------
    name : str
        ``"mlp"`` (tabular; flattens images), ``"cnn"`` (compact CNN for ``(C, H, W)``
        images), ``"mobilenetv2"`` (MobileNetV2, images of at least 16 pixels, smaller
        than :data:`DEFAULT_IMAGE_SIZE` upsampled inside the model) or ``"resnet18"``
        (ResNet-18, the MedMNIST 28-px variant below 64 pixels).
    input_shape : tuple of int
        Shape of one example: ``(F,)`` or ``(C, H, W)``.
    num_classes : int
        Number of classes (>= 2).
    width_mult : float
        Width multiplier of the hidden layers / channels (> 0, default: 1.0).
    dropout : float, optional
        Dropout probability before the output layer(s), in ``[0, 1)`` (default: None:
        :data:`DEFAULT_DROPOUT` of the model).
    weights : pathlib.Path, optional
        A ``state_dict`` file (default: ``None``, random initialisation): either saved
        with ``torch.save(model.state_dict(), path)`` for this exact architecture, or,
        for ``mobilenetv2`` and ``resnet18``, torchvision's ImageNet weights in
        torchvision's key layout, mapped by
        :func:`~fedcrypt.tasks.models.torchvision_weights.map_torchvision_state_dict`
        (first convolution averaged over RGB for grey images, a fresh head). Read with
        ``torch.load(path, weights_only=True)``, so no code in the file runs.

    Returns
    -------
    torch.nn.Module
        On the CPU, in training mode.

    Raises
    ------
    ConfigError
        If ``name`` is unknown, the model does not fit ``input_shape`` (e.g. ``cnn`` on
        tabular data), an argument is out of range, or ``weights`` does not match the
        architecture (missing/unexpected keys, other shapes).
    DataError
        If ``weights`` is missing or cannot be read as a ``state_dict``.
    """
    key = name.lower()
    if key not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, Integral) or d < 1 for d in shape):
        raise ConfigError(f"input_shape must be positive integers, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    shape, num_classes = tuple(int(d) for d in shape), int(num_classes)
    if not (math.isfinite(width_mult) and width_mult > 0):
        raise ConfigError(f"width_mult must be > 0, got {width_mult!r}")
    if dropout is None:
        dropout = DEFAULT_DROPOUT[key]
    if not (math.isfinite(dropout) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if key in _MIN_IMAGE_SIZE:
        if len(shape) != 3:
            raise ConfigError(
                f"model {key!r} needs image input (C, H, W), got input_shape {shape}; "
                "use 'mlp' for tabular data"
            )
        if min(shape[1:]) < _MIN_IMAGE_SIZE[key]:
            raise ConfigError(
                f"model {key!r} needs images of at least {_MIN_IMAGE_SIZE[key]} pixels "
                f"per side, got {shape[1]}x{shape[2]}"
            )
    model = _BUILDERS[key](shape, num_classes, width_mult=width_mult, dropout=dropout)
    if weights is not None:
        load_weights(model, weights, name=key)
    return model


def load_weights(model: nn.Module, path: Path, *, name: str = "model") -> None:
    """Load a ``state_dict`` file into ``model`` after checking every key and shape.

    For ``name`` in :data:`TORCHVISION_MODELS`, a file in torchvision's ImageNet layout
    (1000-class classifier) is mapped instead
    (:func:`~fedcrypt.tasks.models.torchvision_weights.map_torchvision_state_dict`).

    Raises
    ------
    DataError
        If ``path`` is missing or is not a ``torch.save``-d mapping of tensors.
    ConfigError
        If its keys or tensor shapes differ from ``model``'s.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise DataError(f"cannot read weights {path} as a state_dict ({exc})") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DataError(f"weights {path} do not hold a state_dict (a mapping of tensors)")
    expected = model.state_dict()
    exact = set(state) == set(expected) and all(
        state[k].shape == v.shape for k, v in expected.items()
    )
    if name in TORCHVISION_MODELS and not exact:
        if is_torchvision_layout(state, name):
            try:
                mapped = map_torchvision_state_dict(state, model, arch=name)
            except ConfigError as exc:
                raise ConfigError(f"weights {path}: {exc}") from None
            model.load_state_dict(mapped, strict=True)
            return
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) (e.g. {wrong[0]})")
    if problems:
        raise ConfigError(
            f"weights {path} do not match this {name} "
            f"(same model name, input_shape, num_classes and width_mult needed): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def default_image_size(model: str) -> int:
    """The side in pixels images are resized to for ``model`` (:data:`DEFAULT_IMAGE_SIZE`).

    Raises
    ------
    ConfigError
        If ``model`` is unknown.
    """
    key = model.lower()
    if key not in DEFAULT_IMAGE_SIZE:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return DEFAULT_IMAGE_SIZE[key]


__all__ = [
    "DEFAULT_DROPOUT",
    "DEFAULT_IMAGE_SIZE",
    "MODELS",
    "TORCHVISION_MODELS",
    "create_model",
    "default_image_size",
    "load_weights",
]
