"""The public Python API: :func:`simulate` a federation of a :class:`~fedcrypt.Task`."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrypt.config import DEPRECATED_PROTECTIONS, RunConfig
from fedcrypt.report.records import RoundRecord, RunRecord
from fedcrypt.task import Task


@dataclass(frozen=True)
class RunResult:
    """What a simulated run produced.

    Attributes
    ----------
    run_dir : Path
        The run directory (``metrics.json``, ``report.md``, plots, ``model.pt``).
    metrics : dict
        The content of ``metrics.json``: ``config`` (what ran), ``rounds``, ``final``,
        ``roc``, ``info``, ``seconds``.
    record : RunRecord
        The same, as objects.
    """

    run_dir: Path
    metrics: dict[str, Any]
    record: RunRecord

    @property
    def final(self) -> dict[str, Any]:
        """The final round's test metrics (``loss``, ``accuracy``, ``auc``, ...)."""
        return dict(self.metrics.get("final", {}))


def default_run_dir(config: RunConfig, *, task_name: str | None = None) -> Path:
    """``runs/<time>-<dataset or task>-<protection>``."""
    name = task_name or (
        Path(config.dataset).stem
        if "/" in config.dataset or "." in config.dataset
        else config.dataset
    )
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{config.protection}"


def simulate(
    task: Task | str | None = None,
    *,
    out: str | Path | None = None,
    keys: str | Path | None = None,
    resume: str | Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    verbose: bool = False,
    drop: Sequence[str] = (),
    **options: Any,
) -> RunResult:
    """Simulate a federation on this machine with Flower's simulation engine.

    The keyword arguments mirror ``fedcrypt simulate`` (``clients``, ``rounds``,
    ``local_epochs``, ``batch_size``, ``lr``, ``protection``, ``he_preset``,
    ``encrypt_layers``, ``min_hospitals``, ``fraction``, ``seed``, ``dataset``, ``model``,
    ``data_dir``, ... : see :class:`~fedcrypt.config.RunConfig`).

    Parameters
    ----------
    task : Task, str or None
        The task: a :class:`~fedcrypt.Task`, a reference ``FILE.py:NAME`` /
        ``package.module:NAME``, or None for the built-in task named by ``dataset`` /
        ``model`` (default: the embedded WDBC table with an MLP).
    out : path, optional
        The run directory (default: ``runs/<time>-<name>-<protection>``).
    keys : path, optional
        A folder from ``fedcrypt keys generate`` (``he``); default: a fresh key pair,
        kept in ``<out>/keys``.
    resume : path, optional
        A run directory to continue up to ``rounds`` rounds from its checkpoint.
    on_round : callable, optional
        Called with each finished round's :class:`~fedcrypt.report.records.RoundRecord`.
    verbose : bool
        Keep Flower's and Ray's logs (default: False).
    drop : sequence of str
        Simulated dropouts ``ID@ROUND[:STAGE]``.
    **options
        Further :class:`~fedcrypt.config.RunConfig` fields.

    Returns
    -------
    RunResult

    Raises
    ------
    fedcrypt.exceptions.FedcryptError
        For a bad task, configuration, key material or data (before any round starts),
        or a failed round. ``protection="ckks"`` is accepted with a ``FutureWarning``.
    """
    from fedcrypt.federation.simulation import prepare_run, run_simulation

    protection = options.get("protection")
    if isinstance(protection, str) and protection.strip().lower() in DEPRECATED_PROTECTIONS:
        old = protection.strip().lower()
        warnings.warn(
            f"protection={old!r} is deprecated; use protection={DEPRECATED_PROTECTIONS[old]!r}",
            FutureWarning,
            stacklevel=2,
        )
        options["protection"] = DEPRECATED_PROTECTIONS[old]
    task_obj: Task | None = None
    if isinstance(task, Task):
        ref = task.reference()
        if ref is not None:
            options["task"] = ref
        else:
            task_obj = task
    elif isinstance(task, str):
        options["task"] = task
    elif task is not None:
        raise TypeError(f"task must be a fedcrypt.Task, a reference string or None, not {task!r}")
    config = RunConfig.build(drop=tuple(drop), **options)
    keys_dir = Path(keys) if keys is not None else None
    if resume is not None:
        run_dir = Path(resume)
        record = run_simulation(
            config,
            run_dir=run_dir,
            keys_dir=keys_dir,
            on_round=on_round,
            verbose=verbose,
            resume=True,
        )
    else:
        prepared = prepare_run(config, keys_dir=keys_dir, task=task_obj)
        run_dir = (
            Path(out)
            if out is not None
            else default_run_dir(
                prepared.config, task_name=prepared.task.name if prepared.config.task else None
            )
        )
        record = run_simulation(
            prepared.config,
            run_dir=run_dir,
            keys_dir=keys_dir,
            on_round=on_round,
            verbose=verbose,
            prepared=prepared,
            task=task_obj,
        )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return RunResult(run_dir=run_dir, metrics=metrics, record=record)
