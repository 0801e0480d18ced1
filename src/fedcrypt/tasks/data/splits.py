"""A dataset's splits (in-memory :class:`Split`, lazy :class:`ImageSplit`) and :class:`Dataset`.

Labels are always in memory, apart from the inputs: int64 class labels ``(N,)`` or
float32 multi-hot labels ``(N, K)`` (multi-label). Each split turns any subset of its rows
into a torch ``Dataset`` of ``(x, y)`` pairs (:meth:`Split.dataset`), so that hospitals can
take their share without reading a single image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import TensorDataset

from fedcrypt.tasks.data.images import ArrayImages, ImageDataset, ImageSource

LabelKind = Literal["binary", "multiclass", "multilabel"]


def _check_labels(y: NDArray[Any], n: int) -> None:
    if y.shape[0] != n:
        raise ValueError(f"{n} inputs but labels of shape {y.shape}")
    if y.ndim == 1:
        if y.dtype != np.int64:
            raise ValueError(f"class labels must be int64, got {y.dtype}")
    elif y.ndim == 2:
        if y.dtype != np.float32:
            raise ValueError(f"multi-hot labels must be float32, got {y.dtype}")
    else:
        raise ValueError(f"expected labels of shape (N,) or (N, K), got {y.shape}")


@dataclass(frozen=True)
class Split:
    """One split held in memory (tabular features, or small image arrays).

    Attributes
    ----------
    x : numpy.ndarray
        float32 inputs: images ``(N, C, H, W)`` scaled to ``[0, 1]``, or tabular
        ``(N, F)`` standardized features.
    y : numpy.ndarray
        int64 class labels ``(N,)`` in ``[0, num_classes)``, or float32 0/1 multi-hot
        labels ``(N, K)``.
    """

    x: NDArray[np.float32]
    y: NDArray[Any]

    def __post_init__(self) -> None:
        _check_labels(self.y, int(self.x.shape[0]))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def dataset(self, rows: NDArray[np.int64] | None = None) -> TensorDataset:
        """Rows ``rows`` (default: all) as a ``TensorDataset`` of ``(x, y)``."""
        x = self.x if rows is None else self.x[rows]
        y = self.y if rows is None else self.y[rows]
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        )


@dataclass(frozen=True)
class ImageSplit:
    """One split of images read one at a time from an
    :class:`~fedcrypt.tasks.data.images.ImageSource` (files or a uint8 array).

    Attributes
    ----------
    source : ImageSource
        The images (``len(source) == len(y)``).
    y : numpy.ndarray
        int64 ``(N,)`` or float32 multi-hot ``(N, K)`` labels.
    channels : int
        1 or 3: the ``C`` of every example.
    size : tuple of int
        ``(H, W)`` every image is resized to.
    names : tuple of str
        Where each image comes from (file paths), for messages; may be empty.
    """

    source: ImageSource
    y: NDArray[Any]
    channels: int
    size: tuple[int, int]
    names: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _check_labels(self.y, len(self.source))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def dataset(self, rows: NDArray[np.int64] | None = None) -> ImageDataset:
        """Rows ``rows`` (default: all) as a lazily reading torch ``Dataset``."""
        return ImageDataset(self.source, self.y, channels=self.channels, size=self.size, rows=rows)

    @property
    def x(self) -> NDArray[np.float32]:
        """Every image at once, float32 ``(N, C, H, W)``: for small data and tests only
        (it reads and holds the whole split)."""
        if isinstance(self.source, ArrayImages):
            return self.source.materialize(channels=self.channels, size=self.size)
        return np.stack(
            [self.source.read(i, channels=self.channels, size=self.size) for i in range(len(self))]
        )


AnySplit = Split | ImageSplit


@dataclass(frozen=True)
class Dataset:
    """A dataset with its train, validation and test splits.

    Attributes
    ----------
    name : str
        ``"wdbc"``, a MedMNIST flag such as ``"breastmnist"``, or the stem of the file or
        folder it was read from.
    kind : {"image", "tabular"}
        ``"image"``: examples are ``(C, H, W)``; ``"tabular"``: ``(F,)``.
    train, val, test : Split or ImageSplit
        The splits (official ones for MedMNIST).
    num_classes : int
        Width of the model's output: number of classes ``C`` (labels in ``[0, C)``), or
        of labels ``K`` for a multi-label dataset.
    input_shape : tuple of int
        Shape of one example: ``(C, H, W)`` (e.g. ``(1, 28, 28)``) or ``(F,)``
        (e.g. ``(30,)``).
    class_names : tuple of str
        ``num_classes`` human-readable names, index = label (binary: index 1 is the
        positive class).
    source : str
        What was read and how it was split, for records (default: empty).
    """

    name: str
    kind: Literal["image", "tabular"]
    train: AnySplit
    val: AnySplit
    test: AnySplit
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    source: str = ""

    @property
    def label_kind(self) -> LabelKind:
        """``multilabel`` for multi-hot labels, else ``binary`` (2 classes) or
        ``multiclass``."""
        if self.train.y.ndim == 2:
            return "multilabel"
        return "binary" if self.num_classes == 2 else "multiclass"

    @property
    def positive_class(self) -> str | None:
        """The positive class (index 1) of a binary dataset, else None."""
        return self.class_names[1] if self.label_kind == "binary" else None
