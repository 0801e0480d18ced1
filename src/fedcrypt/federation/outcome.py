"""What a ServerApp hands back to whoever started it (the CLI, the Python API, a test)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedcrypt.config import RunConfig
from fedcrypt.report.records import RoundRecord, RunRecord


@dataclass
class Outcome:
    """The server's results, filled while the run goes on.

    Flower's simulation runtime only logs an exception from the ServerApp, so the error
    that aborted a run is stored here for the caller to raise.

    Attributes
    ----------
    rounds : list of RoundRecord
        One per finished round (resumed rounds included).
    roc : dict
        ``fpr``/``tpr`` of the final round's test ROC curve.
    info : dict
        What the server learnt about the run (model size, scheme, ...).
    error : BaseException or None
        The error that aborted the run, if any.
    on_round : callable, optional
        Called after every round (progress display).
    done : threading.Event
        Set when the ServerApp returns.
    """

    rounds: list[RoundRecord] = field(default_factory=list)
    roc: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    on_round: Callable[[RoundRecord], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def add(self, record: RoundRecord) -> None:
        """Record a finished round and notify the observer."""
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)

    def to_record(self, config: RunConfig, *, seconds: float) -> RunRecord:
        """The run record of ``config`` (the resolved configuration) and these results."""
        return RunRecord(
            config=config.model_dump(mode="json"),
            rounds=list(self.rounds),
            roc_fpr=list(self.roc.get("fpr", [])),
            roc_tpr=list(self.roc.get("tpr", [])),
            info=dict(self.info),
            seconds=seconds,
        )
