"""Tests of fedcrypt.tasks.data.datasets: WDBC, MedMNIST .npz files, and their errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.data import datasets
from fedcrypt.tasks.data.datasets import DATASETS, load_dataset

SIZES = {"train": 12, "val": 4, "test": 6}


def write_npz(
    path: Path,
    *,
    rgb: bool = False,
    label_shape: str = "flat",
    drop: str | None = None,
    num_classes: int = 2,
    side: int = 28,
) -> dict[str, np.ndarray]:
    """A small synthetic MedMNIST file; returns the arrays written."""
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray] = {}
    for split, n in SIZES.items():
        shape = (n, side, side, 3) if rgb else (n, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if label_shape == "column" else labels
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return arrays


@pytest.mark.parametrize("label_shape", ["flat", "column"])
def test_npz_both_label_shapes(tmp_path: Path, label_shape: str) -> None:
    arrays = write_npz(tmp_path / "breastmnist.npz", label_shape=label_shape)
    ds = load_dataset("breastmnist", data_dir=tmp_path)
    assert ds.kind == "image" and ds.input_shape == (1, 28, 28) and ds.num_classes == 2
    assert ds.class_names == ("malignant", "normal, benign")
    for split, n in SIZES.items():
        sp = getattr(ds, split)
        assert sp.x.shape == (n, 1, 28, 28) and sp.x.dtype == np.float32
        assert sp.y.shape == (n,) and sp.y.dtype == np.int64
        np.testing.assert_array_equal(sp.y, arrays[f"{split}_labels"].reshape(-1))
        np.testing.assert_allclose(sp.x[:, 0] * 255.0, arrays[f"{split}_images"], atol=1e-3)


def test_npz_rgb_becomes_channels_first(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path / "derma.npz", rgb=True, num_classes=3)
    ds = load_dataset(str(tmp_path / "derma.npz"))
    assert ds.name == "derma" and ds.input_shape == (3, 28, 28) and ds.num_classes == 3
    assert ds.class_names == ("0", "1", "2")
    # channel c of image i is arrays[..., c]
    np.testing.assert_allclose(
        ds.train.x[3, 2] * 255.0, arrays["train_images"][3, :, :, 2], atol=1e-3
    )
    assert 0.0 <= ds.train.x.min() and ds.train.x.max() <= 1.0


def test_corrupt_file_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    bad.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("breastmnist", data_dir=tmp_path)


def test_truncated_zip_is_a_data_error(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    write_npz(good)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError):
        load_dataset(str(bad))


def test_npy_instead_of_npz_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with path.open("wb") as fh:
        np.save(fh, np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"not a \.npz archive"):
        load_dataset(str(path))


def test_missing_keys_are_named(tmp_path: Path) -> None:
    write_npz(tmp_path / "breastmnist.npz", drop="val_labels")
    with pytest.raises(DataError, match="val_labels"):
        load_dataset("breastmnist", data_dir=tmp_path)


def test_label_columns_differing_between_splits_and_bad_dtype(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path / "a.npz")
    arrays["train_labels"] = np.zeros((SIZES["train"], 14), dtype=np.uint8)
    np.savez(tmp_path / "multi.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"labels differ \(train: 14 label columns, val: class"):
        load_dataset(str(tmp_path / "multi.npz"))
    arrays["val_labels"] = np.zeros((SIZES["val"], 14), dtype=np.uint8)
    arrays["test_labels"] = np.zeros((SIZES["test"], 13), dtype=np.uint8)
    np.savez(tmp_path / "multi.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="test: 13 label columns"):
        load_dataset(str(tmp_path / "multi.npz"))
    arrays["test_labels"] = np.full((SIZES["test"], 14), 2, dtype=np.uint8)
    np.savez(tmp_path / "multi.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="must be 0/1"):
        load_dataset(str(tmp_path / "multi.npz"))
    arrays = write_npz(tmp_path / "b.npz")
    arrays["test_images"] = arrays["test_images"].astype(np.float64)
    np.savez(tmp_path / "float.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="uint8"):
        load_dataset(str(tmp_path / "float.npz"))


def write_chest_like(path: Path, *, n: tuple[int, int, int] = (60, 20, 30), k: int = 14) -> None:
    """A ChestMNIST-shaped file: (N, 28, 28) images, (N, 14) multi-hot labels."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((count, k)) < 0.2).astype(np.uint8)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def test_multilabel_chestmnist_shaped_file(tmp_path: Path) -> None:
    write_chest_like(tmp_path / "chestmnist.npz")
    ds = load_dataset("chestmnist", data_dir=tmp_path)
    assert ds.label_kind == "multilabel" and ds.num_classes == 14
    assert ds.class_names[0] == "atelectasis" and ds.class_names[-1] == "hernia"
    assert ds.train.y.shape == (60, 14) and ds.train.y.dtype == np.float32
    x, y = ds.train.dataset()[3]
    assert x.shape == (1, 28, 28) and y.shape == (14,) and y.dtype.is_floating_point
    other = load_dataset(str(tmp_path / "chestmnist.npz"))
    assert other.class_names == ds.class_names  # the stem names the data set
    write_chest_like(tmp_path / "eleven.npz", k=11)
    assert load_dataset(str(tmp_path / "eleven.npz")).class_names[0] == "label 0"


