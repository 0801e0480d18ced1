"""Tests of fedcrypt.tasks.builtin: built-in tasks over MedMNIST files, image folders and
manifests, checked with the public task contract (inspect_task)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedcrypt.task import inspect_task
from fedcrypt.tasks.builtin import DEFAULT_LR, builtin_task
from fedcrypt.tasks.models import MODELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def image_folder(root: Path, *, n: int = 30, side: int = 50) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 100, (side, side)) + 100 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def chest_like(path: Path, *, k: int = 14) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 90), ("val", 12), ("test", 30)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, k)) < 0.3).astype(np.uint8)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_every_model_has_a_default_lr() -> None:
    assert set(DEFAULT_LR) == set(MODELS)


def test_image_folder_task(tmp_path: Path) -> None:
    task = builtin_task(dataset=str(image_folder(tmp_path / "data")))
    info = inspect_task(task, num_hospitals=3, seed=0)
    assert info.label_kind == "binary" and info.positive_class == "malignant"
    assert info.input_shape == (1, 28, 28) and info.model_name == "cnn"  # 28 px
    parts = [task.datasets(h, 3, 0) for h in range(3)]
    rows = np.concatenate([np.concatenate([p.train.rows, p.val.rows]) for p in parts])  # type: ignore[union-attr]
    assert len(set(rows.tolist())) == rows.size  # disjoint shares
    assert all(len(p.test) == len(parts[0].test) for p in parts)  # type: ignore[arg-type]
    big = builtin_task(dataset=str(tmp_path / "data"), model="mobilenetv2", image_size=40)
    assert inspect_task(big, num_hospitals=2, seed=0).input_shape == (1, 40, 40)
    assert big.lr == DEFAULT_LR["mobilenetv2"]


def test_own_data_with_partition_none(tmp_path: Path) -> None:
    task = builtin_task(dataset=str(image_folder(tmp_path / "data")), partition="none")
    a, b = task.datasets(0, 2, 0), task.datasets(1, 2, 0)
    assert len(a.train) == len(b.train) == 42 and len(a.val) == 6 and len(a.test) == 12  # type: ignore[arg-type]


def test_chestmnist_shaped_task_is_multilabel(tmp_path: Path) -> None:
    task = builtin_task(dataset=str(chest_like(tmp_path / "chestmnist.npz")))
    info = inspect_task(task, num_hospitals=3, seed=0)
    assert info.label_kind == "multilabel" and info.num_outputs == 14
    assert info.class_names[2] == "effusion"
    _, y = task.datasets(1, 3, 0).train[0]
    assert y.shape == (14,) and y.dtype == torch.float32


def test_medmnist_keeps_28px_and_mobilenet_upsamples(shared_data: Path) -> None:
    task = builtin_task(dataset="breastmnist", data_dir=shared_data, model="mobilenetv2")
    info = inspect_task(task, num_hospitals=3, seed=0)
    assert info.input_shape == (1, 28, 28) and info.model_name == "mobilenetv2"
    assert task.label_kind == "binary" and task.class_names == ("malignant", "normal, benign")
