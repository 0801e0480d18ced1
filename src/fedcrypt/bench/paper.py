"""``fedcrypt bench paper``: the seed paper's experiments, reproduced beside its figures.

Lessage et al., "Secure federated learning applied to medical imaging with fully
homomorphic encryption" (figures in ``../shared/reference/README.md``). Every experiment
runs the same federation under plain FedAvg and under ``he`` and puts the published
figure and a centralised baseline (the same model and budget, trained on all hospitals'
training data at once) beside ours:

* **Table II**: batch size 16/32/64, 3 hospitals, 3 rounds: accuracy without and with HE.
* **ROC**: the test ROC curves without and with HE (batch 32).
* **Keys**: the paper's heavy and light keys (presets ``paper-heavy``, ``paper-light``),
  encrypting the last layer as the paper did.
* **Layers**: one vs four encrypted layers (``--encrypt-layers last`` vs ``last:4``).
* **Fig. 9's setting**: 20 hospitals: the HE seconds each round adds to plain FedAvg.
* On BreastMNIST, MedMNIST v2's ResNet-18 (28) figure (Yang et al. 2023, Table 3).

The paper trained a pretrained MobileNetV2 on private mammograms; we train on public
BreastMNIST (``--model mobilenetv2`` for the paper's architecture; the default ``cnn``
keeps the whole bench within tens of minutes on a laptop CPU).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: Table II of the paper: accuracy (%) by batch size, without and with HE.
PAPER_TABLE_II = {16: (70.6, 73.2), 32: (73.8, 87.4), 64: (83.4, 82.5)}
#: Fig. 9 (text): 20 participants, 15 rounds: HE adds 28 minutes to the run.
PAPER_FIG9_MINUTES = 28.0
PAPER_FIG9_ROUNDS = 15
#: The paper's ROC findings (text), by experiment.
PAPER_ROC = {
    "batch": "batch 64: micro-average ROC 7 % lower with HE; batch 32: 8 % higher with HE",
    "keys": "a lighter key at batch 32 is below the heavy key but above no-HE",
    "layers": "four encrypted layers instead of one, batch 16: ROC 71 % -> 67 % (11 epochs), "
    "79 % -> 81 % (50 epochs)",
}
#: MedMNIST v2, Table 3 (test split, centralised, 100 epochs): (AUC, ACC).
MEDMNIST_RESNET18_28 = {"breastmnist": (0.901, 0.863), "pneumoniamnist": (0.944, 0.854)}


@dataclass
class Options:
    """What ``bench paper`` runs.

    Attributes
    ----------
    dataset : str
        A built-in dataset (default: ``breastmnist``).
    data_dir : Path or None
        Folder holding its ``.npz``.
    model : str
        (default: ``cnn``; ``mobilenetv2`` is the paper's).
    hospitals : int
        Hospitals of Table II and the key/layer experiments (default: 3).
    rounds : int
        Rounds (default: 3, as Table II).
    local_epochs : int
        (default: 1).
    batch_sizes : tuple of int
        Table II's (default: 16, 32, 64).
    many_hospitals : int
        Fig. 9's consortium (default: 20).
    layer_specs : (str, str)
        The "one vs four encrypted layers" selections (default: ``last``, ``last:4``).
    seed : int
        (default: 0).
    """

    dataset: str = "breastmnist"
    data_dir: Path | None = None
    model: str = "cnn"
    hospitals: int = 3
    rounds: int = 3
    local_epochs: int = 1
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    many_hospitals: int = 20
    layer_specs: tuple[str, str] = ("last", "last:4")
    seed: int = 0

    @classmethod
    def for_quick(cls, *, data_dir: Path | None = None) -> Options:
        """A smoke run: the embedded table, an MLP, 1 round, batch 32, 4 hospitals for Fig. 9."""
        return cls(
            dataset="wdbc",
            data_dir=data_dir,
            model="mlp",
            rounds=1,
            batch_sizes=(32,),
            many_hospitals=4,
            layer_specs=("last", "last:2"),
        )


class _Runner:
    """Runs federations with :func:`fedcrypt.simulate` and keeps what the tables need."""

    def __init__(self, options: Options, tmp: Path, say: Callable[[str], None]) -> None:
        self.options = options
        self.tmp = tmp
        self.say = say
        self.count = 0

    def run(self, label: str, **overrides: Any) -> dict[str, Any]:
        from fedcrypt.api import simulate

        o = self.options
        self.count += 1
        self.say(f"run {self.count}: {label}")
        values: dict[str, Any] = {
            "dataset": o.dataset,
            "data_dir": o.data_dir,
            "model": o.model,
            "clients": o.hospitals,
            "rounds": o.rounds,
            "local_epochs": o.local_epochs,
            "seed": o.seed,
            **overrides,
        }
        started = time.perf_counter()
        result = simulate(None, out=self.tmp / f"run-{self.count}", **values)
        m = result.metrics
        rounds = m["rounds"]
        he_s = [
            float(r["protect_seconds"])
            + float(r["aggregate_seconds"])
            + float(r["unprotect_seconds"])
            for r in rounds
        ]
        return {
            "label": label,
            "protection": m["config"]["protection"],
            "he_preset": m["config"].get("he_preset"),
            "encrypt_layers": m["config"].get("encrypt_layers"),
            "batch_size": m["config"]["batch_size"],
            "hospitals": m["config"]["clients"],
            "accuracy": _num(m["final"].get("accuracy")),
            "auc": _num(m["final"].get("auc")),
            "roc": m.get("roc", {}),
            "round_seconds": [float(r["seconds"]) for r in rounds],
            "protection_seconds_per_round": statistics.mean(he_s) if he_s else 0.0,
            "bytes_up_per_client": float(rounds[-1]["bytes_up_per_client"]),
            "encrypted_fraction": m.get("info", {}).get("encrypted_fraction", 1.0),
            "wall_seconds": time.perf_counter() - started,
        }

    def centralised(self, *, batch_size: int) -> dict[str, Any]:
        """The same model and budget (rounds x local epochs), on all the training data."""
        from fedcrypt.config import RunConfig
        from fedcrypt.site import LocalSite, task_for

        o = self.options
        self.say(f"centralised baseline, batch {batch_size}")
        cfg = RunConfig.build(
            dataset=o.dataset,
            data_dir=o.data_dir,
            model=o.model,
            clients=1,
            local_epochs=o.local_epochs,
            batch_size=batch_size,
            seed=o.seed,
            protection="plain",
        )
        site = LocalSite(task_for(cfg), config=cfg, hospital=0, num_hospitals=1)
        weights = site.initial
        started = time.perf_counter()
        for rnd in range(1, o.rounds + 1):
            weights, _ = site.train_round(weights, server_round=rnd)
        metrics, _ = site.evaluate(weights)
        return {
            "batch_size": batch_size,
            "accuracy": _num(metrics.get("test-accuracy")),
            "auc": _num(metrics.get("test-auc")),
            "epochs": o.rounds * o.local_epochs,
            "seconds": time.perf_counter() - started,
        }


def _num(v: object) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def run_paper(
    out: Path, *, options: Options, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run every experiment; write ``paper.json`` and ``paper-*.png`` to ``out``.

    Returns
    -------
    dict
        ``options``; ``table_ii`` (rows per batch size: ours without/with HE, the paper's,
        the centralised baseline); ``roc`` (curves); ``keys``; ``layers``; ``fig9``
        (HE seconds per round with 20 hospitals, ours and the paper's); ``medmnist``
        (the ResNet-18 (28) figure of the dataset, if any); ``png``.
    """
    say = log or (lambda _msg: None)
    out.mkdir(parents=True, exist_ok=True)
    o = options
    with tempfile.TemporaryDirectory(prefix="fedcrypt-bench-paper-") as tmp:
        runner = _Runner(o, Path(tmp), say)
        table: list[dict[str, Any]] = []
        roc: dict[str, Any] = {}
        for bs in o.batch_sizes:
            plain = runner.run(f"Table II, batch {bs}, plain", batch_size=bs, protection="plain")
            he = runner.run(f"Table II, batch {bs}, he", batch_size=bs, protection="he")
            central = runner.centralised(batch_size=bs)
            paper = PAPER_TABLE_II.get(bs)
            table.append(
                {
                    "batch_size": bs,
                    "accuracy_plain": plain["accuracy"],
                    "accuracy_he": he["accuracy"],
                    "auc_plain": plain["auc"],
                    "auc_he": he["auc"],
                    "paper_accuracy_plain": paper[0] / 100 if paper else None,
                    "paper_accuracy_he": paper[1] / 100 if paper else None,
                    "centralised_accuracy": central["accuracy"],
                    "centralised_auc": central["auc"],
                    "he_bytes_up": he["bytes_up_per_client"],
                    "plain_bytes_up": plain["bytes_up_per_client"],
                }
            )
            if bs == 32 or not roc:
                roc = {
                    "batch_size": bs,
                    "plain": plain["roc"],
                    "he": he["roc"],
                    "auc_plain": plain["auc"],
                    "auc_he": he["auc"],
                }
        bs_keys = 32 if 32 in o.batch_sizes else o.batch_sizes[0]
        keys = [
            runner.run(
                f"key {preset}, last layer",
                batch_size=bs_keys,
                protection="he",
                he_preset=preset,
                encrypt_layers="last",
            )
            for preset in ("paper-heavy", "paper-light")
        ]
        bs_layers = 16 if 16 in o.batch_sizes else o.batch_sizes[0]
        layers = [
            runner.run(
                f"{spec} encrypted", batch_size=bs_layers, protection="he", encrypt_layers=spec
            )
            for spec in o.layer_specs
        ]
        many = {
            mode: runner.run(
                f"{o.many_hospitals} hospitals, {mode}",
                clients=o.many_hospitals,
                protection=mode,
                batch_size=bs_keys,
            )
            for mode in ("plain", "he")
        }
    plain_s = statistics.median(many["plain"]["round_seconds"])
    he_s = statistics.median(many["he"]["round_seconds"])
    fig9 = {
        "hospitals": o.many_hospitals,
        "he_protection_seconds_per_round": many["he"]["protection_seconds_per_round"],
        "round_seconds_plain": plain_s,
        "round_seconds_he": he_s,
        "he_seconds_added_per_round": he_s - plain_s,
        "paper_he_seconds_added_per_round": PAPER_FIG9_MINUTES * 60 / PAPER_FIG9_ROUNDS,
        "paper_setting": "20 participants, 10 epochs, 15 rounds, MobileNetV2, Mac M1",
    }
    ref = MEDMNIST_RESNET18_28.get(o.dataset)
    payload: dict[str, Any] = {
        "options": {
            **{k: v for k, v in asdict(o).items() if k != "data_dir"},
            "data_dir": str(o.data_dir) if o.data_dir else None,
        },
        "source": "Lessage et al. (seed paper); ../shared/reference/README.md",
        "table_ii": table,
        "roc": {**roc, "paper": PAPER_ROC["batch"]},
        "keys": {"runs": [_brief(r) for r in keys], "paper": PAPER_ROC["keys"]},
        "layers": {"runs": [_brief(r) for r in layers], "paper": PAPER_ROC["layers"]},
        "fig9": fig9,
        "medmnist": None
        if ref is None
        else {
            "model": "ResNet-18 (28)",
            "auc": ref[0],
            "accuracy": ref[1],
            "source": "Yang et al. 2023, MedMNIST v2, Table 3 (centralised, 100 epochs)",
        },
    }
    payload["png"] = _plots(payload, out)
    (out / "paper.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return payload


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "label",
        "he_preset",
        "encrypt_layers",
        "batch_size",
        "accuracy",
        "auc",
        "protection_seconds_per_round",
        "bytes_up_per_client",
        "encrypted_fraction",
    )
    return {k: r.get(k) for k in keys}


def _plots(payload: dict[str, Any], out: Path) -> list[str]:
    paths: list[str] = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ax = axes[0]
    rows = payload["table_ii"]
    xs = range(len(rows))
    w = 0.2
    ax.bar([x - 1.5 * w for x in xs], [r["accuracy_plain"] for r in rows], w, label="ours, plain")
    ax.bar([x - 0.5 * w for x in xs], [r["accuracy_he"] for r in rows], w, label="ours, he")
    ax.bar(
        [x + 0.5 * w for x in xs],
        [r["paper_accuracy_plain"] or 0 for r in rows],
        w,
        label="paper, without HE",
        alpha=0.6,
    )
    ax.bar(
        [x + 1.5 * w for x in xs],
        [r["paper_accuracy_he"] or 0 for r in rows],
        w,
        label="paper, with HE",
        alpha=0.6,
    )
    ax.plot(
        list(xs),
        [r["centralised_accuracy"] for r in rows],
        "k_",
        ms=30,
        mew=2,
        label="centralised, same budget",
    )
    ax.set_xticks(list(xs), [f"batch {r['batch_size']}" for r in rows])
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("test accuracy")
    ax.set_title("Table II: accuracy without and with HE", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax = axes[1]
    roc = payload["roc"]
    for mode, style in (("plain", "-"), ("he", "--")):
        curve = roc.get(mode) or {}
        if curve.get("fpr"):
            ax.plot(
                curve["fpr"], curve["tpr"], style, label=f"{mode} (AUC {roc[f'auc_{mode}']:.3f})"
            )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"test ROC, batch {roc.get('batch_size')}: without and with HE", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "paper-table2-roc.png"
    fig.savefig(path)
    plt.close(fig)
    paths.append(str(path))
    return paths


def render(payload: dict[str, Any], console: Any) -> None:
    """Print the tables of :func:`run_paper`'s result."""
    from rich.table import Table

    def f(v: object, pct: bool = True) -> str:
        if not isinstance(v, int | float) or math.isnan(float(v)):
            return "—"
        return f"{100 * float(v):.1f} %" if pct else f"{float(v):.3f}"

    t = Table(title="Table II: accuracy, 3 rounds (ours | paper | centralised, same budget)")
    for c in (
        "batch",
        "plain",
        "he",
        "paper without HE",
        "paper with HE",
        "centralised",
        "AUC plain",
        "AUC he",
    ):
        t.add_column(c, justify="right")
    for r in payload["table_ii"]:
        t.add_row(
            str(r["batch_size"]),
            f(r["accuracy_plain"]),
            f(r["accuracy_he"]),
            f(r["paper_accuracy_plain"]),
            f(r["paper_accuracy_he"]),
            f(r["centralised_accuracy"]),
            f(r["auc_plain"], False),
            f(r["auc_he"], False),
        )
    console.print(t)
    for key, title in (
        ("keys", "heavy vs light key (last layer encrypted)"),
        ("layers", "one vs four encrypted layers"),
    ):
        t = Table(title=f"{title}; paper: {payload[key]['paper']}")
        for c in ("run", "accuracy", "AUC", "HE s/round", "MB up", "encrypted"):
            t.add_column(c, justify="right")
        for r in payload[key]["runs"]:
            t.add_row(
                r["label"],
                f(r["accuracy"]),
                f(r["auc"], False),
                f"{r['protection_seconds_per_round']:.3f}",
                f"{r['bytes_up_per_client'] / 1e6:.3f}",
                f(r["encrypted_fraction"]),
            )
        console.print(t)
    g = payload["fig9"]
    console.print(
        f"Fig. 9 setting, {g['hospitals']} hospitals: HE adds "
        f"{g['he_seconds_added_per_round']:.2f} s per round (protect+aggregate+unprotect "
        f"{g['he_protection_seconds_per_round']:.2f} s; round {g['round_seconds_plain']:.2f} s "
        f"plain, {g['round_seconds_he']:.2f} s he); paper: "
        f"{g['paper_he_seconds_added_per_round']:.0f} s per round ({g['paper_setting']})"
    )
    if payload.get("medmnist"):
        m = payload["medmnist"]
        console.print(
            f"MedMNIST v2 {m['model']} on {payload['options']['dataset']}: AUC {m['auc']:.3f}, "
            f"accuracy {m['accuracy']:.3f} ({m['source']})"
        )
