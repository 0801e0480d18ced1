"""``fedcrypt bench rounds``: the round time of HE next to plain FedAvg, measured in one go.

For each setting (model, hospitals) it runs the same federation (same task, seed, rounds,
local epochs) under ``plain`` and under ``he``, alternating the two ``repeats`` times so
that a busy machine slows both alike, and reports the median round seconds of each and
their ratio. Round 1 is left out of the medians: it includes the workers' start (data
loading, model construction, key loading) that a long run pays once. The goals (issue #9)
are HE/plain ≤ 1.10 for MobileNetV2 with 3 hospitals and 1 local epoch, and ≤ 1.25 for the
CNN with 20 hospitals.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: The goals (ratio of the median round seconds, HE over plain) by setting.
GOALS = {("mobilenetv2", 3): 1.10, ("cnn", 20): 1.25}
MODES = ("plain", "he")


@dataclass
class Setting:
    """One federation to time: a model and a number of hospitals."""

    model: str
    hospitals: int


@dataclass
class Options:
    """What ``bench rounds`` runs.

    Attributes
    ----------
    settings : list of Setting
        (default: MobileNetV2 with 3 hospitals, the CNN with 20).
    dataset : str
        A built-in dataset (default: ``breastmnist``).
    data_dir : Path or None
        Folder holding its ``.npz``.
    rounds : int
        Rounds per run (default: 3; round 1 is left out of the medians).
    local_epochs : int
        (default: 1).
    repeats : int
        Runs per mode, alternating plain and he (default: 2).
    he_preset : str or None
        HE preset (default: the library default).
    seed : int
        (default: 0).
    """

    settings: list[Setting] = field(
        default_factory=lambda: [Setting("mobilenetv2", 3), Setting("cnn", 20)]
    )
    dataset: str = "breastmnist"
    data_dir: Path | None = None
    rounds: int = 3
    local_epochs: int = 1
    repeats: int = 2
    he_preset: str | None = None
    seed: int = 0

    @classmethod
    def for_quick(cls, *, data_dir: Path | None = None) -> Options:
        """A smoke run: the embedded table, an MLP, 3 hospitals, 2 rounds, one repeat."""
        return cls(
            settings=[Setting("mlp", 3)], dataset="wdbc", data_dir=data_dir, rounds=2, repeats=1
        )


def _round_seconds(run_dir: Path) -> tuple[list[float], dict[str, float]]:
    data = json.loads((run_dir / "metrics.json").read_text())
    rounds = data["rounds"]
    seconds = [float(r["seconds"]) for r in rounds]
    costs = {
        "protect_seconds": statistics.median(float(r["protect_seconds"]) for r in rounds),
        "aggregate_seconds": statistics.median(float(r["aggregate_seconds"]) for r in rounds),
        "unprotect_seconds": statistics.median(float(r["unprotect_seconds"]) for r in rounds),
        "bytes_up_per_client": float(rounds[-1]["bytes_up_per_client"]),
        "bytes_down_per_client": float(rounds[-1]["bytes_down_per_client"]),
        "parameters": float(data.get("info", {}).get("parameters") or 0),
        "auc": float(data["final"]["auc"] or float("nan")),
    }
    return seconds, costs


def run_rounds(
    out: Path, *, options: Options, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run every setting under plain and he; write ``rounds.json`` and ``rounds.png``.

    Returns
    -------
    dict
        ``options`` and one row per setting: median round seconds per mode (rounds 2..R
        of every repeat), their ratio, the goal, and the protection costs of ``he``.
    """
    from fedcrypt.api import simulate

    say = log or (lambda _msg: None)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedcrypt-bench-rounds-") as tmp:
        for setting in options.settings:
            samples: dict[str, list[float]] = {m: [] for m in MODES}
            costs: dict[str, dict[str, float]] = {}
            for rep in range(options.repeats):
                for mode in MODES:
                    say(f"{setting.model}, {setting.hospitals} hospitals: {mode} run {rep + 1}")
                    run_dir = Path(tmp) / f"{setting.model}-{setting.hospitals}-{mode}-{rep}"
                    extra: dict[str, Any] = {"he_preset": options.he_preset} if mode == "he" else {}
                    started = time.perf_counter()
                    simulate(
                        None,
                        out=run_dir,
                        dataset=options.dataset,
                        data_dir=options.data_dir,
                        model=setting.model,
                        clients=setting.hospitals,
                        rounds=options.rounds,
                        local_epochs=options.local_epochs,
                        seed=options.seed,
                        protection=mode,
                        **extra,
                    )
                    seconds, cost = _round_seconds(run_dir)
                    samples[mode].extend(seconds[1:] if len(seconds) > 1 else seconds)
                    costs[mode] = {**cost, "wall_seconds": time.perf_counter() - started}
            med = {m: statistics.median(v) for m, v in samples.items()}
            ratio = med["he"] / med["plain"] if med["plain"] > 0 else float("nan")
            goal = GOALS.get((setting.model, setting.hospitals))
            rows.append(
                {
                    "model": setting.model,
                    "hospitals": setting.hospitals,
                    "plain_round_seconds": med["plain"],
                    "he_round_seconds": med["he"],
                    "ratio": ratio,
                    "goal": goal,
                    "meets_goal": None if goal is None else ratio <= goal,
                    "samples": samples,
                    "he": costs["he"],
                    "plain": costs["plain"],
                }
            )
    payload = {
        "options": {
            **{k: v for k, v in asdict(options).items() if k != "data_dir"},
            "data_dir": str(options.data_dir) if options.data_dir else None,
        },
        "rows": rows,
        "png": str(out / "rounds.png"),
    }
    (out / "rounds.json").write_text(json.dumps(payload, indent=2) + "\n")
    _plot(rows, out / "rounds.png")
    return payload


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(4.0, 2.6 * len(rows)), 3.6), dpi=110)
    labels = [f"{r['model']}\n{r['hospitals']} hospitals" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.18 for x in xs], [r["plain_round_seconds"] for r in rows], 0.36, label="plain")
    ax.bar([x + 0.18 for x in xs], [r["he_round_seconds"] for r in rows], 0.36, label="he")
    for x, r in zip(xs, rows, strict=True):
        goal = f" (goal ≤ {r['goal']:.2f})" if r["goal"] else ""
        ax.annotate(
            f"×{r['ratio']:.2f}{goal}",
            (x, max(r["plain_round_seconds"], r["he_round_seconds"])),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("median round seconds")
    ax.set_title("round time, HE vs plain (same federation)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(payload: dict[str, Any], console: Any) -> None:
    """Print the table of :func:`run_rounds`'s result."""
    from rich.table import Table

    table = Table(title="round time: he vs plain (median seconds of rounds 2..R)")
    for col in ("model", "hospitals", "plain s", "he s", "he/plain", "goal", "protect s",
                "aggregate s", "unprotect s", "MB up he", "MB up plain"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in payload["rows"]:
        goal = "—" if r["goal"] is None else f"≤ {r['goal']:.2f}"
        mark = "" if r["meets_goal"] is None else (" ✓" if r["meets_goal"] else " ✗")
        table.add_row(
            r["model"],
            str(r["hospitals"]),
            f"{r['plain_round_seconds']:.2f}",
            f"{r['he_round_seconds']:.2f}",
            f"{r['ratio']:.3f}{mark}",
            goal,
            f"{r['he']['protect_seconds']:.3f}",
            f"{r['he']['aggregate_seconds']:.3f}",
            f"{r['he']['unprotect_seconds']:.3f}",
            f"{r['he']['bytes_up_per_client'] / 1e6:.3f}",
            f"{r['plain']['bytes_up_per_client'] / 1e6:.3f}",
        )
    console.print(table)
