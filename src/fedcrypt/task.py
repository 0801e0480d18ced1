"""The public task contract: a hospital's own PyTorch model and data, as :class:`Task`.

A task is what a consortium trains: a model factory and, per hospital, its datasets::

    import fedcrypt

    def model():                                   # -> torch.nn.Module, batch -> logits
        return MyNet()

    def datasets(hospital, num_hospitals, seed):   # -> this hospital's torch Datasets
        return fedcrypt.HospitalDatasets(train=..., val=..., test=...)

    task = fedcrypt.Task(name="my-study", model=model, datasets=datasets)

The datasets yield ``(x, y)`` pairs: ``x`` a float tensor, ``y`` an int class (or a 0-d
integer tensor) for binary and multi-class tasks, or a float multi-hot vector ``(K,)``
for multi-label tasks. The model maps a batch ``[batch_size, *x.shape]`` to logits
``[batch_size, C]`` (``C`` >= 2 classes, softmax cross-entropy) or ``[batch_size, K]``
(multi-label, BCE-with-logits).

Tasks travel by *reference* (``FILE.py:NAME`` or ``package.module:NAME``), so that
simulation workers, SuperNodes and the portal's participants load the same task: see
:func:`load_task` and :meth:`Task.reference`. The built-in datasets and models
(:mod:`fedcrypt.tasks`) are made with this same API.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedcrypt.exceptions import FedcryptError, TaskError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

LabelKind = Literal["binary", "multiclass", "multilabel"]
LABEL_KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel")


@dataclass(frozen=True)
class HospitalDatasets:
    """One hospital's data: torch ``Dataset`` objects of ``(x, y)`` pairs.

    Attributes
    ----------
    train : torch.utils.data.Dataset
        The hospital's training examples (its FedAvg weight is ``len(train)``).
    val : torch.utils.data.Dataset or None
        Local validation examples (metrics, the Youden threshold); None for none.
    test : torch.utils.data.Dataset or None
        Test examples the global model is evaluated on (in a simulation usually a split
        common to all hospitals); None for none.
    """

    train: Dataset[Any]
    val: Dataset[Any] | None = None
    test: Dataset[Any] | None = None


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop of a round is asked to do (given to a ``train`` override).

    Attributes
    ----------
    epochs : int
        Local epochs.
    lr : float
        Learning rate (Adam in the built-in loop).
    batch_size : int
        Batch size.
    weight_decay : float
        L2 penalty.
    class_weight : {"none", "balanced"}
        Loss weighting against class imbalance.
    seed : int
        Seed of this hospital's round (dropout, shuffling).
    device : str
        ``cpu`` or ``cuda``.
    """

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    class_weight: str
    seed: int
    device: str = "cpu"


