"""Lazy image sources (uint8 arrays, image files, DICOM) and the torch ``Dataset`` of them.

Sources are in-memory uint8 arrays (MedMNIST), PNG/JPEG/TIFF/BMP files (Pillow) and DICOM
files (pydicom); :class:`ImageDataset` reads, converts and resizes one image at a time.

Every image becomes a float32 tensor ``(C, S, S)`` in ``[0, 1]``:

* 8-bit images are divided by 255; 16-bit, floating-point and DICOM pixel data are
  min-max scaled per image (DICOM after its modality rescale; ``MONOCHROME1`` inverted);
* ``C`` is the dataset's channel count: 1 (grey; colour images are converted with
  Pillow's ``L`` mode, ITU-R 601-2 luma) or 3 (RGB; grey images are replicated);
* images are resized to ``S x S`` with Pillow (bicubic, antialiased when shrinking;
  the aspect ratio is not kept: MedMNIST's convention).

Nothing is read until an example is asked for; labels are kept apart, so partitioning and
stratification never read pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from fedcrypt.exceptions import DataError

#: File suffixes read as images (lower case), Pillow's formats and DICOM.
PILLOW_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
IMAGE_SUFFIXES: tuple[str, ...] = PILLOW_SUFFIXES + DICOM_SUFFIXES
#: Bytes of decoded, resized images a folder or manifest data set keeps between epochs.
DEFAULT_CACHE_BYTES = 256 * 2**20

_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class ImageSource:
    """Where a dataset's images come from: ``len(source)`` images, read one at a time."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, index: int, *, channels: int, size: tuple[int, int]) -> NDArray[np.float32]:
        """Image ``index`` as float32 ``(channels, H, W)`` in ``[0, 1]`` at ``size=(H, W)``.

        Raises
        ------
        fedcrypt.exceptions.DataError
            If the image cannot be read (the file is named).
        """
        raise NotImplementedError  # pragma: no cover - interface

    def describe(self, index: int) -> str:
        """A name for image ``index`` in error messages."""
        return f"image {index}"


class ArrayImages(ImageSource):
    """Images held as one uint8 array ``(N, H, W)`` or ``(N, H, W, C)`` (MedMNIST)."""

    def __init__(self, images: NDArray[np.uint8]) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"expected uint8 (N, H, W[, C]) images, got {images.dtype} {images.shape}"
            )
        self.images = images if images.ndim == 4 else images[..., None]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def native_size(self) -> tuple[int, int]:
        """``(H, W)`` of the stored images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def native_channels(self) -> int:
        """``C`` of the stored images."""
        return int(self.images.shape[3])

    def read(self, index: int, *, channels: int, size: tuple[int, int]) -> NDArray[np.float32]:
        """See :meth:`ImageSource.read`."""
        img = self.images[index]  # (H, W, C) uint8
        if img.shape[2] != channels or img.shape[:2] != size:
            mode = "L" if img.shape[2] == 1 else "RGB"
            pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode)
            return _to_array(_fit(pil, channels=channels, size=size))
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)

    def materialize(self, *, channels: int, size: tuple[int, int]) -> NDArray[np.float32]:
        """Every image at once, float32 ``(N, channels, H, W)`` (small data sets, tests)."""
        if self.images.shape[3] == channels and self.native_size == size:
            return np.ascontiguousarray(
                self.images.transpose(0, 3, 1, 2), dtype=np.float32
            ) / np.float32(255.0)
        return np.stack([self.read(i, channels=channels, size=size) for i in range(len(self))])


class FileImages(ImageSource):
    """Images in files (PNG, JPEG, BMP, TIFF via Pillow; DICOM via pydicom), read lazily.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        One file per image.
    cache_bytes : int
        Budget in bytes for keeping images already decoded *and resized* (uint8), so
        later epochs do not decode them again (default: 0, off). Once full, further
        images are decoded at every read; original (full-size) images are never kept.
    """

    def __init__(self, paths: Sequence[Path], *, cache_bytes: int = 0) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.cache_bytes = max(0, int(cache_bytes))
        self._cache: dict[tuple[int, int, tuple[int, int]], NDArray[np.uint8]] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        """The file's path."""
        return str(self.paths[index])

    def read(self, index: int, *, channels: int, size: tuple[int, int]) -> NDArray[np.float32]:
        """See :meth:`ImageSource.read`."""
        key = (index, channels, size)
        pixels = self._cache.get(key)
        if pixels is None:
            img = _fit(open_image(self.paths[index], size=size), channels=channels, size=size)
            pixels = np.asarray(img, dtype=np.uint8)
            if self._cached + pixels.nbytes <= self.cache_bytes:
                self._cache[key] = pixels
                self._cached += pixels.nbytes
        return _uint8_to_chw(pixels)


