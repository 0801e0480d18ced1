"""Validated configuration of one federated run (pydantic), with sensible defaults."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedcrypt.exceptions import ConfigError

Protection = Literal["plain", "he", "secagg"]
#: Old protection names still accepted (with a warning), and the mode each now means.
DEPRECATED_PROTECTIONS: dict[str, str] = {"ckks": "he"}
Partition = Literal["iid", "dirichlet", "none"]

#: Model used when ``--model`` is not given, by dataset kind.
DEFAULT_MODEL = {"tabular": "mlp", "image": "cnn"}
#: Adam learning rate used when ``--lr`` is not given, by model.
DEFAULT_LR = {"mlp": 1e-2, "cnn": 1e-3, "mobilenetv2": 1e-3}
EMBEDDED_DATASET = "wdbc"
_DROP = re.compile(r"^\d+@\d+(:[a-z_]+)?$")


class RunConfig(BaseModel):
    """Everything that defines a federated run; both the server and hospitals read it.

    Attributes
    ----------
    dataset : str
        ``wdbc`` (scikit-learn's Wisconsin table, embedded), ``breastmnist``,
        ``pneumoniamnist``, or a path to a MedMNIST 2D ``.npz`` (default: ``wdbc``).
    data_dir : Path or None
        Folder holding ``<dataset>.npz`` (default: None).
    model : str or None
        ``mlp``, ``cnn`` or ``mobilenetv2``; None picks ``mlp`` for tabular data and
        ``cnn`` for images (default: None).
    clients : int
        Number of hospitals, 1 to 100 (default: 3).
    rounds : int
        FedAvg rounds (default: 5).
    local_epochs : int
        Local epochs per round (default: 3).
    batch_size, lr, weight_decay
        Local optimiser settings (Adam); ``lr`` None picks the model's default from
        :data:`DEFAULT_LR` (1e-2 for ``mlp``, 1e-3 otherwise).
    class_weight : {"none", "balanced"}
        Loss weighting for imbalanced data (default: ``none``).
    partition : {"iid", "dirichlet"}
        How the training split is divided among hospitals (default: ``iid``).
    alpha : float
        Dirichlet concentration; smaller is more skewed (default: 0.5).
    val_fraction : float
        Share of each hospital's data kept for local validation (default: 0.2).
    seed : int
        Seeds data partitioning, model initialisation and local training (default: 0).
    protection : {"plain", "he", "secagg"}
        How updates are protected from the server (default: ``he``). ``ckks`` is a
        deprecated alias of ``he`` (accepted with a ``FutureWarning``).
    he_preset : str or None
        HE parameter preset name (CKKS or BFV, see ``fedcrypt keys presets``); None
        uses the library default, ``packed`` (default: None).
    encrypt_layers : str
        Which tensors ``he`` encrypts: ``all``, ``last``, ``last:N`` or a regex
        (default: ``all``).
    width_mult : float
        MobileNetV2 width multiplier (default: 1.0).
    weights : Path or None
        A ``state_dict`` file to start from (default: None, random initialisation).
    task : str or None
        A task reference, ``FILE.py:NAME`` or ``package.module:NAME`` (see
        :func:`fedcrypt.task.load_task`); None uses the built-in task named by
        ``dataset``/``model`` (default: None).
    image_size : int or None
        Side in pixels images are resized to; None uses the model's native size
        (default: None).
    device : {"auto", "cpu", "cuda"}
        Where hospitals train: ``auto`` picks CUDA when available (default: ``auto``).
    min_hospitals : int or None
        Quorum ``K``: a round proceeds with the hospitals that answered within
        ``round_timeout``, provided at least ``K`` did; None means all of the round's
        hospitals (default: None).
    round_timeout : float
        Seconds the server waits for the hospitals' replies in each exchange
        (default: 3600).
    fraction : float
        Share of the hospitals invited to each round, chosen with the run seed; at least
        ``min_hospitals`` are invited (default: 1.0, all).
    drop : tuple of str
        Simulated dropouts ``ID@ROUND[:STAGE]`` (tests and demonstrations; default: none).
    dp_epsilon : float or None
        Sample-level differential privacy: DP-SGD (Opacus) at every hospital, with the
        noise calibrated so that each hospital spends at most ε on its patients over all
        rounds; None for no DP (default: None).
    dp_delta : float or None
        δ of the DP guarantee; None picks a power of ten below 1/(10 n) for hospital 0's
        ``n`` training examples (default: None).
    dp_max_grad_norm : float
        DP-SGD's per-example gradient clipping norm ``C`` (default: 1.0).
    run_id : str or None
        The run's identity, bound into every protected message with the round (a replayed
        aggregate of another run or round is refused); None: a fresh one per run (a
        resumed run keeps its own) (default: None).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = EMBEDDED_DATASET
    data_dir: Path | None = None
    model: str | None = None
    clients: int = Field(default=3, ge=1, le=100)
    rounds: int = Field(default=5, ge=1, le=1000)
    local_epochs: int = Field(default=3, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float | None = Field(default=None, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0)
    class_weight: Literal["none", "balanced"] = "none"
    partition: Partition = "iid"
    alpha: float = Field(default=0.5, gt=0)
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0)
    protection: Protection = "he"
    he_preset: str | None = None
    encrypt_layers: str = "all"
    width_mult: float = Field(default=1.0, gt=0, le=4)
    weights: Path | None = None
    task: str | None = Field(default=None, min_length=3, max_length=4096)
    image_size: int | None = Field(default=None, ge=8, le=4096)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    min_hospitals: int | None = Field(default=None, ge=1, le=100)
    round_timeout: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600)
    fraction: float = Field(default=1.0, gt=0, le=1)
    drop: tuple[str, ...] = ()
    dp_epsilon: float | None = Field(default=None, gt=0, le=1000)
    dp_delta: float | None = Field(default=None, gt=0, lt=1)
    dp_max_grad_norm: float = Field(default=1.0, gt=0, le=1000)
    run_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[ -~]+$")

    @field_validator("drop", mode="before")
    @classmethod
    def _drop(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        out = []
        for spec in value or ():
            spec = str(spec).strip()
            if not _DROP.match(spec):
                raise ValueError(f"{spec!r} is not ID@ROUND[:STAGE] (e.g. 2@1:masked_input)")
            out.append(spec)
        return tuple(out)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("dataset must not be empty")
        is_name = value.replace("_", "").replace("-", "").isalnum()
        return value.lower() if is_name else value

    @field_validator("protection", mode="before")
    @classmethod
    def _protection(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in DEPRECATED_PROTECTIONS:
            old = value.strip().lower()
            warnings.warn(
                f"--protection {old} is deprecated; use --protection {DEPRECATED_PROTECTIONS[old]}",
                FutureWarning,
                stacklevel=2,
            )
            return DEPRECATED_PROTECTIONS[old]
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.min_hospitals is not None and self.min_hospitals > self.clients:
            raise ValueError(
                f"--min-hospitals {self.min_hospitals} exceeds the {self.clients} hospitals"
            )
        return self

    @classmethod
    def build(cls, **values: Any) -> RunConfig:
        """Validate ``values`` into a config, raising :class:`ConfigError` with one line.

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            Naming the first invalid option and why.
        """
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            raise ConfigError(f"invalid {loc.replace('_', '-')}: {err['msg']}") from None

    def to_flower(self) -> dict[str, str | int | float | bool]:
        """Flatten into a Flower ``run_config`` (scalars only; None becomes "")."""
        out: dict[str, str | int | float | bool] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, tuple | list):
                value = ",".join(str(v) for v in value)
            out[key.replace("_", "-")] = (
                "" if value is None else (str(value) if isinstance(value, Path) else value)
            )
        return out

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flower`; unknown keys (e.g. key-file paths) are ignored."""
        fields = cls.model_fields
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name in fields:
                values[name] = None if value == "" else value
        return cls.build(**values)
