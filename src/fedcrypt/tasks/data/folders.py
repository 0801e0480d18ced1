"""A hospital's own images: folders of class sub-folders, or CSV manifests, read lazily.

Folders follow the ImageFolder convention; files are PNG/JPEG/BMP/TIFF or DICOM, of any
size, with 1 or 3 channels.

Layouts :func:`load_folder` understands::

    data/                       data/                      data/
      benign/ a.png ...           train/ benign/ malignant/  train.csv
      malignant/ b.png ...        val/   benign/ malignant/  val.csv     (optional)
                                  test/  benign/ malignant/  test.csv    (optional)
    labels.csv:
      path,label                  path,atelectasis,effusion,...   (multi-label: 0/1)
      img/a.png,benign            img/a.png,0,1,...
      img/b.dcm,malignant         img/b.png,0,0,...

* Classes of a folder are its sub-folder names, sorted (index 1 is the positive class of
  a binary task); images are found recursively in each class folder, by suffix
  (:data:`~fedcrypt.tasks.data.images.IMAGE_SUFFIXES`); other files are ignored.
* A manifest's first column is the image path (relative to the CSV's folder, or
  absolute); an optional column named ``split`` holds ``train``/``val``/``test``; the other
  columns are labels: one column of class names or integers, or two or more 0/1 columns
  (multi-label, one per label, named by the header).
* Missing splits are made from the training data: seeded and stratified by class (by
  label combination for multi-label data; see :func:`~fedcrypt.tasks.data.partition.
  stratified_holdout`), ``test_fraction`` of it for the test split, then
  ``val_fraction`` of the whole for validation.

What is checked when: at load, every listed file must exist (manifests) and every class
folder must hold an image, and the first image of each split is decoded (it fixes the
channel count, 1 if grey, else 3); every other image is decoded when first read, and an
unreadable or truncated one then raises :class:`~fedcrypt.exceptions.DataError` naming the
file (``verify=True`` decodes all of them at load instead).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.data.images import (
    DEFAULT_CACHE_BYTES,
    IMAGE_SUFFIXES,
    FileImages,
    image_channels,
    open_image,
)
from fedcrypt.tasks.data.partition import label_keys, stratified_holdout
from fedcrypt.tasks.data.splits import Dataset, ImageSplit

#: Side of the images when no ``image_size`` is given, in pixels.
DEFAULT_IMAGE_SIZE = 28
#: Names of split folders / split values (lower case) and the split they mean.
SPLIT_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
#: Largest number of images (rows) one split may list.
MAX_IMAGES = 5_000_000


@dataclass(frozen=True)
class _Listing:
    """One split before images are read: files and their labels (raw)."""

    paths: list[Path]
    labels: list[Any]  # class name per file, or a tuple of 0/1 per file (multi-label)
    where: str


def load_folder(
    path: Path,
    *,
    image_size: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    channels: int | None = None,
    verify: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Dataset:
    """Load an image folder or a CSV manifest (see the module docstring for the layouts).

    Parameters
    ----------
    path : pathlib.Path
        A folder or a ``.csv`` file.
    image_size : int, optional
        Side in pixels every image is resized to (default: :data:`DEFAULT_IMAGE_SIZE`).
    seed : int
        Seed of the splits made where the data has none (default: 0).
    val_fraction, test_fraction : float
        Shares of the whole data set for missing validation and test splits (default:
        0.1 and 0.2).
    channels : int, optional
        1 or 3 to force grey or RGB (default: ``None``: from the first training image).
    verify : bool
        Decode every image at load so an unreadable one is reported before training
        (default: False: only each split's first image; the others at first read).
    cache_bytes : int
        Memory budget in bytes for keeping decoded, resized images between epochs, over
        the three splits (default: 256 MiB; 0: decode at every read). See
        :class:`~fedcrypt.tasks.data.images.FileImages`.

    Returns
    -------
    Dataset
        Of :class:`~fedcrypt.tasks.data.splits.ImageSplit` splits, input shape
        ``(channels, image_size, image_size)``.

    Raises
    ------
    DataError
        One line naming the problem: an empty folder, a class folder without images,
        images directly in the folder without class folders, a single class, a manifest
        naming a missing file or with a bad label, splits whose classes or label columns
        differ, an unreadable image.
    ConfigError
        If ``image_size``, ``channels`` or a fraction is out of range.
    """
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    for label, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (math.isfinite(frac) and 0.0 <= frac < 1.0):
            raise ConfigError(f"{label} must be in [0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError("val_fraction + test_fraction must be below 1")
    path = Path(path).expanduser()
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"manifest not found: {path}")
        listings, columns = _read_manifest(path)
        layout = f"manifest {path}"
    elif path.is_dir():
        listings, columns, layout = _scan_folder(path)
    else:
        raise DataError(f"dataset folder not found: {path}")

    if "train" not in listings:
        raise DataError(f"{layout}: no training images (no row of the train split)")
    class_names, multilabel = _classes(listings, columns, layout)
    labels = {s: _encode(lst, class_names, multilabel) for s, lst in listings.items()}
    made = _make_missing_splits(listings, labels, seed, val_fraction, test_fraction)
    for s in ("train", "val", "test"):
        if len(listings[s].paths) == 0:
            raise DataError(
                f"{layout}: the {s} split is empty (too few images for "
                f"val_fraction={val_fraction}, test_fraction={test_fraction})"
            )
    first = open_image(listings["train"].paths[0], size=(size, size))
    ch = channels or image_channels(first)
    for s in ("val", "test"):
        open_image(listings[s].paths[0], size=(size, size))
    splits = {
        s: ImageSplit(
            FileImages(listings[s].paths, cache_bytes=cache_bytes // 3),
            labels[s],
            channels=ch,
            size=(size, size),
            names=tuple(str(p) for p in listings[s].paths),
        )
        for s in ("train", "val", "test")
    }
    if verify:
        for split in splits.values():
            for i in range(len(split)):
                split.source.read(i, channels=ch, size=(size, size))
    how = f"splits made: {', '.join(made)} (stratified, seed {seed})" if made else "splits given"
    return Dataset(
        name=path.stem if path.suffix.lower() == ".csv" else path.name,
        kind="image",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(class_names),
        input_shape=(ch, size, size),
        class_names=tuple(class_names),
        source=f"{layout}; {how}; images resized to {size}x{size}, {ch} channel(s)",
    )


# -- folders ----------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_folder(root: Path) -> tuple[dict[str, _Listing], list[str] | None, str]:
    """Find the layout of ``root``: per-split CSVs, split folders, or class folders."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(
            f"dataset folder {root} is empty: expected one sub-folder of images per class "
            "(or train/ val/ test/ folders of them, or a CSV manifest)"
        )
    csvs = {SPLIT_NAMES[p.stem.lower()]: p for p in entries if _split_csv(p)}
    if csvs:
        if "train" not in csvs:
            raise DataError(f"{root}: split manifests found ({_names(csvs)}) but no train.csv")
        listings: dict[str, _Listing] = {}
        columns: dict[str, list[str] | None] = {}
        for split, csv_path in csvs.items():
            got, cols = _read_manifest(csv_path, single_split=split)
            listings[split] = got[split]
            columns[split] = cols
        _same_columns(columns, root)
        return listings, columns["train"], f"per-split manifests in {root}"
    dirs = _subdirs(root)
    split_dirs = {SPLIT_NAMES[d.name.lower()]: d for d in dirs if d.name.lower() in SPLIT_NAMES}
    if split_dirs:
        if "train" not in split_dirs:
            raise DataError(f"{root}: split folders found ({_names(split_dirs)}) but no train/")
        others = [d.name for d in dirs if d.name.lower() not in SPLIT_NAMES]
        if others:
            raise DataError(
                f"{root}: mixes split folders ({_names(split_dirs)}) with other folders "
                f"({', '.join(others)}); put class folders inside train/ val/ test/"
            )
        listings = {s: _class_folders(d, where=f"{s} split {d}") for s, d in split_dirs.items()}
        classes = {s: sorted(set(lst.labels)) for s, lst in listings.items()}
        if len({tuple(c) for c in classes.values()}) != 1:
            described = "; ".join(f"{s}: {', '.join(c)}" for s, c in classes.items())
            raise DataError(f"{root}: the splits have different class folders ({described})")
        return listings, None, f"folder {root} (split folders)"
    return {"train": _class_folders(root, where=f"folder {root}")}, None, f"folder {root}"


