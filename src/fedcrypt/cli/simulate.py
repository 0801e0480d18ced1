"""``fedcrypt simulate``: run a whole federation on Flower's simulation engine."""

from __future__ import annotations

import math
import time
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcrypt.cli.options import cli_protection
from fedcrypt.config import RunConfig
from fedcrypt.report.records import RoundRecord

console = Console(highlight=False)

_COLUMNS = ("round", "loss", "acc", "AUC", "s", "MB up", "enc s", "agg s", "dec s")
_LEGEND = (
    "loss/acc/AUC: global model on the common test split; s: round seconds; "
    "MB up: protected bytes sent per hospital; enc/agg/dec s: hospital protect, "
    "server aggregate, hospital unprotect seconds."
)


def _row(r: RoundRecord) -> list[str]:
    def f(v: float, d: int = 4) -> str:
        return "—" if math.isnan(v) else f"{v:.{d}f}"

    return [
        str(r.round),
        f(r.loss),
        f(r.accuracy),
        f(r.auc),
        f"{r.seconds:.2f}",
        f"{r.bytes_up_per_client / 1e6:.3f}",
        f"{r.encrypt_seconds:.3f}",
        f"{r.aggregate_seconds:.3f}",
        f"{r.decrypt_seconds:.3f}",
    ]


def _table(config: RunConfig) -> Table:
    table = Table(
        title=f"{config.dataset} · {config.model or 'default model'} · "
        f"{config.protection} · {config.clients} hospitals",
        caption=_LEGEND,
    )
    for name in _COLUMNS:
        table.add_column(name, justify="right")
    return table


def _default_out(config: RunConfig) -> Path:
    name = Path(config.dataset).stem if config.dataset.endswith(".npz") else config.dataset
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{config.protection}"


def simulate(
    dataset: str = typer.Option(
        "wdbc",
        help="wdbc (embedded Wisconsin breast-cancer table), breastmnist, "
        "pneumoniamnist, or a path to a MedMNIST 2D .npz file.",
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Folder holding <dataset>.npz (e.g. ../shared/data)."
    ),
    model: str | None = typer.Option(
        None, help="mlp, cnn or mobilenetv2 [default: mlp for tables, cnn for images]."
    ),
    clients: int = typer.Option(3, help="Number of simulated hospitals."),
    rounds: int = typer.Option(5, help="FedAvg rounds."),
    local_epochs: int = typer.Option(3, "--local-epochs", help="Local epochs per round."),
    batch_size: int = typer.Option(32, "--batch-size", help="Local batch size."),
    lr: float | None = typer.Option(
        None, help="Adam learning rate [default: 1e-2 for mlp, 1e-3 for cnn/mobilenetv2]."
    ),
    class_weight: str = typer.Option(
        "none",
        "--class-weight",
        help="none, or balanced (weights the loss against class imbalance).",
    ),
    partition: str = typer.Option("iid", help="iid, or dirichlet (non-IID label skew)."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more skewed)."),
    seed: int = typer.Option(0, help="Seed for partitioning, initialisation and training."),
    protection: str = typer.Option(
        "he",
        help="he (homomorphic encryption), secagg (pairwise masking), or plain (baseline); "
        "ckks is a deprecated alias of he.",
    ),
    he_preset: str | None = typer.Option(
        None, "--he-preset", help="CKKS parameter preset (see 'fedcrypt keys presets')."
    ),
    encrypt_layers: str = typer.Option(
        "all", "--encrypt-layers", help="ckks only: all, last, last:N, or a regex of tensor names."
    ),
    keys: Path | None = typer.Option(
        None, "--keys", help="Folder from 'fedcrypt keys generate' (default: fresh keys per run)."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="A state_dict file to start from (e.g. pretrained MobileNetV2)."
    ),
    width_mult: float = typer.Option(1.0, "--width-mult", help="MobileNetV2 width multiplier."),
    out: Path | None = typer.Option(
        None, "--out", help="Run directory [default: runs/<time>-<dataset>-<protection>]."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Train one model across simulated hospitals with protected FedAvg.

    Runs Flower's simulation engine on this machine: each hospital trains on its own
    partition, protects its update (encrypts it, with ckks), the server aggregates without
    decrypting, and hospitals decrypt and evaluate the global model. Writes metrics.json,
    report.md, roc.png and rounds.png to the run directory.
    """
    protection = cli_protection(protection)
    config = RunConfig.build(
        dataset=dataset,
        data_dir=data_dir,
        model=model,
        clients=clients,
        rounds=rounds,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        class_weight=class_weight,
        partition=partition,
        alpha=alpha,
        seed=seed,
        protection=protection,
        he_preset=he_preset,
        encrypt_layers=encrypt_layers,
        weights=weights,
        width_mult=width_mult,
    )
    run_dir = out or _default_out(config)
    from fedcrypt.federation.simulation import check_run, run_simulation

    with console.status("checking data, model and keys"):
        check_run(config, keys_dir=keys)

    table = _table(config)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("starting Flower simulation engine", total=config.rounds)

    def on_round(r: RoundRecord) -> None:
        table.add_row(*_row(r))
        progress.update(
            task,
            advance=1,
            description=f"round {r.round + 1}" if r.round < config.rounds else "writing report",
        )

    with Live(Group(table, progress), console=console, refresh_per_second=4, transient=False):
        record = run_simulation(
            config, run_dir=run_dir, keys_dir=keys, on_round=on_round, verbose=verbose, check=False
        )
        progress.update(task, description="done")
    console.print()
    final = record.final
    console.print(
        f"final test accuracy [bold]{final['accuracy']:.4f}[/], ROC AUC [bold]{final['auc']:.4f}[/]"
        f" in {record.seconds:.1f} s"
    )
    console.print(
        f"run directory: [bold]{run_dir}[/] (metrics.json, report.md, roc.png, rounds.png)"
    )
