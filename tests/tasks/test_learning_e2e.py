"""End-to-end learning checks of the built-in tasks with the training loops: plain FedAvg
(as the federation runs it, without protection) over an image folder built from
BreastMNIST and over a ChestMNIST-shaped multi-label file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fedcrypt.task import Task, inspect_task
from fedcrypt.tasks.builtin import builtin_task
from fedcrypt.training import EvalResult, evaluate, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def fedavg(
    task: Task, *, hospitals: int, rounds: int, epochs: int = 3, seed: int = 0
) -> tuple[EvalResult, EvalResult]:
    """Weighted FedAvg of every state_dict entry; returns (val of hospital 0, test)."""
    info = inspect_task(task, num_hospitals=hospitals, seed=seed)
    torch.manual_seed(seed)
    model = task.model()
    sites = []
    for h in range(hospitals):
        data = task.datasets(h, hospitals, seed)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + h)
        sites.append((DataLoader(data.train, batch_size=32, shuffle=True, generator=gen), data))
    for r in range(1, rounds + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        states, counts = [], []
        for h, (loader, data) in enumerate(sites):
            model.load_state_dict(start)
            train(model, loader, epochs=epochs, lr=task.lr or 1e-3, seed=r * 1_009 + h,
                  label_kind=info.label_kind)  # fmt: skip
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            counts.append(len(data.train))
        total = sum(counts)
        model.load_state_dict(
            {
                k: (sum(s[k].double() * n for s, n in zip(states, counts, strict=True)) / total).to(
                    states[0][k].dtype
                )
                for k in states[0]
            }
        )
    data = sites[0][1]
    val = evaluate(model, DataLoader(data.val, batch_size=256), label_kind=info.label_kind)
    test = evaluate(model, DataLoader(data.test, batch_size=256), label_kind=info.label_kind)
    return val, test


def test_breastmnist_image_folder_learns_in_three_rounds(shared_data: Path, tmp_path: Path) -> None:
    arrays = np.load(shared_data / "breastmnist.npz")
    names = {0: "malignant", 1: "normal_benign"}
    index = 0
    for split in ("train", "val", "test"):  # pooled: the folder gives no split
        for img, label in zip(
            arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1), strict=True
        ):
            folder = tmp_path / "breast" / names[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((84, 84), Image.Resampling.BICUBIC).save(
                folder / f"{index}.png"
            )
            index += 1
    task = builtin_task(dataset=str(tmp_path / "breast"))
    val, test = fedavg(task, hospitals=3, rounds=3)
    assert test.auc >= 0.75
    record = test.metrics(youden=val.youden_threshold())
    for key in ("sensitivity", "specificity", "balanced_accuracy"):
        assert 0.0 <= record[key] <= 1.0 and 0.0 <= record[f"{key}_youden"] <= 1.0


def chest_shaped(path: Path, *, n_train: int = 2400) -> Path:
    """14 labels, each adding its own global texture to a noisy 28x28 image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    prevalence = np.array(
        [0.2, 0.05, 0.24, 0.36, 0.1, 0.12, 0.03, 0.09, 0.08, 0.04, 0.04, 0.03, 0.06, 0.02]
    )
    arrays = {}
    for split, n in (("train", n_train), ("val", n_train // 7), ("test", n_train // 3)):
        y = (rng.random((n, 14)) < prevalence).astype(np.uint8)
        images = 90 + 30 * np.sin(xx / 5.0)[None] + rng.normal(0, 25, (n, 28, 28))
        for j in range(14):
            images += y[:, j, None, None] * (
                20 * np.sin((0.3 + 0.15 * j) * xx + (j % 3) * 0.4 * yy)
            )
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = y
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_chestmnist_shaped_file_reports_14_label_aucs(tmp_path: Path) -> None:
    task = builtin_task(dataset=str(chest_shaped(tmp_path / "chestmnist.npz")))
    _, test = fedavg(task, hospitals=3, rounds=2)
    assert test.label_kind == "multilabel" and len(test.auc_per_label) == 14
    assert not any(math.isnan(a) for a in test.auc_per_label)
    assert test.auc == pytest.approx(np.mean(test.auc_per_label)) and test.auc >= 0.80
