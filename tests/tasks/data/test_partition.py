"""Tests of fedcrypt.tasks.data.partition: IID and Dirichlet splits of example indices."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.exceptions import ConfigError
from fedcrypt.tasks.data import partition
from fedcrypt.tasks.data.partition import label_keys, partition_indices, stratified_holdout

LABELS = np.repeat(np.arange(3), [200, 100, 50]).astype(np.int64)  # 350 examples, 3 classes


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n, "indices lost or duplicated"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_clients", [1, 3, 10])
def test_disjoint_and_covering(scheme: str, num_clients: int) -> None:
    parts = partition_indices(LABELS, num_clients, scheme=scheme, alpha=0.3, seed=1)  # type: ignore[arg-type]
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, LABELS.size)
    assert min(p.size for p in parts) >= 2


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_reproducible_and_seed_dependent(scheme: str) -> None:
    a = partition_indices(LABELS, 4, scheme=scheme, seed=7)  # type: ignore[arg-type]
    b = partition_indices(LABELS, 4, scheme=scheme, seed=7)  # type: ignore[arg-type]
    c = partition_indices(LABELS, 4, scheme=scheme, seed=8)  # type: ignore[arg-type]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_is_balanced_and_stratified() -> None:
    parts = partition_indices(LABELS, 4, seed=0)
    assert sorted(p.size for p in parts) == [87, 87, 88, 88]
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=3)
        np.testing.assert_allclose(counts, [50, 25, 12.5], atol=1)


def label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each hospital's label mix and the global one."""
    overall = np.bincount(LABELS, minlength=3) / LABELS.size
    tv = [0.5 * np.abs(np.bincount(LABELS[p], minlength=3) / p.size - overall).sum() for p in parts]
    return float(np.mean(tv))


def test_dirichlet_small_alpha_skews_labels() -> None:
    iid = np.mean([label_skew(partition_indices(LABELS, 5, seed=s)) for s in range(5)])
    skewed = np.mean(
        [
            label_skew(partition_indices(LABELS, 5, scheme="dirichlet", alpha=0.1, seed=s))
            for s in range(5)
        ]
    )
    near_iid = np.mean(
        [
            label_skew(partition_indices(LABELS, 5, scheme="dirichlet", alpha=1000.0, seed=s))
            for s in range(5)
        ]
    )
    assert iid < 0.02
    assert skewed > 0.3
    assert near_iid < 0.05


def test_dirichlet_min_size_respected() -> None:
    for seed in range(10):
        parts = partition_indices(LABELS, 20, scheme="dirichlet", alpha=0.3, seed=seed, min_size=5)
        assert min(p.size for p in parts) >= 5
        assert_disjoint_cover(parts, LABELS.size)


def test_dirichlet_impossible_min_size_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition, "MAX_DIRICHLET_DRAWS", 2_000)  # keep the test fast
    with pytest.raises(ConfigError, match="alpha"):
        partition_indices(LABELS, 50, scheme="dirichlet", alpha=0.001, seed=0, min_size=7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 400}, "cannot give"),
        ({"scheme": "shards"}, "unknown partition"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"min_size": -1}, "min_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_clients": 3} | kwargs
    num_clients = args.pop("num_clients")
    with pytest.raises(ConfigError, match=match):
        partition_indices(LABELS, num_clients, **args)  # type: ignore[arg-type]


def test_bad_labels() -> None:
    with pytest.raises(ConfigError, match="1-D integer"):
        partition_indices(np.zeros((4, 2, 2), dtype=np.int64), 2)
    with pytest.raises(ConfigError, match="1-D integer"):
        partition_indices(np.zeros(4), 2)  # type: ignore[arg-type]


MULTI = (np.random.default_rng(0).random((300, 4)) < 0.25).astype(np.float32)


def test_label_keys_group_by_combination() -> None:
    y = np.array([[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32)
    keys = label_keys(y)
    assert keys.dtype == np.int64 and keys[0] == keys[2] and len(set(keys)) == 3
    np.testing.assert_array_equal(label_keys(np.array([2, 0, 1])), [2, 0, 1])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_multilabel_partitions(scheme: str) -> None:
    parts = partition_indices(MULTI, 3, scheme=scheme, alpha=0.5, seed=2)  # type: ignore[arg-type]
    assert_disjoint_cover(parts, 300)
    if scheme == "iid":
        # every hospital gets its share of every label combination (to within one)
        keys = label_keys(MULTI)
        for k in np.unique(keys):
            counts = [int(np.sum(keys[p] == k)) for p in parts]
            assert max(counts) - min(counts) <= 1
    else:
        mixes = np.array([MULTI[p].mean(axis=0) for p in parts])
        assert np.abs(mixes - MULTI.mean(axis=0)).max() > 0.05  # skewed label mixes


def test_stratified_holdout_keeps_group_shares() -> None:
    keys = np.repeat([0, 1, 2, 3, 4], [50, 30, 15, 4, 1]).astype(np.int64)
    kept, held = stratified_holdout(keys, 0.2, np.random.default_rng(0))
    assert held.size == 20 and kept.size == 80
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(100))
    for k, share in ((0, 10), (1, 6), (2, 3)):
        assert abs(int(np.sum(keys[held] == k)) - share) <= 1
    kept, held = stratified_holdout(keys[:2], 0.01, np.random.default_rng(0))
    assert held.size == 1 and kept.size == 1  # at least one each way
    kept, held = stratified_holdout(keys, 0.0, np.random.default_rng(0))
    assert held.size == 0 and kept.size == 100
