"""Dataset loaders: scikit-learn's WDBC table and MedMNIST 2D ``.npz`` image files.

Every loader returns a :class:`Dataset` with three :class:`Split` objects holding float32
inputs and int64 labels, ready to wrap in torch ``DataLoader`` objects
(:mod:`fedcrypt.tasks.data.hospital`).

* ``wdbc`` — the Wisconsin Diagnostic Breast Cancer table (569 samples, 30 features)
  shipped with scikit-learn. It has no official split: it is split 60/20/20
  (train/val/test), stratified by label and seeded, and standardized with the mean and
  standard deviation of the *train* split only (so no test statistics leak into training).
* ``breastmnist``, ``pneumoniamnist`` — MedMNIST v2 (Yang et al., Scientific Data 10, 41,
  2023) 2D images, read from ``data_dir / f"{name}.npz"`` with the official splits. Any
  other MedMNIST 2D ``.npz`` can be loaded by passing its path as ``name``.
"""

from __future__ import annotations

import importlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, DataError

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("wdbc", "breastmnist", "pneumoniamnist")
"""Names accepted by :func:`load_dataset`; ``"wdbc"`` needs no file and is the default."""

DEFAULT_DATA_DIR: Path = Path.home() / ".medmnist"
"""Where MedMNIST files are looked for when no ``data_dir`` is given: the ``medmnist``
package's own download folder, so a file it downloaded earlier is found."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    # label 0 / 1 as in sklearn.datasets.load_breast_cancer().target_names
    "wdbc": ("malignant", "benign"),
    # MedMNIST v2 INFO["breastmnist"]["label"]
    "breastmnist": ("malignant", "normal, benign"),
    # MedMNIST v2 INFO["pneumoniamnist"]["label"]
    "pneumoniamnist": ("normal", "pneumonia"),
}

_WDBC_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes
    ----------
    x : numpy.ndarray
        float32 inputs: images ``(N, C, H, W)`` scaled to ``[0, 1]``, or tabular
        ``(N, F)`` standardized features.
    y : numpy.ndarray
        int64 class labels ``(N,)`` in ``[0, num_classes)``.
    """

    x: NDArray[np.float32]
    y: NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0] or self.y.ndim != 1:
            raise ValueError(
                f"x has {self.x.shape[0]} rows but y has shape {self.y.shape}; "
                "expected y of shape (N,)"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A dataset with its train, validation and test splits.

    Attributes
    ----------
    name : str
        ``"wdbc"``, a MedMNIST flag such as ``"breastmnist"``, or the stem of the
        ``.npz`` file it was read from.
    kind : {"image", "tabular"}
        ``"image"``: ``x`` is ``(N, C, H, W)``; ``"tabular"``: ``x`` is ``(N, F)``.
    train, val, test : Split
        The splits (official ones for MedMNIST).
    num_classes : int
        Number of classes ``K``; labels lie in ``[0, K)``.
    input_shape : tuple of int
        Shape of one example: ``(C, H, W)`` (e.g. ``(1, 28, 28)``) or ``(F,)``
        (e.g. ``(30,)``).
    class_names : tuple of str
        ``K`` human-readable names, index = label.
    """

    name: str
    kind: Literal["image", "tabular"]
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]


def load_dataset(name: str, *, data_dir: Path | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name, or a MedMNIST 2D ``.npz`` file by path.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (case-insensitive), or a path ending in ``.npz`` to any
        MedMNIST 2D file.
    data_dir : pathlib.Path, optional
        Folder holding ``{name}.npz`` for MedMNIST names (default: ``None``, meaning
        :data:`DEFAULT_DATA_DIR`; if the file is not there and the optional ``medmnist``
        package is installed, it is downloaded there). Ignored for ``"wdbc"`` and for
        ``.npz`` paths.
    seed : int
        Seed of the stratified WDBC split (default: 0). MedMNIST uses its official
        splits and ignores it.

    Returns
    -------
    Dataset

    Raises
    ------
    ConfigError
        If ``name`` is neither a known dataset nor a ``.npz`` path.
    DataError
        If the ``.npz`` file is missing, unreadable, or lacks the MedMNIST keys/layout.
    """
    if name.lower().endswith(".npz"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        return _load_npz(path, name=path.stem)
    key = name.lower()
    if key not in DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
            "or give the path of a MedMNIST .npz file"
        )
    if key == "wdbc":
        return _load_wdbc(seed=seed)
    return _load_npz(_find_medmnist(key, data_dir), name=key)


def _load_wdbc(*, seed: int) -> Dataset:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    idx = np.arange(y.size)
    _, val_frac, test_frac = _WDBC_FRACTIONS
    rest, test_idx = train_test_split(idx, test_size=test_frac, stratify=y, random_state=seed)
    train_idx, val_idx = train_test_split(
        rest, test_size=val_frac / (1.0 - test_frac), stratify=y[rest], random_state=seed
    )
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std == 0] = 1.0

    def split(rows: NDArray[np.intp]) -> Split:
        return Split(((x[rows] - mean) / std).astype(np.float32), y[rows])

    return Dataset(
        name="wdbc",
        kind="tabular",
        train=split(train_idx),
        val=split(val_idx),
        test=split(test_idx),
        num_classes=2,
        input_shape=(x.shape[1],),
        class_names=_CLASS_NAMES["wdbc"],
    )


