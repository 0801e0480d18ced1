"""Write a run directory: ``metrics.json``, ``roc.png``, ``rounds.png``, ``report.md``."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from fedcrypt.exceptions import ConfigError
from fedcrypt.protection.registry import get_scheme
from fedcrypt.report.plots import plot_roc, plot_rounds
from fedcrypt.report.records import RunRecord


def _threat(protection: object) -> str:
    """The report's line on what the server saw, from the protection mode's descriptor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return get_scheme(str(protection)).threat
        except ConfigError:
            return ""


def _protection_line(record: RunRecord) -> str:
    """What the server saw; with layer selection, which tensors it saw in plaintext."""
    cfg, info = record.config, record.info
    preset = f" (preset {cfg['he_preset']})" if cfg.get("he_preset") else ""
    clear = info.get("plaintext_tensors")
    if clear:
        frac = float(info.get("encrypted_fraction", 0.0))
        shown = ", ".join(f"`{t}`" for t in clear[:12])
        more = f" and {len(clear) - 12} more" if len(clear) > 12 else ""
        return (
            f"{cfg.get('protection')}{preset} with --encrypt-layers "
            f"{cfg.get('encrypt_layers')}: the server saw **{1 - frac:.1%} of the model's "
            f"values in plaintext** in every update and aggregate ({len(clear)} tensors: "
            f"{shown}{more}); the other {frac:.1%} were encrypted."
        )
    return f"{cfg.get('protection')}{preset}: {_threat(cfg.get('protection'))}"


def _clinical_lines(record: RunRecord) -> list[str]:
    """The labels, which AUC average is reported, and the clinical figures."""
    info, final = record.info, record.final
    kind = info.get("label_kind")
    lines = []
    if kind == "binary" and info.get("positive_class"):
        lines.append(f"- positive class: **{info['positive_class']}** (ROC AUC of that class)")
    elif kind == "multiclass":
        lines.append("- ROC AUC: one-vs-rest, macro-averaged over the classes")
    elif kind == "multilabel":
        per = final.get("auc_per_label") or []
        names = info.get("class_names") or [f"label {i}" for i in range(len(per))]
        shown = ", ".join(
            f"{n} {v:.3f}" if isinstance(v, float) else f"{n} —"
            for n, v in zip(names, per, strict=False)
        )
        lines.append(f"- ROC AUC: macro average over {len(per)} labels; per label: {shown}")
    figures = []
    for key, name in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                      ("balanced_accuracy", "balanced accuracy")):  # fmt: skip
        if isinstance(final.get(key), float):
            at = f"{final[key]:.4f}"
            if isinstance(final.get(f"{key}_youden"), float):
                at += f" ({final[f'{key}_youden']:.4f} at the Youden threshold)"
            figures.append(f"{name} {at}")
    if figures:
        lines.append("- at threshold 0.5 (pooled over hospitals): " + ", ".join(figures))
    return lines


def _dp_lines(record: RunRecord) -> list[str]:
    """The differential-privacy guarantee, in words, when the run used DP."""
    cfg, final = record.config, record.final
    if cfg.get("dp_epsilon") is None:
        return []
    eps, delta = final.get("epsilon"), final.get("delta")
    spent = f"{eps:.3g}" if isinstance(eps, float) else "?"
    return [
        f"- differential privacy: DP-SGD (Opacus) at every hospital, clipping norm "
        f"{cfg.get('dp_max_grad_norm')}; each hospital spent at most **ε = {spent}** "
        f"(target {cfg.get('dp_epsilon')}) at **δ = {delta if delta is not None else '?'}** on "
        "its patients over the whole run (an upper bound: as if it trained in every round)"
    ]


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
        f"- protection: {_protection_line(record)}",
        f"- final test accuracy **{_fmt(final.get('accuracy', math.nan))}**, "
        f"ROC AUC **{_fmt(final.get('auc', math.nan))}**",
        *_clinical_lines(record),
        *_dp_lines(record),
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
            f"{r.protect_seconds:.3f} | {r.aggregate_seconds:.3f} | {r.unprotect_seconds:.3f} |"
        )
    lines += ["", "## Plots", ""]
    if roc_png:
        lines.append(f"![ROC curve of the final global model]({roc_png})")
    lines.append(f"![per-round metrics and protection cost]({rounds_png})")
    lines.append("")
    return "\n".join(lines)


def write_run(run_dir: Path, record: RunRecord) -> RunRecord:
    """Write the run directory (``metrics.json``, ``roc.png``, ``rounds.png``, ``report.md``).

    Parameters
    ----------
    run_dir : Path
        Created if needed.
    record : RunRecord
        The run: its resolved configuration, rounds, final ROC curve and info.

    Returns
    -------
    RunRecord
        ``record``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write(run_dir / "metrics.json")
    roc = plot_roc(record, run_dir / "roc.png")
    plot_rounds(record, run_dir / "rounds.png")
    (run_dir / "report.md").write_text(
        markdown(record, roc_png=roc.name if roc else None, rounds_png="rounds.png")
    )
    return record
