"""Plots of a run: the final test ROC curve and per-round metrics and costs (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedcrypt.report.records import RunRecord


def plot_roc(record: RunRecord, path: Path) -> Path | None:
    """Write the final round's test ROC curve; None when no curve was reported."""
    if not record.roc_fpr:
        return None
    auc = record.final.get("auc", float("nan"))
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot(record.roc_fpr, record.roc_tpr, lw=2, label=f"global model (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    kind = record.info.get("label_kind")
    positive = record.info.get("positive_class")
    if kind == "binary" and positive:
        what = f"positive class: {positive}"
    elif kind in ("multiclass", "multilabel"):
        what = "micro-average over " + (
            "classes (one-vs-rest)" if kind == "multiclass" else "labels"
        )
    else:
        what = "test split"
    ax.set_title(f"ROC, round {len(record.rounds)}\n{what}", fontsize=10, parse_math=False)
    ax.legend(loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_rounds(record: RunRecord, path: Path) -> Path:
    """Write per-round test loss/accuracy/AUC and protection costs in one figure."""
    rounds = [r.round for r in record.rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    ax = axes[0]
    ax.plot(rounds, [r.accuracy for r in record.rounds], "o-", label="accuracy")
    ax.plot(rounds, [r.auc for r in record.rounds], "s-", label="ROC AUC")
    ax.plot(rounds, [r.val_auc for r in record.rounds], "^:", label="ROC AUC (validation)")
    ax.set_ylim(0, 1.02)
    ax.set_title("global model, test split")
    ax.set_xlabel("round")
    ax.legend(loc="lower right")
    ax = axes[1]
    ax.plot(rounds, [r.loss for r in record.rounds], "o-", label="test loss")
    ax.plot(rounds, [r.train_loss for r in record.rounds], "s--", label="local training loss")
    ax.set_title("cross-entropy loss")
    ax.set_xlabel("round")
    ax.legend()
    ax = axes[2]
    width = 0.2
    xs = range(len(rounds))
    ax.bar(
        [x - 1.5 * width for x in xs],
        [r.protect_seconds for r in record.rounds],
        width,
        label="protect (hospital)",
    )
    ax.bar(
        [x - 0.5 * width for x in xs],
        [r.aggregate_seconds for r in record.rounds],
        width,
        label="aggregate (server)",
    )
    ax.bar(
        [x + 0.5 * width for x in xs],
        [r.unprotect_seconds for r in record.rounds],
        width,
        label="unprotect (hospital)",
    )
    ax.set_xticks(list(xs), [str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    mb = record.rounds[-1].bytes_up_per_client / 1e6 if record.rounds else 0.0
    ax.set_title(f"protection cost, {mb:.2f} MB up/hospital/round", fontsize=10)
    ax.legend(fontsize=8)
    scheme = record.config.get("protection", "?")
    fig.suptitle(f"fedcrypt run: {record.config.get('dataset')} / {scheme}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
