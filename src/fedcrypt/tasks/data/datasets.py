"""Dataset loaders behind one :func:`load_dataset`: WDBC, MedMNIST, folders, manifests.

scikit-learn's WDBC table, MedMNIST 2D ``.npz`` files, image folders and CSV manifests
(:mod:`fedcrypt.tasks.data.folders`).

Every loader returns a :class:`Dataset` with three splits whose labels are in memory and
whose inputs become float32 tensors when read (:mod:`fedcrypt.tasks.data.splits`).

* ``wdbc`` — the Wisconsin Diagnostic Breast Cancer table (569 samples, 30 features)
  shipped with scikit-learn. It has no official split: it is split 60/20/20
  (train/val/test), stratified by label and seeded, and standardized with the mean and
  standard deviation of the *train* split only (so no test statistics leak into training).
* MedMNIST v2 (Yang et al., Scientific Data 10, 41, 2023) 2D images (``breastmnist``,
  ``chestmnist``, ...), read from ``data_dir / f"{name}.npz"`` with the official splits;
  labels ``(N,)`` or ``(N, 1)`` (classes) or ``(N, K)`` multi-hot (multi-label, e.g.
  ChestMNIST's 14 findings); grey ``(N, H, W)`` or RGB ``(N, H, W, 3)`` images. MedMNIST+
  sizes (64, 128, 224 px) are the files ``{name}_{size}.npz``. Any other MedMNIST 2D
  ``.npz`` loads by passing its path as ``name``.
* a folder of class sub-folders, or a CSV manifest: see
  :func:`fedcrypt.tasks.data.folders.load_folder`.
"""

from __future__ import annotations

import importlib
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.data.images import ArrayImages
from fedcrypt.tasks.data.splits import AnySplit, Dataset, ImageSplit, Split

logger = logging.getLogger(__name__)

#: MedMNIST v2 2D data sets (the ``medmnist`` package's flags).
MEDMNIST_2D: tuple[str, ...] = (
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)
#: Image sides MedMNIST (28) and MedMNIST+ (64, 128, 224) publish, in pixels.
MEDMNIST_SIZES: tuple[int, ...] = (28, 64, 128, 224)

DATASETS: tuple[str, ...] = ("wdbc", *MEDMNIST_2D)
"""Names accepted by :func:`load_dataset` (besides paths); ``"wdbc"`` needs no file."""