def _split_csv(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".csv" and path.stem.lower() in SPLIT_NAMES


def _names(found: dict[str, Path]) -> str:
    return ", ".join(p.name for p in found.values())


def _class_folders(folder: Path, *, where: str) -> _Listing:
    dirs = _subdirs(folder)
    loose = [p for p in folder.iterdir() if p.is_file() and _is_image(p)]
    if not dirs:
        if loose:
            raise DataError(
                f"{where} holds images but no class folders: put each class's images in "
                "a sub-folder named after the class, or list them in a CSV manifest"
            )
        raise DataError(
            f"{where} has no class folders: expected one sub-folder of images per class"
        )
    paths: list[Path] = []
    labels: list[str] = []
    for d in dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and _is_image(p))
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [d.name] * len(files)
        if len(paths) > MAX_IMAGES:
            raise DataError(f"{where} holds more than {MAX_IMAGES} images")
    return _Listing(paths=paths, labels=labels, where=where)


# -- manifests --------------------------------------------------------------------------


def _read_manifest(
    path: Path, *, single_split: str | None = None
) -> tuple[dict[str, _Listing], list[str] | None]:
    """Read a CSV manifest into per-split listings; label column names (multi-label) or
    None (one class column)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"manifest {path} is not valid CSV: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"manifest {path} is empty: expected a header 'path,label' and rows")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2:
        raise DataError(
            f"manifest {path}: the header {','.join(header)!r} needs a path column and at "
            "least one label column (path,label or path,label_1,...,label_K)"
        )
    split_col = next((i for i, h in enumerate(header) if h.lower() == "split"), None)
    if split_col == 0:
        raise DataError(f"manifest {path}: the first column must be the image path")
    if split_col is not None and single_split is not None:
        raise DataError(f"manifest {path} is a split's manifest but has a 'split' column")
    label_cols = [i for i in range(1, len(header)) if i != split_col]
    if not label_cols:
        raise DataError(f"manifest {path} has no label column")
    if len(rows) - 1 > MAX_IMAGES:
        raise DataError(f"manifest {path} lists more than {MAX_IMAGES} images")
    multilabel = len(label_cols) > 1
    base = path.parent
    found: dict[str, _Listing] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(
                f"manifest {path} line {line}: {len(row)} fields, the header has {len(header)}"
            )
        raw_path = row[0].strip()
        if not raw_path:
            raise DataError(f"manifest {path} line {line}: empty image path")
        image = Path(raw_path).expanduser()
        image = image if image.is_absolute() else base / image
        if not image.is_file():
            raise DataError(f"manifest {path} line {line}: image file not found: {image}")
        if split_col is not None:
            value = row[split_col].strip().lower()
            if value not in SPLIT_NAMES:
                raise DataError(
                    f"manifest {path} line {line}: split {row[split_col]!r} is not one of "
                    "train, val, test"
                )
            split = SPLIT_NAMES[value]
        else:
            split = single_split or "train"
        label: Any
        if multilabel:
            label = tuple(
                _binary(row[i], path=path, line=line, column=header[i]) for i in label_cols
            )
        else:
            label = row[label_cols[0]].strip()
            if not label:
                raise DataError(f"manifest {path} line {line}: empty label")
        listing = found.setdefault(split, _Listing([], [], f"manifest {path}"))
        listing.paths.append(image)
        listing.labels.append(label)
    if not found:
        raise DataError(f"manifest {path} lists no images")
    return found, ([header[i] for i in label_cols] if multilabel else None)


def _binary(cell: str, *, path: Path, line: int, column: str) -> int:
    text = cell.strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return 1
    if text in ("0", "0.0", "false", "no", ""):
        return 0
    raise DataError(
        f"manifest {path} line {line}: label {column!r} is {cell!r}; multi-label columns "
        "hold 0 or 1"
    )


def _same_columns(columns: dict[str, list[str] | None], root: Path) -> None:
    def describe(cols: list[str] | None) -> str:
        return f"{len(cols)} label columns" if cols else "1 class column"

    shapes = {s: describe(c) for s, c in columns.items()}
    if len(set(shapes.values())) != 1 or len({tuple(c or ()) for c in columns.values()}) != 1:
        text = "; ".join(f"{s}.csv: {d}" for s, d in shapes.items())
        raise DataError(f"{root}: the split manifests' label columns differ ({text})")


# -- labels and splits ------------------------------------------------------------------


def _classes(
    listings: dict[str, _Listing], columns: list[str] | None, layout: str
) -> tuple[list[str], bool]:
    """Class (or label) names in index order, and whether the data is multi-label."""
    if columns is not None:
        return list(columns), True
    values = sorted({lab for lst in listings.values() for lab in lst.labels})
    if all(_is_int(v) for v in values):
        values = sorted(values, key=int)
    if len(values) < 2:
        raise DataError(
            f"{layout}: a single class ({values[0] if values else 'none'}); classification "
            "needs at least two"
        )
    train = set(listings["train"].labels)
    for split, lst in listings.items():
        extra = sorted(set(lst.labels) - train)
        if split != "train" and extra:
            raise DataError(
                f"{layout}: class(es) {', '.join(extra)} appear in the {split} split but not "
                "in train"
            )
    return values, False


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _encode(listing: _Listing, class_names: list[str], multilabel: bool) -> NDArray[Any]:
    if multilabel:
        return np.asarray(listing.labels, dtype=np.float32).reshape(-1, len(class_names))
    index = {name: k for k, name in enumerate(class_names)}
    return np.asarray([index[lab] for lab in listing.labels], dtype=np.int64)


def _make_missing_splits(
    listings: dict[str, _Listing],
    labels: dict[str, NDArray[Any]],
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> list[str]:
    """Carve missing ``test``/``val`` splits out of ``train`` (in place); their names.

    Fractions are of the whole data set (all splits together)."""
    made: list[str] = []
    total = sum(len(lst.paths) for lst in listings.values())
    rng = np.random.default_rng([seed, 7919])
    for split, share in (("test", test_fraction), ("val", val_fraction)):
        if split in listings:
            continue
        train = listings["train"]
        fraction = min(share * total / max(len(train.paths), 1), 0.95)
        kept, held = stratified_holdout(label_keys(labels["train"]), fraction, rng)
        listings[split] = _subset(train, held)
        labels[split] = labels["train"][held]
        listings["train"] = _subset(train, kept)
        labels["train"] = labels["train"][kept]
        made.append(split)
    return made


def _subset(listing: _Listing, rows: NDArray[np.int64]) -> _Listing:
    return _Listing(
        paths=[listing.paths[i] for i in rows],
        labels=[listing.labels[i] for i in rows],
        where=listing.where,
    )
