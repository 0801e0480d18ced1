"""The public Task contract: loading by reference, and bad tasks caught before any round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fedcrypt
from fedcrypt.exceptions import TaskError
from fedcrypt.task import inspect_task, load_task

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "wdbc_task.py"


def _data(n: int = 8, *, features: int = 4, labels: torch.Tensor | None = None) -> TensorDataset:
    y = labels if labels is not None else torch.arange(n) % 2
    return TensorDataset(torch.randn(n, features), y)


def _task(model: object = None, datasets: object = None, **kw: object) -> fedcrypt.Task:
    return fedcrypt.Task(
        name="t",
        model=model or (lambda: nn.Linear(4, 2)),  # type: ignore[arg-type]
        datasets=datasets or (lambda h, n, s: fedcrypt.HospitalDatasets(train=_data())),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def test_load_by_file_and_by_module(tmp_path: Path) -> None:
    task = load_task(f"{FIXTURE}:task")
    assert task.name == "my-study" and task.reference() == f"{FIXTURE}:task"
    info = inspect_task(task, num_hospitals=3, seed=0)
    assert (info.label_kind, info.num_outputs, info.input_shape) == ("binary", 2, (30,))
    assert info.model_name == "TinyNet"
    builtin = load_task("fedcrypt.tasks.examples:wdbc_mlp")
    assert builtin.name == "wdbc"


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("no-colon", "FILE.py:NAME"),
        ("/nonexistent/file.py:task", "not found"),
        ("fedcrypt.no_such_module:task", "cannot import"),
        (f"{FIXTURE}:missing", "no attribute 'missing'"),
        (f"{FIXTURE}:TinyNet", "not a fedcrypt.Task"),
    ],
)
def test_bad_references_name_the_problem(ref: str, needle: str) -> None:
    with pytest.raises(TaskError, match=needle):
        load_task(ref)


def test_a_task_file_that_raises_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken_task.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(TaskError, match="boom"):
        load_task(f"{bad}:task")


def test_task_fields_are_validated() -> None:
    with pytest.raises(TaskError, match="name"):
        fedcrypt.Task(name="", model=lambda: nn.Linear(4, 2), datasets=lambda h, n, s: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TaskError, match="callable"):
        fedcrypt.Task(name="x", model=3, datasets=lambda h, n, s: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TaskError, match="label_kind"):
        _task(label_kind="regression")


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        (lambda: _task(model=lambda: "not a module"), "not nn.Module"),
        (lambda: _task(datasets=lambda h, n, s: [1, 2]), "not HospitalDatasets"),
        (
            lambda: _task(
                datasets=lambda h, n, s: fedcrypt.HospitalDatasets(train=[(1.0, 0), (2.0, 1)])
            ),
            "float tensors",
        ),
        (lambda: _task(model=lambda: nn.Linear(4, 1)), "one per class"),
        (lambda: _task(model=lambda: nn.Linear(5, 2)), "fails on a batch"),
        (
            lambda: _task(
                datasets=lambda h, n, s: fedcrypt.HospitalDatasets(
                    train=_data(labels=torch.tensor([2, 1, 0, 0, 1, 2, 0, 1]))
                )
            ),
            "outside the model's 2 classes",
        ),
        (
            lambda: _task(
                model=lambda: nn.Linear(4, 3),
                datasets=lambda h, n, s: fedcrypt.HospitalDatasets(
                    train=_data(labels=torch.ones(8, 2))
                ),
            ),
            "labels have 2 entries but the model returns 3",
        ),
        (
            lambda: _task(
                datasets=lambda h, n, s: fedcrypt.HospitalDatasets(
                    train=_data(), test=_data(features=5)
                )
            ),
            "test inputs differ",
        ),
        (lambda: _task(datasets=lambda h, n, s: 1 / 0), "ZeroDivisionError"),
    ],
)
def test_bad_tasks_are_caught_with_one_line(task: object, needle: str) -> None:
    with pytest.raises(TaskError, match=needle) as info:
        inspect_task(task(), num_hospitals=2, seed=0)  # type: ignore[operator]
    assert "\n" not in str(info.value)


def test_multilabel_and_declared_kinds() -> None:
    multi = _task(
        model=lambda: nn.Linear(4, 3),
        datasets=lambda h, n, s: fedcrypt.HospitalDatasets(
            train=_data(labels=(torch.rand(8, 3) > 0.5).float())
        ),
    )
    assert inspect_task(multi, num_hospitals=1, seed=0).label_kind == "multilabel"
    with pytest.raises(TaskError, match="declared label_kind"):
        inspect_task(_task(label_kind="multilabel"), num_hospitals=1, seed=0)
