"""Tests of fedcrypt.tasks.data.hospital: per-hospital loaders in a simulated federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcrypt.exceptions import ConfigError
from fedcrypt.tasks.data.datasets import Dataset, Split
from fedcrypt.tasks.data.hospital import hospital_data, hospital_splits


def make_dataset(n_train: int = 300, n_test: int = 40) -> Dataset:
    rng = np.random.default_rng(0)

    def split(n: int, offset: int) -> Split:
        # feature 0 carries the example's global id so tests can trace examples
        x = rng.normal(size=(n, 4)).astype(np.float32)
        x[:, 0] = np.arange(n) + offset
        y = (np.arange(n) % 3 == 0).astype(np.int64)
        return Split(x, y)

    return Dataset(
        name="toy",
        kind="tabular",
        train=split(n_train, 0),
        val=split(10, 10_000),
        test=split(n_test, 20_000),
        num_classes=2,
        input_shape=(4,),
        class_names=("a", "b"),
    )


def ids(loader: torch.utils.data.DataLoader) -> np.ndarray:
    return np.concatenate([x[:, 0].numpy() for x, _ in loader]).astype(np.int64)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_hospitals_disjoint_cover_train_and_share_test(partition: str) -> None:
    ds = make_dataset()
    hs = [
        hospital_data(ds, client_id=c, num_clients=3, partition=partition, alpha=0.5, seed=2)
        for c in range(3)
    ]
    local = np.concatenate([np.concatenate([ids(h.train), ids(h.val)]) for h in hs])
    np.testing.assert_array_equal(np.sort(local), np.arange(300))  # official val not used
    for h in hs:
        assert h.num_train == len(ids(h.train)) and h.num_val == len(ids(h.val))
        assert h.num_test == 40
        np.testing.assert_array_equal(ids(h.test), np.arange(20_000, 20_040))


def test_val_fraction_and_stratification() -> None:
    ds = make_dataset()
    h = hospital_data(ds, client_id=1, num_clients=2, val_fraction=0.2, seed=0)
    assert h.num_train + h.num_val == 150 and h.num_val == 30
    val_labels = np.concatenate([y.numpy() for _, y in h.val])
    assert val_labels.sum() == 10  # a third of the held-out examples are class 1
    none = hospital_data(ds, client_id=1, num_clients=2, val_fraction=0.0)
    assert none.num_val == 0 and none.num_train == 150


def test_batches_and_seeded_shuffling() -> None:
    ds = make_dataset()
    a = hospital_data(ds, client_id=0, num_clients=2, seed=5, batch_size=16)
    b = hospital_data(ds, client_id=0, num_clients=2, seed=5, batch_size=16)
    first_epoch = ids(a.train)
    np.testing.assert_array_equal(first_epoch, ids(b.train))
    assert not np.array_equal(first_epoch, ids(a.train)), "no reshuffle between epochs"
    assert not np.array_equal(first_epoch, np.sort(first_epoch)), "train loader not shuffled"
    other = hospital_data(ds, client_id=0, num_clients=2, seed=6, batch_size=16)
    assert not np.array_equal(first_epoch, ids(other.train))
    x, y = next(iter(a.train))
    assert x.shape == (16, 4) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"client_id": 3, "num_clients": 3},
        {"client_id": -1, "num_clients": 3},
        {"client_id": 0, "num_clients": 0},
        {"client_id": 0, "num_clients": 2, "partition": "pathological"},
        {"client_id": 0, "num_clients": 2, "val_fraction": 1.0},
        {"client_id": 0, "num_clients": 2, "batch_size": 0},
    ],
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        hospital_data(make_dataset(), **kwargs)  # type: ignore[arg-type]


def test_partition_none_gives_each_hospital_the_whole_dataset() -> None:
    ds = make_dataset()
    for c in range(3):
        h = hospital_data(ds, client_id=c, num_clients=3, partition="none")
        assert (h.num_train, h.num_val, h.num_test) == (300, 10, 40)
        np.testing.assert_array_equal(np.sort(ids(h.val)), np.arange(10_000, 10_010))


def test_multilabel_and_lazy_images_are_split_without_reading_pixels() -> None:
    from fedcrypt.tasks.data.images import ImageDataset, ImageSource
    from fedcrypt.tasks.data.splits import ImageSplit

    class Counting(ImageSource):
        reads = 0

        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def read(self, index: int, *, channels: int, size: tuple[int, int]) -> np.ndarray:
            Counting.reads += 1
            return np.full((channels, *size), index / self.n, dtype=np.float32)

    rng = np.random.default_rng(0)

    def split(n: int) -> ImageSplit:
        y = (rng.random((n, 5)) < 0.3).astype(np.float32)
        return ImageSplit(Counting(n), y, channels=1, size=(4, 4))

    ds = Dataset(
        name="chest-like",
        kind="image",
        train=split(200),
        val=split(20),
        test=split(30),
        num_classes=5,
        input_shape=(1, 4, 4),
        class_names=tuple("abcde"),
    )
    assert ds.label_kind == "multilabel"
    hs = [hospital_splits(ds, client_id=c, num_clients=3, seed=1) for c in range(3)]
    assert Counting.reads == 0
    train, val, test = hs[0]
    assert isinstance(train, ImageDataset) and len(test) == 30
    assert abs(len(val) - 0.2 * (len(train) + len(val))) <= 1
    rows = np.concatenate([np.concatenate([h[0].rows, h[1].rows]) for h in hs])
    np.testing.assert_array_equal(np.sort(rows), np.arange(200))
    loader = hospital_data(ds, client_id=0, num_clients=3, seed=1, batch_size=8).train
    x, y = next(iter(loader))
    assert x.shape == (8, 1, 4, 4) and y.shape == (8, 5) and y.dtype == torch.float32
    assert Counting.reads == 8
