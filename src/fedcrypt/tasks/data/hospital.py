"""One hospital's data: its share of the training split, local validation, the test split.

As torch datasets (:func:`hospital_splits`) or loaders (:func:`hospital_data`): the
hospital's share of the training split, a local validation split held out of it, and
the common test split; or, with ``partition="none"``, the whole dataset (a hospital's
own data on the deployment engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from fedcrypt.exceptions import ConfigError
from fedcrypt.tasks.data.partition import (
    PARTITIONS,
    label_keys,
    partition_indices,
    stratified_holdout,
)
from fedcrypt.tasks.data.splits import Dataset

#: ``partition`` values of :func:`hospital_data`: the schemes of
#: :func:`~fedcrypt.tasks.data.partition.partition_indices`, and ``"none"`` (every hospital
#: holds the whole dataset: its own data, on the deployment engine).
HOSPITAL_PARTITIONS: tuple[str, ...] = (*PARTITIONS, "none")


@dataclass
class HospitalData:
    """The loaders one hospital trains and evaluates with.

    Each loader yields ``(x, y)`` batches: ``x`` float32 ``[batch_size, *input_shape]``,
    ``y`` int64 ``[batch_size]`` (or float32 ``[batch_size, K]``, multi-label).

    Attributes
    ----------
    train : torch.utils.data.DataLoader
        The hospital's training examples, reshuffled every epoch (seeded).
    val : torch.utils.data.DataLoader
        The hospital's local validation examples (not shuffled; may be empty when
        ``val_fraction`` is 0).
    test : torch.utils.data.DataLoader
        The dataset's common test split, the same at every hospital (not shuffled).
    num_train, num_val, num_test : int
        Number of examples in each loader; ``num_train`` is the FedAvg weight.
    """

    train: DataLoader[tuple[torch.Tensor, torch.Tensor]]
    val: DataLoader[tuple[torch.Tensor, torch.Tensor]]
    test: DataLoader[tuple[torch.Tensor, torch.Tensor]]
    num_train: int
    num_val: int
    num_test: int


def hospital_data(
    dataset: Dataset,
    *,
    client_id: int,
    num_clients: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    val_fraction: float = 0.2,
    batch_size: int = 32,
) -> HospitalData:
    """Build hospital ``client_id``'s loaders in a simulated federation.

    ``dataset.train`` is partitioned among the ``num_clients`` hospitals with
    :func:`~fedcrypt.tasks.data.partition.partition_indices` (the same seed at every hospital
    gives disjoint shares). Each hospital then holds out ``val_fraction`` of its share,
    stratified by label (by label combination, multi-label), as its local validation
    split. The dataset's official ``val`` split is *not* used here: it stays out of the
    federation, available to the server or a centralized baseline for model selection.
    Every hospital's ``test`` loader is the common ``dataset.test``.

    With ``partition="none"`` the dataset is this hospital's own: its ``train``, ``val``
    and ``test`` splits are used whole (``val_fraction`` is ignored).

    No image is read here: shares are chosen from the labels alone.

    Parameters
    ----------
    dataset : Dataset
        As returned by :func:`~fedcrypt.tasks.data.datasets.load_dataset`.
    client_id : int
        This hospital's index in ``[0, num_clients)``.
    num_clients : int
        Number of hospitals (>= 1).
    partition : {"iid", "dirichlet", "none"}
        Partition scheme (default: ``"iid"``).
    alpha : float
        Dirichlet concentration for ``"dirichlet"`` (default: 0.5).
    seed : int
        Seed of the partition, the local validation split and the training loader's
        shuffling (default: 0).
    val_fraction : float
        Fraction of the hospital's share held out for validation, in ``[0, 1)``
        (default: 0.2). With ``0 < val_fraction`` at least one example is held out.
    batch_size : int
        Batch size of all three loaders (default: 32).

    Returns
    -------
    HospitalData

    Raises
    ------
    ConfigError
        If an argument is out of range or the partition cannot be made (see
        :func:`~fedcrypt.tasks.data.partition.partition_indices`).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, Integral) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not isinstance(client_id, Integral) or not 0 <= client_id < num_clients:
        raise ConfigError(f"client_id must be in [0, {num_clients}), got {client_id!r}")
    if partition not in HOSPITAL_PARTITIONS:
        raise ConfigError(
            f"unknown partition {partition!r}; choose one of {', '.join(HOSPITAL_PARTITIONS)}"
        )
    if not (math.isfinite(val_fraction) and 0.0 <= val_fraction < 1.0):
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")

    client_id, num_clients, batch_size = int(client_id), int(num_clients), int(batch_size)
    train_ds, val_ds, test_ds = _splits(
        dataset,
        client_id=client_id,
        num_clients=num_clients,
        partition=partition,
        alpha=alpha,
        seed=seed,
        val_fraction=val_fraction,
    )
    generator = torch.Generator().manual_seed(seed * 1_000_003 + client_id)
    return HospitalData(
        train=DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=generator),
        val=DataLoader(val_ds, batch_size=batch_size, shuffle=False),
        test=DataLoader(test_ds, batch_size=batch_size, shuffle=False),
        num_train=len(train_ds),
        num_val=len(val_ds),
        num_test=len(test_ds),
    )