def test_medmnist_plus_sizes(tmp_path: Path) -> None:
    write_npz(tmp_path / "breastmnist.npz")
    write_npz(tmp_path / "breastmnist_64.npz", side=64)
    ds = load_dataset("breastmnist", data_dir=tmp_path, image_size=64)
    assert ds.input_shape == (1, 64, 64) and "breastmnist_64.npz" in ds.source
    assert "resized" not in ds.source  # the file's own resolution
    with pytest.raises(DataError) as info:
        load_dataset("breastmnist", data_dir=tmp_path, image_size=224)
    message = str(info.value)
    assert str(tmp_path / "breastmnist_224.npz") in message and "medmnist" in message
    # other sides resample the 28-px file with Pillow
    ds = load_dataset("breastmnist", data_dir=tmp_path, image_size=40)
    assert ds.input_shape == (1, 40, 40) and "resized 28x28 -> 40x40" in ds.source
    x, _ = ds.train.dataset()[0]
    assert x.shape == (1, 40, 40) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("breastmnist", data_dir=tmp_path, image_size=0)


def test_missing_file_names_path_and_option(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("pneumoniamnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "pneumoniamnist.npz") in message
    assert "--data-dir" in message


def test_missing_npz_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.npz"):
        load_dataset(str(tmp_path / "nothere.npz"))


def test_default_dir_without_medmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "DEFAULT_DATA_DIR", tmp_path)
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("breastmnist")


def test_default_dir_downloads_with_medmnist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []

    class FakeBreastMNIST:
        def __init__(self, *, split: str, root: str, download: bool, size: int = 28) -> None:
            calls.append({"split": split, "root": root, "download": download, "size": size})
            name = "breastmnist.npz" if size == 28 else f"breastmnist_{size}.npz"
            write_npz(Path(root) / name, side=size)

    fake = types.ModuleType("medmnist")
    fake.INFO = {"breastmnist": {"python_class": "BreastMNIST"}}  # type: ignore[attr-defined]
    fake.BreastMNIST = FakeBreastMNIST  # type: ignore[attr-defined]
    folder = tmp_path / "cache"
    monkeypatch.setattr(datasets, "DEFAULT_DATA_DIR", folder)
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    ds = load_dataset("breastmnist")
    assert len(calls) == 1 and calls[0]["root"] == str(folder) and calls[0]["size"] == 28
    assert len(ds.train) == SIZES["train"]
    ds = load_dataset("breastmnist", image_size=64)  # MedMNIST+: the package's size=64
    assert calls[-1]["size"] == 64 and ds.input_shape == (1, 64, 64)


def test_failed_download_says_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Offline:
        def __init__(self, **kwargs: object) -> None:
            raise OSError("network unreachable")

    fake = types.ModuleType("medmnist")
    fake.INFO = {"breastmnist": {"python_class": "Offline"}}  # type: ignore[attr-defined]
    fake.Offline = Offline  # type: ignore[attr-defined]
    monkeypatch.setattr(datasets, "DEFAULT_DATA_DIR", tmp_path)
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    with pytest.raises(DataError, match=r"network unreachable.*put breastmnist_224\.npz in"):
        load_dataset("breastmnist", image_size=224)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist")
    for name in DATASETS:
        assert name in str(info.value)


def test_wdbc_split_and_standardization() -> None:
    ds = load_dataset("wdbc", seed=3)
    assert ds.kind == "tabular" and ds.input_shape == (30,) and ds.num_classes == 2
    assert ds.class_names == ("malignant", "benign")
    sizes = (len(ds.train), len(ds.val), len(ds.test))
    assert sum(sizes) == 569 and sizes == (341, 114, 114)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int64
    # standardized with train statistics only: exact on train, not on test
    np.testing.assert_allclose(ds.train.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.train.x.std(axis=0), 1.0, atol=1e-4)
    assert np.abs(ds.test.x.mean(axis=0)).max() > 1e-3
    # stratified: class balance (212 malignant / 357 benign) kept in every split
    for sp in (ds.train, ds.val, ds.test):
        assert abs(sp.y.mean() - 357 / 569) < 0.01
    # seeded
    again = load_dataset("wdbc", seed=3)
    np.testing.assert_array_equal(ds.test.x, again.test.x)
    other = load_dataset("wdbc", seed=4)
    assert not np.array_equal(ds.test.x, other.test.x)


def test_real_breastmnist(shared_data: Path) -> None:
    ds = load_dataset("BreastMNIST", data_dir=shared_data)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (546, 78, 156)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 2
    assert ds.train.x.dtype == np.float32 and 0.0 <= ds.train.x.min() <= ds.train.x.max() <= 1.0
    assert set(np.unique(ds.test.y)) == {0, 1}


def test_real_pneumoniamnist(shared_data: Path) -> None:
    path = shared_data / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ds = load_dataset(str(path))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3882, 524, 624)
    assert ds.class_names == ("normal", "pneumonia")
    assert 0.85 < ds.train.y.mean() < 0.95  # the shared copy keeps 388 of 1,214 normal images


def test_rgb_resized_and_read_lazily(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path / "blood.npz", rgb=True, num_classes=4)
    ds = load_dataset(str(tmp_path / "blood.npz"), image_size=14)
    assert ds.input_shape == (3, 14, 14) and ds.label_kind == "multiclass"
    x, y = ds.test.dataset()[2]
    assert x.shape == (3, 14, 14) and int(y) == arrays["test_labels"][2]
    # a flat image stays flat through the resize
    arrays["train_images"][0] = 77
    np.savez(tmp_path / "flat.npz", **arrays)  # type: ignore[arg-type]
    x, _ = load_dataset(str(tmp_path / "flat.npz"), image_size=14).train.dataset()[0]
    assert torch.allclose(x, torch.full_like(x, 77 / 255), atol=1e-3)


def test_paths_that_are_neither(tmp_path: Path) -> None:
    other = tmp_path / "table.xlsx"
    other.write_text("x")
    with pytest.raises(ConfigError, match=r"not a \.npz or \.csv"):
        load_dataset(str(other))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing" / "folder"))
