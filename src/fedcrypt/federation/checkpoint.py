"""Checkpoint and resume: the server's state after each round, written atomically.

``<run_dir>/checkpoint/`` holds ``aggregate-<round>.bin`` (the protected aggregates a
restarted hospital needs: the last one, or every one for delta schemes; what the server
already holds, no secret) and ``state.json`` (the round, the resolved run
configuration, the history of round records, the run's info). Each file is written to a
temporary name and renamed, so a run stopped at any moment leaves the previous complete
checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError
from fedcrypt.report.records import RoundRecord

FOLDER = "checkpoint"
FORMAT = 1


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Checkpoint:
    """A run's state after round ``round``.

    Attributes
    ----------
    round : int
        The last finished round.
    config : RunConfig
        The resolved configuration the run ran with.
    aggregates : dict of int to bytes
        The protected aggregates kept (``round -> bytes``).
    history : list of RoundRecord
        Every finished round.
    info : dict
        The run's info (model size, scheme, ...).
    """

    round: int
    config: RunConfig
    aggregates: dict[int, bytes]
    history: list[RoundRecord]
    info: dict[str, Any]


def write_checkpoint(
    run_dir: Path,
    *,
    config: RunConfig,
    server_round: int,
    aggregates: dict[int, bytes],
    history: Sequence[RoundRecord],
    info: dict[str, Any],
) -> None:
    """Write the checkpoint of round ``server_round`` into ``run_dir/checkpoint``."""
    folder = Path(run_dir) / FOLDER
    for rnd, blob in aggregates.items():
        _atomic_write(folder / f"aggregate-{int(rnd)}.bin", blob)
    state = {
        "format": FORMAT,
        "round": int(server_round),
        "aggregates": sorted(int(r) for r in aggregates),
        "config": config.model_dump(mode="json"),
        "history": [r.to_json() for r in history],
        "info": info,
    }
    _atomic_write(folder / "state.json", (json.dumps(state, indent=1, default=str) + "\n").encode())
    for old in folder.glob("aggregate-*.bin"):
        if old.stem.removeprefix("aggregate-") not in {str(r) for r in aggregates}:
            old.unlink(missing_ok=True)


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the checkpoint of a run directory.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If there is no checkpoint, or it is malformed.
    """
    folder = Path(run_dir) / FOLDER
    try:
        state = json.loads((folder / "state.json").read_text())
        aggregates = {
            int(r): (folder / f"aggregate-{int(r)}.bin").read_bytes() for r in state["aggregates"]
        }
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no checkpoint to resume (no {FOLDER}/)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the checkpoint in {run_dir}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{run_dir}: unsupported checkpoint format")
    try:
        config = RunConfig.build(**state["config"])
        history = [RoundRecord.from_json(r) for r in state["history"]]
        rnd = int(state["round"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{run_dir}: malformed checkpoint ({exc})") from None
    if rnd != len(history) or rnd < 1:
        raise ConfigError(f"{run_dir}: checkpoint round {rnd} does not match its history")
    return Checkpoint(rnd, config, aggregates, history, dict(state.get("info") or {}))
