"""Per-round metric plots (loss, accuracy, ROC AUC) rendered to PNG with matplotlib."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib import rc_context
from matplotlib.figure import Figure

METRICS: tuple[tuple[str, str], ...] = (
    ("loss", "Loss"),
    ("accuracy", "Accuracy"),
    ("auc", "ROC AUC"),
)


@dataclass(frozen=True)
class MetricPoint:
    """One hospital's metrics for one round."""

    round: int
    hospital: str
    loss: float
    accuracy: float
    auc: float | None
    num_examples: int


@dataclass(frozen=True)
class RoundSummary:
    """Example-weighted means of the reports for one round."""

    round: int
    reports: int
    num_examples: int
    loss: float
    accuracy: float
    auc: float | None


def summarize(points: Sequence[MetricPoint]) -> list[RoundSummary]:
    """Weight every hospital's metrics by its evaluation examples, per round."""
    by_round: dict[int, list[MetricPoint]] = defaultdict(list)
    for p in points:
        by_round[p.round].append(p)
    out: list[RoundSummary] = []
    for r in sorted(by_round):
        ps = by_round[r]
        n = sum(p.num_examples for p in ps)
        with_auc = [(p.auc, p.num_examples) for p in ps if p.auc is not None]
        n_auc = sum(n_i for _, n_i in with_auc)
        out.append(
            RoundSummary(
                round=r,
                reports=len(ps),
                num_examples=n,
                loss=sum(p.loss * p.num_examples for p in ps) / n,
                accuracy=sum(p.accuracy * p.num_examples for p in ps) / n,
                auc=(sum(a * n_i for a, n_i in with_auc) / n_auc if with_auc else None),
            )
        )
    return out


def plain_label(text: str) -> str:
    """A legend label shown verbatim.

    Matplotlib hides legend entries whose label starts with ``_``; such a name gets a
    leading space. (Mathtext is turned off while rendering, see :func:`metrics_png`.)
    """
    return " " + text if text.startswith("_") else text


def metrics_png(points: Sequence[MetricPoint], *, title: str) -> bytes:
    """Plot loss, accuracy and ROC AUC per round: each hospital and the weighted mean.

    Every text (hospital names, the federation's name) is drawn verbatim: mathtext is
    off (``text.parse_math``), so a name such as ``$\\x$`` cannot break the plot.

    Parameters
    ----------
    points : sequence of MetricPoint
        Every report of the federation.
    title : str
        The figure's title.

    Returns
    -------
    bytes
        A PNG image (about 1000x330 pixels).
    """
    with rc_context({"text.parse_math": False, "text.usetex": False}):
        return _render(points, title=title)


def _render(points: Sequence[MetricPoint], *, title: str) -> bytes:
    fig = Figure(figsize=(10, 3.3), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    summary = summarize(points)
    hospitals = sorted({p.hospital for p in points})
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        for h in hospitals:
            xs = [p.round for p in points if p.hospital == h and getattr(p, key) is not None]
            ys = [
                getattr(p, key) for p in points if p.hospital == h and getattr(p, key) is not None
            ]
            if xs:
                ax.plot(xs, ys, marker="o", linewidth=1, alpha=0.45, label=plain_label(h))
        sx = [s.round for s in summary if getattr(s, key) is not None]
        sy = [getattr(s, key) for s in summary if getattr(s, key) is not None]
        if sx:
            ax.plot(sx, sy, marker="s", linewidth=2.5, color="black", label="weighted mean")
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
        if sx:
            ax.set_xticks(sorted(set(sx)))
        if key != "loss":
            ax.set_ylim(-0.02, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize="small"
        )
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
