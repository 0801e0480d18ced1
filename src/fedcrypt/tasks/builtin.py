"""The built-in tasks (``--dataset``/``--model`` shortcuts), made with the public Task API.

``builtin_task(dataset="breastmnist", model="cnn", data_dir=...)`` returns an ordinary
:class:`fedcrypt.Task` whose ``datasets`` partitions the dataset's training split among
the hospitals (IID or Dirichlet label skew), holds out a local validation split per
hospital and gives every hospital the common test split (or, with ``partition="none"``,
gives each hospital the whole dataset: its own data on the deployment engine); its
``model`` builds one of :data:`fedcrypt.tasks.models.MODELS` for the dataset's input
shape and classes. Datasets are WDBC, MedMNIST names and ``.npz`` files, image folders
and CSV manifests (:func:`fedcrypt.tasks.data.datasets.load_dataset`); images are read
lazily.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from torch import nn

from fedcrypt.task import HospitalDatasets, Task
from fedcrypt.tasks.data.datasets import MEDMNIST_2D, Dataset, load_dataset
from fedcrypt.tasks.data.hospital import hospital_splits
from fedcrypt.tasks.models import create_model, default_image_size

#: Model used when none is named, by dataset kind.
DEFAULT_MODEL = {"tabular": "mlp", "image": "cnn"}
#: Adam learning rate used when none is given, by model (measured: see the README).
DEFAULT_LR = {"mlp": 1e-2, "cnn": 1e-3, "mobilenetv2": 1e-3, "resnet18": 1e-3}


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str, seed: int, image_size: int | None) -> Dataset:
    return load_dataset(
        name, data_dir=Path(data_dir) if data_dir else None, seed=seed, image_size=image_size
    )


def default_model(dataset: Dataset) -> str:
    """The built-in model for ``dataset``'s kind (``mlp`` for tables, ``cnn`` for images)."""
    return DEFAULT_MODEL[dataset.kind]


def _is_medmnist(dataset: str) -> bool:
    return dataset.lower() in MEDMNIST_2D or dataset.lower().endswith(".npz")


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
    image_size: int | None = None,
) -> Task:
    """A built-in dataset and model as a :class:`~fedcrypt.Task`.

    Parameters
    ----------
    dataset : str
        ``wdbc`` (embedded), a MedMNIST name (``breastmnist``, ``chestmnist``, ...), a
        MedMNIST ``.npz`` path, a folder of images (class sub-folders, optionally under
        ``train/ val/ test/``) or a CSV manifest (default: ``wdbc``).
    data_dir : Path, optional
        Folder holding ``<dataset>.npz`` for MedMNIST names.
    model : str, optional
        ``mlp``, ``cnn``, ``mobilenetv2`` or ``resnet18``; None picks
        :func:`default_model` (``cnn`` for images).
    partition : {"iid", "dirichlet", "none"}
        How the training split is divided among hospitals (default: ``iid``); ``none``:
        every hospital uses the whole dataset (its own data, on the deployment engine:
        train, val and test as the dataset has them).
    alpha : float
        Dirichlet concentration (default: 0.5).
    val_fraction : float
        Local validation share per hospital (default: 0.2; unused with ``none``).
    width_mult : float
        Width multiplier of the model (default: 1.0).
    weights : Path, optional
        A ``state_dict`` to start from: this model's own, or torchvision's ImageNet
        weights for ``mobilenetv2``/``resnet18`` (mapped; see
        :mod:`fedcrypt.tasks.models.torchvision_weights`).
    seed : int
        Seeds the dataset's own splits (WDBC, folders without splits) (default: 0).
    image_size : int, optional
        Side in pixels images are resized to. None (default): the model's native size
        (:data:`fedcrypt.tasks.models.DEFAULT_IMAGE_SIZE`) for folders and manifests;
        MedMNIST files keep their 28 px (MobileNetV2 upsamples inside the model). For
        MedMNIST names, 64, 128 or 224 read the MedMNIST+ file ``<name>_<size>.npz``.

    Raises
    ------
    fedcrypt.exceptions.DataError
        If the dataset cannot be loaded.
    fedcrypt.exceptions.ConfigError
        If the model does not fit the data or an option is out of range.
    """
    size = image_size
    if size is None and dataset.lower() != "wdbc" and not _is_medmnist(dataset):
        size = default_image_size(model or DEFAULT_MODEL["image"])
    data = _dataset(dataset, str(data_dir or ""), seed, size)
    model_name = (model or default_model(data)).lower()

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
        label_kind=data.label_kind,
        class_names=data.class_names,
        lr=DEFAULT_LR.get(model_name, 1e-3),
        model_name=model_name,
        description=f"built-in: {data.name} ({data.kind}), model {model_name}; {data.source}",
    )