def open_image(path: Path, *, size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image file fully decoded, as a Pillow image (DICOM converted to ``L``/``RGB``).

    Parameters
    ----------
    path : pathlib.Path
        A file with one of :data:`IMAGE_SUFFIXES`.
    size : tuple of int, optional
        The target ``(H, W)``: JPEG files are then decoded at a reduced scale where that
        still leaves at least this size (Pillow's ``draft``), which is much faster for
        large photographs.

    Raises
    ------
    fedcrypt.exceptions.DataError
        Naming the file, if it is missing, unreadable, truncated, not an image, or larger
        than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _open_dicom(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)  # refuses > Image.MAX_IMAGE_PIXELS (89 M) pixels
            if size is not None and img.format == "JPEG":
                img.draft(img.mode, (size[1], size[0]))
            img.load()  # decode now: truncated files fail here, not later
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Warning) as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from None
    return img


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "truncated" in text.lower():
        return "the file is truncated"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (corrupt or another format)"
    return text.splitlines()[0]


def _open_dicom(path: Path) -> Image.Image:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise DataError(f"reading DICOM file {path} needs pydicom (pip install pydicom)") from None
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, EOFError) as exc:
        raise DataError(f"cannot read DICOM file {path}: {_reason(exc)}") from None
    except Exception as exc:  # pydicom's pixel handlers raise many types (missing codecs)
        raise DataError(f"cannot decode the pixel data of DICOM file {path}: {exc}") from None
    arr = np.asarray(pixels)
    if getattr(ds, "NumberOfFrames", 1) not in (None, "", 1) and arr.ndim >= 3:
        arr = arr[0]  # a multi-frame file: its first frame
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return Image.fromarray(_scale_to_uint8(arr), mode="RGB")
    if arr.ndim != 2:
        raise DataError(f"DICOM file {path}: pixel data of shape {arr.shape} is not an image")
    values = arr.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    values = values * slope + intercept
    if photometric == "MONOCHROME1":
        values = values.max() - values
    return Image.fromarray(_scale_to_uint8(values), mode="L")


def _scale_to_uint8(values: NDArray[Any]) -> NDArray[np.uint8]:
    """Min-max scale any numeric array to uint8 (uint8 input passes unchanged)."""
    if values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    v = values.astype(np.float64)
    lo, hi = float(np.min(v)), float(np.max(v))
    if not np.isfinite(lo) or not np.isfinite(hi):
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(v.min()), float(v.max())
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return np.round(scaled * 255.0).astype(np.uint8)


def image_channels(img: Image.Image) -> int:
    """1 for grey Pillow modes (``L``, ``I;16``, ``F``...), 3 for colour ones."""
    return 1 if img.mode in _GREY_MODES else 3


def _fit(img: Image.Image, *, channels: int, size: tuple[int, int]) -> Image.Image:
    """Convert to ``L`` (1 channel) or ``RGB`` (3) and resize to ``size=(H, W)``."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = Image.fromarray(_scale_to_uint8(np.asarray(img)), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    if (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return img


def _to_array(img: Image.Image) -> NDArray[np.float32]:
    return _uint8_to_chw(np.asarray(img, dtype=np.uint8))


def _uint8_to_chw(arr: NDArray[np.uint8]) -> NDArray[np.float32]:
    """``(H, W)`` or ``(H, W, C)`` uint8 -> float32 ``(C, H, W)`` in ``[0, 1]``."""
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32) / np.float32(255.0)


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(x, y)`` examples read lazily from an :class:`ImageSource`.

    Parameters
    ----------
    source : ImageSource
        Where the images are.
    labels : numpy.ndarray
        int64 ``(N,)`` class labels or float32 ``(N, K)`` multi-hot labels, one per image
        of ``source`` (``rows`` picks among them).
    channels : int
        1 or 3.
    size : tuple of int
        ``(H, W)`` every image is resized to.
    rows : numpy.ndarray, optional
        Indices into ``source``/``labels`` this dataset holds (default: all).

    Attributes
    ----------
    labels : numpy.ndarray
        The labels of this dataset's examples, in order (read without reading images).
    """

    def __init__(
        self,
        source: ImageSource,
        labels: NDArray[Any],
        *,
        channels: int,
        size: tuple[int, int],
        rows: NDArray[np.int64] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.source = source
        self.rows = np.arange(len(source), dtype=np.int64) if rows is None else np.asarray(rows)
        self.labels = labels[self.rows] if rows is not None else labels
        self.channels = channels
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.rows[index])
        x = torch.from_numpy(self.source.read(row, channels=self.channels, size=self.size))
        y = torch.as_tensor(self.labels[index])
        return x, y
