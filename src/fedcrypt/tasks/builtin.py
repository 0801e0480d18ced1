"""The built-in tasks (``--dataset``/``--model`` shortcuts), made with the public Task API.

``builtin_task(dataset="breastmnist", model="cnn", data_dir=...)`` returns an ordinary
:class:`fedcrypt.Task` whose ``datasets`` partitions the dataset's training split among
the hospitals (IID or Dirichlet label skew), holds out a local validation split per
hospital and gives every hospital the common test split; its ``model`` builds one of
:data:`fedcrypt.tasks.models.MODELS` for the dataset's input shape and classes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from torch import nn

from fedcrypt.task import HospitalDatasets, Task
from fedcrypt.tasks.data.datasets import Dataset, load_dataset
from fedcrypt.tasks.data.hospital import hospital_splits
from fedcrypt.tasks.models import create_model

#: Model used when none is named, by dataset kind.
DEFAULT_MODEL = {"tabular": "mlp", "image": "cnn"}
#: Adam learning rate used when none is given, by model (measured: docs in the README).
DEFAULT_LR = {"mlp": 1e-2, "cnn": 1e-3, "mobilenetv2": 1e-3}


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str, seed: int) -> Dataset:
    return load_dataset(name, data_dir=Path(data_dir) if data_dir else None, seed=seed)


def default_model(dataset: Dataset) -> str:
    """The built-in model for ``dataset``'s kind (``mlp`` for tables, ``cnn`` for images)."""
    return DEFAULT_MODEL[dataset.kind]


def builtin_task(
    *,
    dataset: str = "wdbc",
    data_dir: Path | None = None,
    model: str | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    val_fraction: float = 0.2,
    width_mult: float = 1.0,
    weights: Path | None = None,
    seed: int = 0,
) -> Task:
    """A built-in dataset and model as a :class:`~fedcrypt.Task`.

    Parameters
    ----------
    dataset : str
        ``wdbc`` (embedded), ``breastmnist``, ``pneumoniamnist``, or a MedMNIST ``.npz``
        path (default: ``wdbc``).
    data_dir : Path, optional
        Folder holding ``<dataset>.npz``.
    model : str, optional
        ``mlp``, ``cnn`` or ``mobilenetv2``; None picks :func:`default_model`.
    partition : {"iid", "dirichlet"}
        How the training split is divided (default: ``iid``).
    alpha : float
        Dirichlet concentration (default: 0.5).
    val_fraction : float
        Local validation share per hospital (default: 0.2).
    width_mult : float
        Width multiplier of the model (default: 1.0).
    weights : Path, optional
        A ``state_dict`` to start from.
    seed : int
        Seeds the dataset's own split (WDBC) (default: 0).

    Raises
    ------
    fedcrypt.exceptions.DataError
        If the dataset cannot be loaded.
    fedcrypt.exceptions.ConfigError
        If the model does not fit the data.
    """
    data = _dataset(dataset, str(data_dir or ""), seed)
    model_name = model or default_model(data)

    def make_model() -> nn.Module:
        return create_model(
            model_name,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            width_mult=width_mult,
            weights=weights,
        )

    def make_datasets(hospital: int, num_hospitals: int, run_seed: int) -> HospitalDatasets:
        train, val, test = hospital_splits(
            data,
            client_id=hospital,
            num_clients=num_hospitals,
            partition=partition,
            alpha=alpha,
            seed=run_seed,
            val_fraction=val_fraction,
        )
        return HospitalDatasets(train=train, val=val, test=test)

    return Task(
        name=data.name,
        model=make_model,
        datasets=make_datasets,
        label_kind="binary" if data.num_classes == 2 else "multiclass",
        class_names=data.class_names,
        lr=DEFAULT_LR.get(model_name, 1e-3),
        model_name=model_name,
        description=f"built-in: {data.name} ({data.kind}), model {model_name}",
    )
