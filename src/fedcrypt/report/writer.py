"""Write a run directory: ``metrics.json``, ``roc.png``, ``rounds.png``, ``report.md``."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError
from fedcrypt.protection.registry import get_scheme
from fedcrypt.report.plots import plot_roc, plot_rounds
from fedcrypt.report.records import RunRecord

if TYPE_CHECKING:
    from fedcrypt.federation.app import Outcome


def _threat(protection: object) -> str:
    """The report's line on what the server saw, from the protection mode's descriptor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return get_scheme(str(protection)).threat
        except ConfigError:
            return ""


def _fmt(v: float, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown(record: RunRecord, *, roc_png: str | None, rounds_png: str) -> str:
    """A human summary of the run, with the plots."""
    cfg = record.config
    final = record.final
    lines = [
        f"# fedcrypt run report: {cfg.get('dataset')} / {cfg.get('model') or 'default model'} "
        f"/ {cfg.get('protection')}",
        "",
        f"- hospitals: {cfg.get('clients')}, rounds: {cfg.get('rounds')}, "
        f"local epochs: {cfg.get('local_epochs')}, partition: {cfg.get('partition')}, "
        f"seed: {cfg.get('seed')}",
        f"- model parameters: {record.info.get('parameters', '?'):,}"
        if isinstance(record.info.get("parameters"), int)
        else "- model parameters: ?",
        f"- protection: {_threat(cfg.get('protection'))}",
        f"- final test accuracy **{_fmt(final.get('accuracy', math.nan))}**, "
        f"ROC AUC **{_fmt(final.get('auc', math.nan))}**",
        f"- wall time {record.seconds:.1f} s",
        "",
        "## Rounds",
        "",
        "| round | test loss | accuracy | ROC AUC | val AUC | seconds | MB up/hospital "
        "| protect s | aggregate s | unprotect s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record.rounds:
        lines.append(
            f"| {r.round} | {_fmt(r.loss)} | {_fmt(r.accuracy)} | {_fmt(r.auc)} | "
            f"{_fmt(r.val_auc)} | {r.seconds:.2f} | {r.bytes_up_per_client / 1e6:.3f} | "
            f"{r.encrypt_seconds:.3f} | {r.aggregate_seconds:.3f} | {r.decrypt_seconds:.3f} |"
        )
    lines += ["", "## Plots", ""]
    if roc_png:
        lines.append(f"![ROC curve of the final global model]({roc_png})")
    lines.append(f"![per-round metrics and protection cost]({rounds_png})")
    lines.append("")
    return "\n".join(lines)


def write_run(run_dir: Path, config: RunConfig, outcome: Outcome, *, seconds: float) -> RunRecord:
    """Write the run directory and return the record.

    Parameters
    ----------
    run_dir : Path
        Created if needed.
    config : RunConfig
        The run's configuration (stored in ``metrics.json``).
    outcome : Outcome
        Rounds and ROC curve collected by the ServerApp.
    seconds : float
        Wall-clock seconds of the whole run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(
        config=config.model_dump(mode="json"),
        rounds=list(outcome.rounds),
        roc_fpr=list(outcome.roc.get("fpr", [])),
        roc_tpr=list(outcome.roc.get("tpr", [])),
        info=dict(outcome.info),
        seconds=seconds,
    )
    record.write(run_dir / "metrics.json")
    roc = plot_roc(record, run_dir / "roc.png")
    plot_rounds(record, run_dir / "rounds.png")
    (run_dir / "report.md").write_text(
        markdown(record, roc_png=roc.name if roc else None, rounds_png="rounds.png")
    )
    return record
