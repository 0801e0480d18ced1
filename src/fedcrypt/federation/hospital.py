"""What one hospital does in a round: unprotect the global model, train, protect, evaluate.

This is the plaintext side of the federation: it runs inside a hospital (a Flower
ClientApp) and is the only place where a secret key and unprotected weights meet.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from fedcrypt.config import DEFAULT_LR, DEFAULT_MODEL, RunConfig
from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection.base import HospitalProtection
from fedcrypt.protection.flatten import Layout, flatten, unflatten
from fedcrypt.protection.plain import PlainHospital
from fedcrypt.protection.registry import hospital_protection
from fedcrypt.tasks.data.datasets import Dataset, load_dataset
from fedcrypt.tasks.data.hospital import HospitalData, hospital_data
from fedcrypt.tasks.models import create_model
from fedcrypt.training import evaluate, train
from fedcrypt.training.metrics import roc_curve_points

log = logging.getLogger(__name__)

#: ``kind`` of the global payload sent with a message.
INITIAL = "initial"
AGGREGATE = "aggregate"


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str, seed: int) -> Dataset:
    return load_dataset(name, data_dir=Path(data_dir) if data_dir else None, seed=seed)


def model_name(config: RunConfig, dataset: Dataset) -> str:
    """The configured model, or the default for the dataset's kind."""
    return config.model or DEFAULT_MODEL[dataset.kind]


def build_model(config: RunConfig, dataset: Dataset) -> torch.nn.Module:
    """Create the run's model, seeded so every party builds identical initial weights."""
    torch.manual_seed(config.seed)
    return create_model(
        model_name(config, dataset),
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        width_mult=config.width_mult,
        weights=config.weights,
    )


def initial_payload(config: RunConfig) -> tuple[bytes, Layout]:
    """The round-1 global model as a ``plain`` message (public: random or given weights)."""
    dataset = _dataset(config.dataset, str(config.data_dir or ""), config.seed)
    model = build_model(config, dataset)
    state = model.state_dict()
    return PlainHospital().protect(flatten(state), num_examples=1), Layout.of(state)