DEFAULT_DATA_DIR: Path = Path.home() / ".medmnist"
"""Where MedMNIST files are looked for when no ``data_dir`` is given: the ``medmnist``
package's own download folder, so a file it downloaded earlier is found."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    # label 0 / 1 as in sklearn.datasets.load_breast_cancer().target_names
    "wdbc": ("malignant", "benign"),
    # MedMNIST v2 INFO[flag]["label"]
    "breastmnist": ("malignant", "normal, benign"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "chestmnist": (
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ),
}

_WDBC_FRACTIONS = (0.6, 0.2, 0.2)


def load_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    seed: int = 0,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load a dataset by name, or a MedMNIST ``.npz`` file, image folder or CSV by path.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (case-insensitive); a path ending in ``.npz`` (any
        MedMNIST 2D file); a folder of images (class sub-folders, optionally under
        ``train/ val/ test/``, or per-split ``train.csv``/``val.csv``/``test.csv``); or
        a ``.csv`` manifest (see :func:`fedcrypt.tasks.data.folders.load_folder`).
    data_dir : pathlib.Path, optional
        Folder holding ``{name}.npz`` (or ``{name}_{size}.npz``) for MedMNIST names
        (default: ``None``, meaning :data:`DEFAULT_DATA_DIR`; if the file is not there
        and the optional ``medmnist`` package is installed, it is downloaded there).
        Ignored for ``"wdbc"`` and for paths.
    seed : int
        Seed of the stratified splits made where the data has none (WDBC, folders and
        manifests without splits) (default: 0). MedMNIST uses its official splits.
    image_size : int, optional
        Side ``S`` in pixels every image is resized to (square). MedMNIST names: ``None``
        (default) reads ``{name}.npz`` (28 px); 64, 128 or 224 read the MedMNIST+ file
        ``{name}_{S}.npz``; other sides resample the 28-px file with Pillow. ``.npz``
        paths: resampled if ``S`` differs. Folders and manifests: default 28.
    val_fraction, test_fraction : float
        Shares of the validation and test splits made for a folder or manifest that has
        none (default: 0.1 and 0.2; stratified, seeded).

    Returns
    -------
    Dataset

    Raises
    ------
    ConfigError
        If ``name`` is neither a known dataset nor an existing path, or a size or
        fraction is out of range.
    DataError
        If a file is missing, unreadable, or lacks the expected layout.
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    lowered = name.lower()
    if lowered.endswith(".npz"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        return load_npz(path, name=path.stem, image_size=image_size)
    if lowered == "wdbc":
        return _load_wdbc(seed=seed)
    if lowered in MEDMNIST_2D:
        path = _find_medmnist(lowered, data_dir, image_size)
        return load_npz(path, name=lowered, image_size=image_size)
    path = Path(name).expanduser()
    if path.is_dir() or lowered.endswith(".csv"):
        from fedcrypt.tasks.data.folders import load_folder

        return load_folder(
            path,
            image_size=image_size,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        )
    if path.exists():
        raise ConfigError(
            f"dataset {name!r} is a file but not a .npz or .csv file; give a MedMNIST "
            ".npz, a CSV manifest or a folder of images"
        )
    if "/" in name or "\\" in name:
        raise DataError(f"dataset not found: {path}")
    raise ConfigError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
        "or give the path of a MedMNIST .npz file, a folder of images or a CSV manifest"
    )


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
        source=f"scikit-learn load_breast_cancer, split 60/20/20 stratified (seed {seed})",
    )


def medmnist_filename(name: str, size: int | None) -> str:
    """The file name MedMNIST gives data set ``name`` at ``size`` px: ``breastmnist.npz``
    (28 px) or ``breastmnist_224.npz`` (MedMNIST+)."""
    return f"{name}.npz" if size in (None, 28) else f"{name}_{size}.npz"


def _find_medmnist(name: str, data_dir: Path | None, size: int | None) -> Path:
    """The path of ``name``'s file for ``size``, downloading it only when no folder was
    given and the ``medmnist`` package is installed."""
    folder = DEFAULT_DATA_DIR if data_dir is None else Path(data_dir).expanduser()
    published = size is None or size in MEDMNIST_SIZES
    file_size = size if published else None  # other sides resample the 28-px file
    wanted = folder / medmnist_filename(name, file_size)
    candidates = [wanted]
    if file_size in (None, 28):
        candidates.append(folder / f"{name}_28.npz")
    for path in candidates:
        if path.is_file():
            return path
    if data_dir is None and _download_medmnist(name, folder, file_size or 28):
        for path in candidates:
            if path.is_file():
                return path
    at = f" ({file_size} px, MedMNIST+)" if file_size not in (None, 28) else ""
    raise DataError(
        f"{name} data{at} not found at {wanted}; put {wanted.name} in that folder "
        f"(from https://zenodo.org/records/10519652), pass --data-dir DIR (data_dir=...) "
        f"with the folder holding it, or install the medmnist package and leave out "
        f"--data-dir to download it into {DEFAULT_DATA_DIR}"
    )


def _download_medmnist(name: str, folder: Path, size: int) -> bool:
    """Download ``name`` at ``size`` px into ``folder`` with the optional ``medmnist``
    package.

    Returns ``False`` if the package is not installed.

    Raises
    ------
    DataError
        If the package is installed but the download fails (e.g. no network).
    """
    try:
        medmnist = importlib.import_module("medmnist")
    except ImportError:
        return False
    logger.info("downloading %s (%d px) with medmnist into %s", name, size, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data_class = getattr(medmnist, medmnist.INFO[name]["python_class"])
        kwargs: dict[str, Any] = {"split": "test", "root": str(folder), "download": True}
        if size != 28:
            kwargs["size"] = size
        data_class(**kwargs)
    except Exception as exc:
        raise DataError(
            f"downloading {name} ({size} px) with medmnist into {folder} failed: {exc}; "
            f"without a network put {medmnist_filename(name, size)} in {folder}"
        ) from exc
    return True


def load_npz(path: Path, *, name: str, image_size: int | None = None) -> Dataset:
    """Read a MedMNIST 2D ``.npz`` (official splits) into a :class:`Dataset`.

    Images stay uint8 in memory and become float32 ``(C, S, S)`` in ``[0, 1]`` one at
    a time (resized with Pillow if ``image_size`` differs from the file's side).

    Raises
    ------
    DataError
        If the file is unreadable, lacks a MedMNIST key, or its arrays disagree (shapes,
        dtypes, label columns between splits).
    """
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

    images: dict[str, ArrayImages] = {}
    labels: dict[str, NDArray[Any]] = {}
    shapes: set[tuple[int, ...]] = set()
    for s in SPLITS:
        imgs = _images(arrays[f"{s}_images"], path=path, split=s)
        y = _labels(arrays[f"{s}_labels"], path=path, split=s)
        if len(imgs) != y.shape[0]:
            raise DataError(
                f"{path}: {s}_images has {len(imgs)} images but {s}_labels has {y.shape[0]}"
            )
        shapes.add((imgs.native_channels, *imgs.native_size))
        images[s], labels[s] = imgs, y
    if len(shapes) != 1:
        raise DataError(f"{path}: splits have different image shapes {sorted(shapes)}")
    widths = {s: (labels[s].shape[1] if labels[s].ndim == 2 else 0) for s in SPLITS}
    if len(set(widths.values())) != 1:
        described = ", ".join(
            f"{s}: {w} label columns" if w else f"{s}: class labels" for s, w in widths.items()
        )
        raise DataError(f"{path}: the splits' labels differ ({described})")
    channels, height, width = shapes.pop()
    multilabel = widths["train"] > 0
    if multilabel:
        num_classes = widths["train"]
        if num_classes < 1:
            raise DataError(f"{path}: multi-label labels have no columns")
    else:
        num_classes = max(int(labels[s].max(initial=0)) for s in SPLITS) + 1
        if num_classes < 2:
            raise DataError(f"{path}: labels hold a single class")
    known = _CLASS_NAMES.get(name.lower())
    if known is not None and len(known) == num_classes:
        class_names = known
    elif multilabel:
        class_names = tuple(f"label {k}" for k in range(num_classes))
    else:
        class_names = tuple(str(k) for k in range(num_classes))
    size = (height, width) if image_size is None else (image_size, image_size)
    note = "" if size == (height, width) else f", resized {height}x{width} -> {size[0]}x{size[1]}"
    splits: dict[str, AnySplit] = {
        s: ImageSplit(images[s], labels[s], channels=channels, size=size) for s in SPLITS
    }
    return Dataset(
        name=name,
        kind="image",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=num_classes,
        input_shape=(channels, *size),
        class_names=class_names,
        source=f"MedMNIST file {path} (official splits{note})",
    )


def _unreadable(path: Path, exc: Exception) -> DataError:
    """One clear error for a file that numpy cannot read as a ``.npz`` archive."""
    if isinstance(exc, OSError) and not isinstance(exc, zipfile.BadZipFile) and exc.strerror:
        reason = exc.strerror  # e.g. permission denied
    else:
        reason = "corrupt, truncated, or not a NumPy .npz archive"
    return DataError(f"cannot read {path} as a MedMNIST .npz file: {reason}")


def _images(a: np.ndarray, *, path: Path, split: str) -> ArrayImages:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` (C = 1 or 3), kept as they are."""
    if a.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images has dtype {a.dtype}, expected uint8")
    if not (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in (1, 3))):
        raise DataError(
            f"{path}: {split}_images has shape {a.shape}, expected (N, H, W) or (N, H, W, 3)"
        )
    if a.shape[0] == 0:
        raise DataError(f"{path}: {split} split is empty")
    return ArrayImages(a)


def _labels(a: np.ndarray, *, path: Path, split: str) -> NDArray[Any]:
    """Class labels ``(N,)``/``(N, 1)`` -> int64 ``(N,)``; multi-hot ``(N, K)`` (K > 1)
    -> float32 ``(N, K)``."""
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)) or (
            a.size and not np.isin(a, (0, 1)).all()
        ):
            raise DataError(
                f"{path}: {split}_labels has shape {a.shape}: multi-label labels must be 0/1"
            )
        return a.astype(np.float32)
    if a.ndim != 1:
        raise DataError(
            f"{path}: {split}_labels has shape {a.shape}, expected (N,), (N, 1) or (N, K)"
        )
    if not np.issubdtype(a.dtype, np.integer) or (a.size and int(a.min()) < 0):
        raise DataError(f"{path}: {split}_labels must be non-negative integers")
    return a.astype(np.int64)


__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "MEDMNIST_2D",
    "MEDMNIST_SIZES",
    "Dataset",
    "ImageSplit",
    "Split",
    "load_dataset",
    "load_npz",
    "medmnist_filename",
]
