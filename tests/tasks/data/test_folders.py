"""Tests of fedcrypt.tasks.data.folders and .images: image folders, CSV manifests, DICOM,
lazy reading, resizing, and every bad input named in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedcrypt.exceptions import ConfigError, DataError
from fedcrypt.tasks.data.datasets import load_dataset
from fedcrypt.tasks.data.folders import load_folder
from fedcrypt.tasks.data.images import ImageDataset, open_image


def save_image(
    path: Path, *, value: int, size: tuple[int, int] = (40, 30), mode: str = "L"
) -> None:
    """A flat image of grey level ``value`` (RGB: (value, 0, 255 - value)), W x H = size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        img = Image.new("L", size, color=value)
    elif mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], value * 257, dtype=np.uint16))
    else:
        img = Image.new("RGB", size, color=(value, 0, 255 - value))
    img.save(path)


def class_folder(
    root: Path, counts: dict[str, int], *, suffix: str = ".png", **kwargs: object
) -> None:
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            save_image(root / name / f"{name}_{i:03d}{suffix}", value=40 + 100 * k, **kwargs)  # type: ignore[arg-type]


def test_class_folders_without_splits_are_split_stratified_and_seeded(tmp_path: Path) -> None:
    class_folder(tmp_path, {"benign": 60, "malignant": 40})
    (tmp_path / "benign" / "notes.txt").write_text("not an image: ignored")
    ds = load_folder(tmp_path, image_size=16, seed=3)
    assert ds.kind == "image" and ds.label_kind == "binary"
    assert ds.class_names == ("benign", "malignant") and ds.positive_class == "malignant"
    assert ds.input_shape == (1, 16, 16) and ds.num_classes == 2
    sizes = (len(ds.train), len(ds.val), len(ds.test))
    assert sizes == (70, 10, 20)
    for split, n in zip((ds.train, ds.val, ds.test), sizes, strict=True):
        assert split.y.dtype == np.int64
        assert int(split.y.sum()) == round(0.4 * n)  # stratified: 40 % malignant
    names = {s: set(getattr(ds, s).names) for s in ("train", "val", "test")}
    assert not names["train"] & names["test"] and not names["val"] & names["test"]
    again = load_folder(tmp_path, image_size=16, seed=3)
    assert again.test.names == ds.test.names
    other = load_folder(tmp_path, image_size=16, seed=4)
    assert other.test.names != ds.test.names
    # the image itself: resized, grey, in [0, 1], its label from its folder
    item = ds.train.dataset()
    x, y = item[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    expected = 40 / 255 if "benign" in ds.train.names[0] else 140 / 255
    assert float(x.mean()) == pytest.approx(expected, abs=1e-3)
    assert y.dtype == torch.int64 and y.ndim == 0


def test_split_folders_are_used_as_given(tmp_path: Path) -> None:
    for split, n in (("train", 8), ("val", 3), ("test", 4)):
        class_folder(tmp_path / split, {"a": n, "b": n}, mode="RGB")
    ds = load_dataset(str(tmp_path), image_size=12)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (16, 6, 8)
    assert ds.input_shape == (3, 12, 12)  # RGB kept
    assert all("/test/" in name for name in ds.test.names)
    x, _ = ds.test.dataset()[0]
    # RGB (40, 0, 215) -> channels in order
    assert x[:, 5, 5].tolist() == pytest.approx([40 / 255, 0.0, 215 / 255], abs=1e-3)
    # val missing: made from train, test kept
    import shutil

    shutil.rmtree(tmp_path / "val")
    ds = load_folder(tmp_path, image_size=12)
    assert len(ds.test) == 8 and len(ds.train) + len(ds.val) == 16 and len(ds.val) >= 2
    assert "splits made: val" in ds.source


def test_mixed_channels_and_sizes_and_16_bit(tmp_path: Path) -> None:
    save_image(tmp_path / "a" / "grey.png", value=100, size=(50, 20))
    save_image(tmp_path / "a" / "rgb.jpg", value=100, size=(64, 64), mode="RGB")
    save_image(tmp_path / "b" / "deep.tif", value=200, size=(33, 17), mode="I;16")
    save_image(tmp_path / "b" / "grey2.bmp", value=200)
    ds = load_folder(tmp_path, image_size=8, val_fraction=0.25, test_fraction=0.25)
    for split in (ds.train, ds.val, ds.test):
        for i in range(len(split)):
            x, _ = split.dataset()[i]
            assert x.shape == ds.input_shape and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    forced = load_folder(tmp_path, image_size=8, channels=3, val_fraction=0.25, test_fraction=0.25)
    assert forced.input_shape == (3, 8, 8)
    assert forced.train.dataset()[0][0].shape == (3, 8, 8)


def test_images_are_read_lazily(tmp_path: Path) -> None:
    class_folder(tmp_path, {"a": 10, "b": 10})
    ds = load_folder(tmp_path, image_size=8)
    victim = Path(ds.train.names[-1])
    victim.write_bytes(b"")  # broken after loading: only reading it fails
    data = ds.train.dataset()
    assert data.labels.shape == (len(ds.train),)
    data[0]  # other images still read
    with pytest.raises(DataError, match=str(victim)):
        data[len(data) - 1]


def test_csv_manifest_single_label(tmp_path: Path) -> None:
    rows = ["path,diagnosis"]
    for i in range(30):
        label = "malignant" if i % 3 == 0 else "benign"
        save_image(tmp_path / "img" / f"{i}.png", value=i * 5)
        rows.append(f"img/{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(str(tmp_path / "labels.csv"), image_size=10)
    assert ds.class_names == ("benign", "malignant") and ds.name == "labels"
    assert len(ds.train) + len(ds.val) + len(ds.test) == 30 and len(ds.test) == 6
    # integer labels sort numerically
    (tmp_path / "ints.csv").write_text(
        "path,label\n" + "".join(f"img/{i}.png,{(i % 3) * 5}\n" for i in range(30))
    )
    ds = load_folder(tmp_path / "ints.csv", image_size=10)
    assert ds.class_names == ("0", "5", "10") and ds.label_kind == "multiclass"


def test_csv_manifest_multilabel_with_split_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["path,effusion,nodule,mass,split"]
    for i in range(40):
        save_image(tmp_path / f"x{i}.png", value=i)
        labels = (rng.random(3) < 0.4).astype(int)
        split = "train" if i < 28 else ("val" if i < 32 else "test")
        rows.append(f"{tmp_path / f'x{i}.png'},{','.join(map(str, labels))},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    ds = load_folder(tmp_path / "m.csv", image_size=8)
    assert ds.label_kind == "multilabel" and ds.num_classes == 3
    assert ds.class_names == ("effusion", "nodule", "mass")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (28, 4, 8)
    assert ds.train.y.shape == (28, 3) and ds.train.y.dtype == np.float32
    _, y = ds.train.dataset()[0]
    assert y.shape == (3,) and y.dtype == torch.float32
    assert "splits given" in ds.source


def test_per_split_manifests_must_agree(tmp_path: Path) -> None:
    for i in range(6):
        save_image(tmp_path / f"{i}.png", value=i)
    (tmp_path / "train.csv").write_text("path,a,b\n0.png,1,0\n1.png,0,1\n2.png,1,1\n3.png,0,0\n")
    (tmp_path / "test.csv").write_text("path,a,b\n4.png,1,0\n5.png,0,1\n")
    ds = load_folder(tmp_path, image_size=8, val_fraction=0.2)
    assert len(ds.test) == 2 and ds.num_classes == 2
    (tmp_path / "test.csv").write_text("path,a,b,c\n4.png,1,0,0\n5.png,0,1,1\n")
    with pytest.raises(DataError, match="label columns differ"):
        load_folder(tmp_path, image_size=8)


def test_dicom_files(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)

    ramp = np.tile(np.linspace(0, 4095, 48), (64, 1))  # 12-bit, 64 rows x 48 columns
    for i in range(5):
        write_dicom(tmp_path / "benign" / f"{i}.dcm", ramp)
        write_dicom(tmp_path / "malignant" / f"{i}.dcm", ramp, photometric="MONOCHROME1")
    ds = load_folder(tmp_path, image_size=16, val_fraction=0.2, test_fraction=0.2)
    assert ds.input_shape == (1, 16, 16)
    benign = open_image(tmp_path / "benign" / "0.dcm")
    assert benign.mode == "L" and benign.size == (48, 64)
    row = np.asarray(benign)[10]
    assert row[0] == 0 and row[-1] == 255  # min-max scaled
    inverted = np.asarray(open_image(tmp_path / "malignant" / "0.dcm"))[10]
    assert inverted[0] == 255 and inverted[-1] == 0  # MONOCHROME1: 0 is white
    (tmp_path / "benign" / "broken.dcm").write_bytes(b"DICM but not really")
    with pytest.raises(DataError, match=r"broken\.dcm"):
        open_image(tmp_path / "benign" / "broken.dcm")


def test_dataset_reads_labels_without_pixels(tmp_path: Path) -> None:
    class_folder(tmp_path, {"a": 5, "b": 5})
    ds = load_folder(tmp_path, image_size=8, val_fraction=0.2, test_fraction=0.2)
    subset = ds.train.dataset(np.array([0, 2]))
    assert isinstance(subset, ImageDataset) and len(subset) == 2
    np.testing.assert_array_equal(subset.labels, ds.train.y[[0, 2]])


# -- bad input: one clear line each --------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is empty") as info:
        load_folder(tmp_path)
    one_line(info)


def test_class_folder_without_images(tmp_path: Path) -> None:
    class_folder(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*b holds no images") as info:
        load_folder(tmp_path)
    one_line(info)


def test_images_without_class_folders(tmp_path: Path) -> None:
    save_image(tmp_path / "loose.png", value=3)
    with pytest.raises(DataError, match="no class folders"):
        load_folder(tmp_path)


def test_single_class(tmp_path: Path) -> None:
    class_folder(tmp_path, {"only": 4})
    with pytest.raises(DataError, match="single class"):
        load_folder(tmp_path)


def test_unreadable_and_truncated_images(tmp_path: Path) -> None:
    class_folder(tmp_path, {"a": 4, "b": 4})
    bad = tmp_path / "a" / "a_000.png"
    good = bad.read_bytes()
    for path in (tmp_path / "a").iterdir():  # the first training image is one of them
        path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"a_00\d\.png.*truncated") as info:
        load_folder(tmp_path, val_fraction=0.25, test_fraction=0.25, seed=0)
    one_line(info)
    for path in (tmp_path / "a").iterdir():
        path.write_bytes(good)
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"cannot read image .*a_000\.png"):
        open_image(bad)
    # verify=True finds a broken image anywhere at load
    bad.write_bytes(good)
    late = tmp_path / "b" / "b_003.png"
    late.write_bytes(late.read_bytes()[:40])
    with pytest.raises(DataError, match=r"b_003\.png"):
        load_folder(tmp_path, val_fraction=0.25, test_fraction=0.25, verify=True)


def test_manifest_naming_a_missing_file(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", value=1)
    (tmp_path / "m.csv").write_text("path,label\na.png,x\nmissing.png,y\n")
    with pytest.raises(DataError, match=r"line 3: image file not found: .*missing\.png") as info:
        load_folder(tmp_path / "m.csv")
    one_line(info)


def test_bad_manifests(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", value=1)
    cases = {
        "empty.csv": ("", "is empty"),
        "header.csv": ("path\na.png\n", "needs a path column"),
        "fields.csv": ("path,label\na.png,x,extra\n", "line 2: 3 fields"),
        "label.csv": ("path,label\na.png,\n", "line 2: empty label"),
        "multi.csv": ("path,a,b\na.png,1,2\n", "hold 0 or 1"),
        "split.csv": ("path,label,split\na.png,x,holdout\n", "not one of train, val, test"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=match):
            load_folder(tmp_path / name)
    with pytest.raises(DataError, match="manifest not found"):
        load_folder(tmp_path / "nothere.csv")


def test_label_count_differs_between_split_folders(tmp_path: Path) -> None:
    class_folder(tmp_path / "train", {"a": 3, "b": 3})
    class_folder(tmp_path / "test", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError, match="different class folders") as info:
        load_folder(tmp_path)
    one_line(info)


def test_class_in_test_but_not_in_train(tmp_path: Path) -> None:
    for i in range(4):
        save_image(tmp_path / f"{i}.png", value=i)
    (tmp_path / "m.csv").write_text(
        "path,label,split\n0.png,a,train\n1.png,b,train\n2.png,a,test\n3.png,c,test\n"
    )
    with pytest.raises(DataError, match="c appear in the test split but not in train"):
        load_folder(tmp_path / "m.csv")


def test_bad_options(tmp_path: Path) -> None:
    class_folder(tmp_path, {"a": 3, "b": 3})
    for kwargs in (
        {"image_size": 0},
        {"channels": 2},
        {"val_fraction": 1.0},
        {"test_fraction": -0.1},
    ):
        with pytest.raises(ConfigError):
            load_folder(tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "nowhere")


def test_decoded_images_are_cached_within_the_budget(tmp_path: Path) -> None:
    class_folder(tmp_path, {"a": 6, "b": 6})
    cached = load_folder(tmp_path, image_size=8, val_fraction=0.2, test_fraction=0.2)
    uncached = load_folder(
        tmp_path, image_size=8, val_fraction=0.2, test_fraction=0.2, cache_bytes=0
    )
    first = [cached.train.dataset()[i][0] for i in range(len(cached.train))]
    for path in tmp_path.rglob("*.png"):
        path.write_bytes(b"")  # gone: only cached copies can still be read
    again = [cached.train.dataset()[i][0] for i in range(len(cached.train))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(DataError):
        uncached.train.dataset()[0]