@dataclass
class Hospital:
    """One hospital's runtime: its data, model and half of the protection scheme.

    Parameters
    ----------
    config : RunConfig
        The run configuration (identical at every party).
    client_id : int
        This hospital's partition index, ``0 <= client_id < num_clients``.
    num_clients : int
        Number of hospitals the training split is divided among.
    key_file : Path, optional
        This hospital's secret key file (``ckks``).
    output_dir : Path, optional
        Where this hospital writes the final decrypted model (``model.pt``).
    """

    config: RunConfig
    client_id: int
    num_clients: int
    key_file: Path | None = None
    output_dir: Path | None = None
    dataset: Dataset = field(init=False)
    data: HospitalData = field(init=False)
    model: torch.nn.Module = field(init=False)
    layout: Layout = field(init=False)
    protection: HospitalProtection = field(init=False)
    _cache: tuple[str, NDArray[np.float64]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not 0 <= self.client_id < self.num_clients:
            raise ProtocolError(
                f"partition-id {self.client_id} is outside 0..{self.num_clients - 1}"
            )
        cfg = self.config
        self.dataset = _dataset(cfg.dataset, str(cfg.data_dir or ""), cfg.seed)
        self.data = hospital_data(
            self.dataset,
            client_id=self.client_id,
            num_clients=self.num_clients,
            partition=cfg.partition,
            alpha=cfg.alpha,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            batch_size=cfg.batch_size,
        )
        self.model = build_model(cfg, self.dataset)
        self.layout = Layout.of(self.model.state_dict())
        self.protection = hospital_protection(
            cfg.protection,
            key_file=self.key_file,
            encrypt_layers=cfg.encrypt_layers,
            layout=self.layout,
        )

    # -- global model -------------------------------------------------------------
    def unprotect_global(self, payload: bytes, kind: str) -> tuple[NDArray[np.float64], float]:
        """Unprotect a global payload into the flat weight vector (one-entry cache).

        Returns
        -------
        vector : numpy.ndarray
            Shape ``(P,)``, float64.
        seconds : float
            Seconds spent unprotecting (0 when served from the cache).

        Raises
        ------
        fedcrypt.exceptions.ProtocolError, fedcrypt.exceptions.DecryptionError
            If the payload is malformed or cannot be decrypted.
        """
        digest = hashlib.sha256(payload).hexdigest()
        if self._cache is not None and self._cache[0] == digest:
            return self._cache[1], 0.0
        t0 = time.perf_counter()
        if kind == INITIAL:
            vector = PlainHospital().unprotect(payload).mean
        elif kind == AGGREGATE:
            vector = self.protection.unprotect(payload).mean
        else:
            raise ProtocolError(f"unknown global payload kind {kind!r}")
        seconds = time.perf_counter() - t0
        self._cache = (digest, vector)
        return vector, seconds

    def load_weights(self, vector: NDArray[np.floating]) -> None:
        """Load a flat weight vector of shape ``(P,)`` into the model.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If the vector does not have this model's ``P`` values.
        """
        if vector.shape != (self.layout.size,):
            raise ProtocolError(
                f"global model has {vector.size} values, this hospital's model has "
                f"{self.layout.size}: the parties disagree on the model"
            )
        self.model.load_state_dict(unflatten(vector, self.layout))

    # -- one round, on plain weights --------------------------------------------------
    def train_from(self, vector: NDArray[np.floating], *, server_round: int) -> dict[str, float]:
        """Load ``vector`` (shape ``(P,)``) and train on local data; the model keeps the result.

        The training seed depends only on the run seed, the round and the hospital, so
        every protection scheme trains identically from identical weights.

        Returns
        -------
        dict
            ``num-examples``, ``train-loss`` and ``train-seconds`` (seconds).
        """
        self.load_weights(vector)
        cfg = self.config
        result = train(
            self.model,
            self.data.train,
            epochs=cfg.local_epochs,
            lr=cfg.lr or DEFAULT_LR.get(model_name(cfg, self.dataset), 1e-3),
            weight_decay=cfg.weight_decay,
            class_weight=cfg.class_weight,
            seed=cfg.seed * 100_003 + server_round * 1_009 + self.client_id,
        )
        return {
            "num-examples": float(self.data.num_train),
            "train-loss": result.loss,
            "train-seconds": result.seconds,
        }

    def evaluate_weights(
        self, vector: NDArray[np.floating], *, final: bool = False
    ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Load ``vector`` (shape ``(P,)``) and evaluate it on validation and common test data.

        On the final round the test ROC curve is returned and, with an ``output_dir``,
        the model is saved there as ``model.pt``.

        Returns
        -------
        metrics : dict
            ``val-*`` and ``test-*`` loss/accuracy/auc with their example counts.
        curves : dict
            On the final round, ``roc-fpr``/``roc-tpr`` of the test split; else empty.
        """
        self.load_weights(vector)
        metrics: dict[str, float] = {}
        curves: dict[str, list[float]] = {}
        for split, loader in (("val", self.data.val), ("test", self.data.test)):
            if len(loader.dataset) == 0:  # type: ignore[arg-type]
                continue
            res = evaluate(self.model, loader)
            metrics.update(
                {
                    f"{split}-loss": res.loss,
                    f"{split}-accuracy": res.accuracy,
                    f"{split}-auc": res.auc,
                    f"{split}-examples": float(res.num_examples),
                }
            )
            if final and split == "test":
                fpr, tpr = roc_curve_points(res.y_true, res.y_score)
                curves = {"roc-fpr": fpr.tolist(), "roc-tpr": tpr.tolist()}
        if final and self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.model.state_dict(), self.output_dir / "model.pt")
        return metrics, curves

    # -- one round, on protected payloads ----------------------------------------------
    def fit(
        self, payload: bytes, kind: str, *, server_round: int
    ) -> tuple[bytes, dict[str, float]]:
        """Train on local data from the global payload and protect the resulting weights.

        Returns
        -------
        update : bytes
            The protected, example-weighted update.
        metrics : dict
            ``num-examples``, ``train-loss``, ``train-seconds``, ``protect-seconds``,
            ``unprotect-seconds`` (seconds) and ``bytes-up`` (bytes).
        """
        vector, unprotect_s = self.unprotect_global(payload, kind)
        metrics = self.train_from(vector, server_round=server_round)
        t0 = time.perf_counter()
        update = self.protection.protect(
            flatten(self.model.state_dict()), num_examples=self.data.num_train
        )
        metrics.update(
            {
                "protect-seconds": time.perf_counter() - t0,
                "unprotect-seconds": unprotect_s,
                "bytes-up": float(len(update)),
            }
        )
        return update, metrics

    def assess(
        self, payload: bytes, *, final: bool = False
    ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Unprotect the aggregate and evaluate it (see :meth:`evaluate_weights`).

        The metrics also hold ``unprotect-seconds``.
        """
        vector, unprotect_s = self.unprotect_global(payload, AGGREGATE)
        metrics, curves = self.evaluate_weights(vector, final=final)
        metrics["unprotect-seconds"] = unprotect_s
        return metrics, curves
