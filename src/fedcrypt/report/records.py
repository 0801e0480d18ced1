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
    encrypt_seconds : float
        Mean seconds a hospital spent protecting its update (``protect``).
    aggregate_seconds : float
        Seconds the server spent aggregating.
    decrypt_seconds : float
        Mean seconds a hospital spent unprotecting the aggregate.
    clients : int
        Hospitals whose updates entered the aggregate.
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
    encrypt_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    decrypt_seconds: float = 0.0
    clients: int = 0


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
    def final(self) -> dict[str, float]:
        """Metrics of the last round (test split)."""
        if not self.rounds:
            return {}
        last = self.rounds[-1]
        return {"loss": last.loss, "accuracy": last.accuracy, "auc": last.auc}

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
                "rounds": [asdict(r) for r in self.rounds],
                "final": self.final,
                "roc": {"fpr": self.roc_fpr, "tpr": self.roc_tpr},
                "seconds": self.seconds,
            }
        )

    def write(self, path: Path) -> Path:
        """Write ``metrics.json`` to ``path``."""
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return path