def _splits(
    dataset: Dataset,
    *,
    client_id: int,
    num_clients: int,
    partition: str,
    alpha: float,
    seed: int,
    val_fraction: float,
) -> tuple[TorchDataset[Any], TorchDataset[Any], TorchDataset[Any]]:
    if partition == "none":
        return dataset.train.dataset(), dataset.val.dataset(), dataset.test.dataset()
    min_size = 2 if val_fraction > 0 else 1
    parts = partition_indices(
        dataset.train.y,
        num_clients,
        scheme="dirichlet" if partition == "dirichlet" else "iid",
        alpha=alpha,
        seed=seed,
        min_size=min_size,
    )
    own = parts[client_id]
    rng = np.random.default_rng([seed, client_id])
    train_idx, val_idx = _holdout(dataset.train.y[own], own, val_fraction, rng)
    return (
        dataset.train.dataset(train_idx),
        dataset.train.dataset(val_idx),
        dataset.test.dataset(),
    )


def hospital_splits(
    dataset: Dataset,
    *,
    client_id: int,
    num_clients: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> tuple[TorchDataset[Any], TorchDataset[Any], TorchDataset[Any]]:
    """Hospital ``client_id``'s (train, val, test) torch datasets.

    The same partition and local validation split as :func:`hospital_data` (which wraps
    these in loaders); ``test`` is the dataset's common test split. The datasets yield
    ``(x, y)`` pairs and expose their labels as a ``labels`` array (image datasets) or
    as a ``TensorDataset``'s second tensor, so labels are read without reading images.

    Raises
    ------
    ConfigError
        If an argument is out of range or the partition cannot be made.
    """
    data = hospital_data(
        dataset,
        client_id=client_id,
        num_clients=num_clients,
        partition=partition,
        alpha=alpha,
        seed=seed,
        val_fraction=val_fraction,
    )
    return data.train.dataset, data.val.dataset, data.test.dataset


def _holdout(
    y: NDArray[Any],
    idx: NDArray[np.int64],
    fraction: float,
    rng: np.random.Generator,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split ``idx`` (labels ``y``) into (train, val), ``val`` ≈ ``fraction``, stratified.

    Class labels: each class contributes ``round(fraction * n_k)`` examples; if that
    leaves ``val`` empty, one random example is held out. Multi-hot labels: stratified
    by label combination (:func:`~fedcrypt.tasks.data.partition.stratified_holdout`).
    ``train`` always keeps at least one example.
    """
    if fraction == 0 or idx.size < 2:
        return np.sort(idx), np.empty(0, dtype=np.int64)
    if y.ndim == 2:
        kept, held = stratified_holdout(label_keys(y), fraction, rng)
        return np.sort(idx[kept]).astype(np.int64), np.sort(idx[held]).astype(np.int64)
    val_parts: list[NDArray[np.int64]] = []
    for k in np.unique(y):
        members = rng.permutation(idx[y == k])
        val_parts.append(members[: round(fraction * members.size)])
    val = np.concatenate(val_parts)
    if val.size == 0:
        val = rng.choice(idx, size=1)
    if val.size == idx.size:
        val = val[1:]
    train = np.setdiff1d(idx, val)
    return np.sort(train).astype(np.int64), np.sort(val).astype(np.int64)
