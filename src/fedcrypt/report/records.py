"""The run record: what ``metrics.json`` holds (configuration, one record per round, final)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    """Metrics of one FedAvg round, aggregated over hospitals (weighted by example count).

    Attributes
    ----------
    round : int
        1-based round number.
    loss, accuracy, auc : float
        Global model on the common test split (cross-entropy, fraction, ROC AUC).
    val_loss, val_accuracy, val_auc : float
        Global model on the hospitals' local validation splits.
    train_loss : float
        Mean local training loss.
    seconds : float
        Wall-clock seconds of the whole round.
    bytes_up_per_client, bytes_down_per_client : float
        Mean protected bytes a hospital sent / received this round.
    protect_seconds : float
        Mean seconds a hospital spent protecting its update.
    aggregate_seconds : float
        Seconds the server spent aggregating.
    unprotect_seconds : float
        Mean seconds a hospital spent unprotecting the aggregate.
    clients : int
        Hospitals whose updates entered the aggregate.
    contributors : list of int
        Their hospital ids.
    dropped : dict of str to str
        ``hospital id -> why`` for invited hospitals that did not contribute.
    evaluated : int
        Hospitals that evaluated the aggregate.
    clipped : int
        Values clipped by quantization, summed over contributors (packed HE presets).
    extra : dict
        Further metrics (clinical metrics, per-label AUC, privacy budget, ...), written
        at the top level of the round's JSON record.

    ``encrypt_seconds``/``decrypt_seconds`` are the old names of ``protect_seconds`` /
    ``unprotect_seconds``; ``metrics.json`` keeps them for one release.
    """

    round: int
    loss: float = math.nan
    accuracy: float = math.nan
    auc: float = math.nan
    val_loss: float = math.nan
    val_accuracy: float = math.nan
    val_auc: float = math.nan
    train_loss: float = math.nan
    seconds: float = 0.0
    bytes_up_per_client: float = 0.0
    bytes_down_per_client: float = 0.0
    protect_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    unprotect_seconds: float = 0.0
    clients: int = 0
    contributors: list[int] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    evaluated: int = 0
    clipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def encrypt_seconds(self) -> float:
        """Deprecated name of :attr:`protect_seconds`."""
        return self.protect_seconds

    @property
    def decrypt_seconds(self) -> float:
        """Deprecated name of :attr:`unprotect_seconds`."""
        return self.unprotect_seconds

    def to_json(self) -> dict[str, Any]:
        """The round's JSON record (``extra`` merged in; the deprecated names kept)."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["encrypt_seconds"] = self.protect_seconds
        out["decrypt_seconds"] = self.unprotect_seconds
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_json` (null becomes NaN; unknown keys go to ``extra``)."""
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        core: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("encrypt_seconds", "decrypt_seconds"):
                continue
            if key in names:
                core[key] = math.nan if value is None else value
            else:
                extra[key] = value
        core.setdefault("protect_seconds", data.get("encrypt_seconds") or 0.0)
        core.setdefault("unprotect_seconds", data.get("decrypt_seconds") or 0.0)
        return cls(**core, extra=extra)


@dataclass
class RunRecord:
    """A whole run: configuration, rounds, final metrics and the final test ROC curve."""

    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    roc_fpr: list[float] = field(default_factory=list)
    roc_tpr: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last round (test split), with its further metrics."""
        if not self.rounds:
            return {}
        last = self.rounds[-1]
        out: dict[str, Any] = {"loss": last.loss, "accuracy": last.accuracy, "auc": last.auc}
        out.update(last.extra)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes null)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(
            {
                "config": self.config,
                "info": self.info,
                "rounds": [r.to_json() for r in self.rounds],
                "final": self.final,
                "roc": {"fpr": self.roc_fpr, "tpr": self.roc_tpr},
                "seconds": self.seconds,
            }
        )

    def write(self, path: Path) -> Path:
        """Write ``metrics.json`` to ``path``."""
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return path