def _find_medmnist(name: str, data_dir: Path | None) -> Path:
    """Return the path of ``{name}.npz``, downloading it only when no folder was given."""
    folder = DEFAULT_DATA_DIR if data_dir is None else Path(data_dir).expanduser()
    path = folder / f"{name}.npz"
    if path.is_file():
        return path
    if data_dir is None and _download_medmnist(name, folder):
        if path.is_file():
            return path
    raise DataError(
        f"{name} data not found at {path}; pass --data-dir DIR (data_dir=...) with the folder "
        f"holding {name}.npz, or install the medmnist package to download it"
    )


def _download_medmnist(name: str, folder: Path) -> bool:
    """Download ``{name}.npz`` into ``folder`` with the optional ``medmnist`` package.

    Returns ``False`` if the package is not installed.

    Raises
    ------
    DataError
        If the package is installed but the download fails.
    """
    try:
        medmnist = importlib.import_module("medmnist")
    except ImportError:
        return False
    logger.info("downloading %s with medmnist into %s", name, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data_class = getattr(medmnist, medmnist.INFO[name]["python_class"])
        data_class(split="test", root=str(folder), download=True)
    except Exception as exc:
        raise DataError(f"downloading {name} with medmnist into {folder} failed: {exc}") from exc
    return True


def _load_npz(path: Path, *, name: str) -> Dataset:
    """Read a MedMNIST 2D ``.npz`` (official splits) into a :class:`Dataset`."""
    arrays: dict[str, np.ndarray] = {}
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is not a .npz archive (it holds a single array)")
    with loaded as npz:
        missing = [
            f"{s}_{p}" for s in SPLITS for p in ("images", "labels") if f"{s}_{p}" not in npz
        ]
        if missing:
            raise DataError(f"{path} is not a MedMNIST file: missing key(s) {', '.join(missing)}")
        try:
            for key in (f"{s}_{p}" for s in SPLITS for p in ("images", "labels")):
                arrays[key] = npz[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise _unreadable(path, exc) from None

    splits: dict[str, Split] = {}
    shapes: set[tuple[int, ...]] = set()
    for s in SPLITS:
        x = _images(arrays[f"{s}_images"], path=path, split=s)
        y = _labels(arrays[f"{s}_labels"], path=path, split=s)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{path}: {s}_images has {x.shape[0]} images but {s}_labels has {y.shape[0]}"
            )
        shapes.add(tuple(x.shape[1:]))
        splits[s] = Split(x, y)
    if len(shapes) != 1:
        raise DataError(f"{path}: splits have different image shapes {sorted(shapes)}")
    num_classes = max(int(sp.y.max(initial=0)) for sp in splits.values()) + 1
    if num_classes < 2:
        raise DataError(f"{path}: labels hold a single class")
    known = _CLASS_NAMES.get(name.lower())
    class_names = (
        known
        if known is not None and len(known) == num_classes
        else tuple(str(k) for k in range(num_classes))
    )
    return Dataset(
        name=name,
        kind="image",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=num_classes,
        input_shape=shapes.pop(),
        class_names=class_names,
    )


def _unreadable(path: Path, exc: Exception) -> DataError:
    """One clear error for a file that numpy cannot read as a ``.npz`` archive."""
    if isinstance(exc, OSError) and not isinstance(exc, zipfile.BadZipFile) and exc.strerror:
        reason = exc.strerror  # e.g. permission denied
    else:
        reason = "corrupt, truncated, or not a NumPy .npz archive"
    return DataError(f"cannot read {path} as a MedMNIST .npz file: {reason}")


def _images(a: np.ndarray, *, path: Path, split: str) -> NDArray[np.float32]:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in ``[0, 1]``."""
    if a.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images has dtype {a.dtype}, expected uint8")
    if a.ndim == 3:
        a = a[:, None, :, :]
    elif a.ndim == 4 and a.shape[-1] in (1, 3):
        a = np.transpose(a, (0, 3, 1, 2))
    else:
        raise DataError(
            f"{path}: {split}_images has shape {a.shape}, expected (N, H, W) or (N, H, W, 3)"
        )
    if a.shape[0] == 0:
        raise DataError(f"{path}: {split} split is empty")
    return np.ascontiguousarray(a, dtype=np.float32) / np.float32(255.0)


def _labels(a: np.ndarray, *, path: Path, split: str) -> NDArray[np.int64]:
    """Integer labels ``(N,)`` or ``(N, 1)`` -> int64 ``(N,)``."""
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataError(
            f"{path}: {split}_labels has shape {a.shape}, expected (N,) or (N, 1) "
            "(multi-label MedMNIST sets are not supported)"
        )
    if not np.issubdtype(a.dtype, np.integer) or (a.size and int(a.min()) < 0):
        raise DataError(f"{path}: {split}_labels must be non-negative integers")
    return a.astype(np.int64)