@dataclass(frozen=True)
class Task:
    """A federated learning task: a model factory and each hospital's datasets.

    Parameters
    ----------
    name : str
        A short name for records and plots (e.g. ``"my-study"``).
    model : callable
        Zero-argument factory returning a fresh ``torch.nn.Module`` that maps
        ``[batch_size, ...]`` inputs to logits. Called once per party; the federation
        seeds torch before each call, so every party builds identical initial weights.
    datasets : callable
        ``datasets(hospital, num_hospitals, seed) -> HospitalDatasets``:
        ``0 <= hospital < num_hospitals``.
    label_kind : {"binary", "multiclass", "multilabel"} or None
        What the labels are; None infers it from the first training example and the
        model's output width (default: None).
    class_names : sequence of str or None
        Names of the classes (or labels, multi-label); index 1 is the positive class of a
        binary task (default: None: ``class 0``, ``class 1``, ...).
    loss : callable or None
        ``loss(logits, y) -> scalar tensor`` replacing cross-entropy / BCE in the
        built-in loops (default: None).
    train : callable or None
        ``train(model, loader, settings: TrainSettings) -> float`` (mean training loss)
        replacing the built-in training loop (default: None).
    evaluate : callable or None
        ``evaluate(model, loader) -> (y_true, y_score, loss)`` replacing the built-in
        evaluation (default: None): ``y_true`` ``(N,)`` int or ``(N, K)`` 0/1,
        ``y_score`` ``(N,)`` positive-class probabilities (binary), ``(N, C)`` class
        probabilities or ``(N, K)`` label probabilities, ``loss`` a float.
    lr : float or None
        The task's default learning rate (default: None: 1e-3).
    model_name : str or None
        The model's name in records (default: None: the model's class name).
    description : str
        One line for reports (default: empty).
    """

    name: str
    model: Callable[[], nn.Module]
    datasets: Callable[[int, int, int], HospitalDatasets]
    label_kind: LabelKind | None = None
    class_names: Sequence[str] | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    train: Callable[..., float] | None = None
    evaluate: Callable[..., Any] | None = None
    lr: float | None = None
    model_name: str | None = None
    description: str = ""
    _reference: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskError("a Task needs a non-empty name")
        for attr in ("model", "datasets"):
            if not callable(getattr(self, attr)):
                raise TaskError(f"task {self.name!r}: {attr} must be callable")
        for attr in ("loss", "train", "evaluate"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                raise TaskError(f"task {self.name!r}: {attr} must be callable or None")
        if self.label_kind is not None and self.label_kind not in LABEL_KINDS:
            raise TaskError(
                f"task {self.name!r}: label_kind must be one of {', '.join(LABEL_KINDS)}, "
                f"got {self.label_kind!r}"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise TaskError(f"task {self.name!r}: lr must be > 0, got {self.lr!r}")

    def with_reference(self, reference: str) -> Task:
        """This task, remembering the reference it was loaded from."""
        object.__setattr__(self, "_reference", reference)
        return self

    def reference(self) -> str | None:
        """Where other processes can load this task from (``FILE.py:NAME`` or
        ``module:NAME``), or None if it is not reachable by name (e.g. built in a
        notebook: it can then only run in-process and through pickling).
        """
        if self._reference is not None:
            return self._reference
        for mod_name, module in list(sys.modules.items()):
            if mod_name == "__main__" or module is None:
                continue
            try:
                items = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in items:
                if value is self:
                    path = getattr(module, "__file__", None)
                    if path and not _importable(mod_name):
                        return f"{Path(path).resolve()}:{attr}"
                    return f"{mod_name}:{attr}"
        return None


def _importable(module: str) -> bool:
    """Whether another process finds ``module`` by name: a module inside an installed
    package. A top-level module (a user's ``my_task.py``) is referred to by its file, as
    the simulation workers need not share this process's ``sys.path`` or directory;
    ``find_spec`` alone would answer from ``sys.modules``.
    """
    if "." not in module:
        return False
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None


def load_task(reference: str) -> Task:
    """Load a :class:`Task` from ``FILE.py:NAME`` or ``package.module:NAME``.

    A file is imported under its stem's name (and registered in ``sys.modules``), so that
    objects pickled by reference to it resolve in this process too.

    Parameters
    ----------
    reference : str
        ``path/to/file.py:NAME`` or ``package.module:NAME``; ``NAME`` may be a
        :class:`Task` or a zero-argument callable returning one.

    Returns
    -------
    Task
        Remembering ``reference`` (absolute path for files).

    Raises
    ------
    fedcrypt.exceptions.TaskError
        If the reference is malformed, the file or module cannot be imported, the
        attribute is missing, or it is not a Task.
    """
    ref = str(reference).strip()
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise TaskError(
            f"task reference {reference!r} must look like FILE.py:NAME or package.module:NAME"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise TaskError(f"task file not found: {path}")
        module = _import_file(path)
        ref = f"{path}:{attr}"
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # any error inside the user's module
            raise TaskError(f"cannot import task module {target!r}: {exc}") from None
    if not hasattr(module, attr):
        raise TaskError(f"{target} has no attribute {attr!r}")
    value = getattr(module, attr)
    if not isinstance(value, Task) and callable(value):
        try:
            value = value()
        except Exception as exc:
            raise TaskError(f"{ref}: calling {attr}() failed: {exc}") from None
    if not isinstance(value, Task):
        raise TaskError(f"{ref} is a {type(value).__name__}, not a fedcrypt.Task")
    return value.with_reference(ref)


def _import_file(path: Path) -> Any:
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == path:
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"cannot import task file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent = str(path.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)  # the task file's own imports of its siblings
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # any error inside the user's file
        sys.modules.pop(name, None)
        raise TaskError(f"cannot import task file {path}: {type(exc).__name__}: {exc}") from None
    return module


@dataclass(frozen=True)
class TaskInfo:
    """What :func:`inspect_task` found out about a task (from hospital 0's data).

    Attributes
    ----------
    label_kind : {"binary", "multiclass", "multilabel"}
        The kind of labels.
    num_outputs : int
        Width of the model's output: classes ``C`` or labels ``K``.
    input_shape : tuple of int
        Shape of one example ``x``.
    model_name : str
        The model's class name (records say what ran).
    num_parameters : int
        Values in the model's ``state_dict`` (floating and integer buffers included).
    class_names : tuple of str
        One per class (or label).
    """

    label_kind: LabelKind
    num_outputs: int
    input_shape: tuple[int, ...]
    model_name: str
    num_parameters: int
    class_names: tuple[str, ...]

    @property
    def positive_class(self) -> str | None:
        """The name of the positive class of a binary task (index 1), else None."""
        return self.class_names[1] if self.label_kind == "binary" else None


def _first(ds: Any, what: str, task: str) -> tuple[Any, Any]:
    try:
        n = len(ds)
    except TypeError:
        raise TaskError(f"task {task!r}: {what} dataset has no len()") from None
    if n < 1:
        raise TaskError(f"task {task!r}: {what} dataset is empty")
    try:
        item = ds[0]
    except Exception as exc:
        raise TaskError(f"task {task!r}: reading {what}[0] failed: {exc}") from None
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise TaskError(f"task {task!r}: {what} examples must be (x, y) pairs")
    return item[0], item[1]


def inspect_task(
    task: Task,
    *,
    num_hospitals: int,
    seed: int,
    hospital: int = 0,
    model: nn.Module | None = None,
    data: HospitalDatasets | None = None,
) -> TaskInfo:
    """Check a task before any round starts, on one hospital's data; say what is wrong.

    Builds the model (seeded), loads the hospital's datasets (or takes ``model`` and
    ``data`` already built), reads their first examples and runs the model on a batch of
    two.

    Parameters
    ----------
    task : Task
        The task.
    num_hospitals, seed : int
        Passed to ``task.datasets``.
    hospital : int
        Whose data to inspect (default: 0).
    model, data : optional
        Already built by the caller (so nothing is built twice).

    Raises
    ------
    fedcrypt.exceptions.TaskError
        One line naming what is wrong: ``datasets`` not returning
        :class:`HospitalDatasets`, a dataset yielding non-tensors or no ``(x, y)``
        pairs, a model that is not an ``nn.Module``, an output that does not match the
        labels (width, kind), a failing forward pass.
    """
    import torch
    from torch import nn

    name = task.name
    if model is None:
        torch.manual_seed(seed)
        try:
            model = task.model()
        except FedcryptError:
            raise
        except Exception as exc:
            raise TaskError(f"task {name!r}: model() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {name!r}: model() returned {type(model).__name__}, not nn.Module")
    if data is None:
        try:
            data = task.datasets(hospital, num_hospitals, seed)
        except FedcryptError:
            raise
        except Exception as exc:
            raise TaskError(
                f"task {name!r}: datasets({hospital}, {num_hospitals}, {seed}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(data, HospitalDatasets):
        raise TaskError(
            f"task {name!r}: datasets() returned {type(data).__name__}, not HospitalDatasets"
        )
    x, y = _first(data.train, "train", name)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TaskError(
            f"task {name!r}: training inputs must be float tensors, got {type(x).__name__}"
            + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else "")
        )
    if isinstance(y, bool) or not isinstance(y, int | torch.Tensor):
        raise TaskError(f"task {name!r}: labels must be ints or tensors, got {type(y).__name__}")
    y_t = torch.as_tensor(y)
    for split in ("val", "test"):
        ds = getattr(data, split)
        if ds is not None and len(ds) > 0:
            xs, ys = _first(ds, split, name)
            if not isinstance(xs, torch.Tensor) or tuple(xs.shape) != tuple(x.shape):
                raise TaskError(
                    f"task {name!r}: {split} inputs differ from the training inputs "
                    f"(shape {tuple(getattr(xs, 'shape', ()))} vs {tuple(x.shape)})"
                )
            if tuple(torch.as_tensor(ys).shape) != tuple(y_t.shape):
                raise TaskError(f"task {name!r}: {split} labels differ in shape from train's")
    second = data.train[1][0] if len(data.train) > 1 else x  # type: ignore[arg-type]
    batch = torch.stack([x, second])
    was = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        if param is not None:
            batch = batch.to(param.device)
        with torch.no_grad():
            out = model(batch)
    except Exception as exc:
        raise TaskError(
            f"task {name!r}: the model fails on a batch of shape {tuple(batch.shape)}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        raise TaskError(
            f"task {name!r}: the model must return logits [batch_size, C]; got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    width = int(out.shape[1])
    if y_t.ndim == 0:
        if y_t.is_floating_point():
            raise TaskError(f"task {name!r}: class labels must be integers, got {y_t.dtype}")
        kind: LabelKind = "binary" if width == 2 else "multiclass"
        if width < 2:
            raise TaskError(
                f"task {name!r}: the model returns {width} logit per example; a "
                "classification task needs one per class (>= 2)"
            )
        if not 0 <= int(y_t) < width:
            raise TaskError(
                f"task {name!r}: label {int(y_t)} is outside the model's {width} classes"
            )
    elif y_t.ndim == 1:
        kind = "multilabel"
        if y_t.shape[0] != width:
            raise TaskError(
                f"task {name!r}: labels have {y_t.shape[0]} entries but the model returns "
                f"{width} logits"
            )
    else:
        raise TaskError(f"task {name!r}: labels must be scalars or vectors, got {tuple(y_t.shape)}")
    if task.label_kind is not None:
        declared = task.label_kind
        if (declared == "multilabel") != (kind == "multilabel") or (
            declared == "binary" and width != 2
        ):
            raise TaskError(
                f"task {name!r}: declared label_kind {declared!r} does not fit the data "
                f"({kind}, {width} outputs)"
            )
        kind = declared
    names = (
        tuple(task.class_names)
        if task.class_names
        else tuple(f"{'label' if kind == 'multilabel' else 'class'} {i}" for i in range(width))
    )
    if len(names) != width:
        raise TaskError(f"task {name!r}: {len(names)} class names for {width} outputs")
    return TaskInfo(
        label_kind=kind,
        num_outputs=width,
        input_shape=tuple(int(d) for d in x.shape),
        model_name=task.model_name or type(model).__name__,
        num_parameters=sum(int(t.numel()) for t in model.state_dict().values()),
        class_names=names,
    )
