"""``fedcrypt simulate``: run a whole federation on Flower's simulation engine."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcrypt.api import default_run_dir
from fedcrypt.cli.options import cli_protection, warn
from fedcrypt.config import RunConfig
from fedcrypt.report.records import RoundRecord

console = Console(highlight=False)

_COLUMNS = ("round", "loss", "acc", "AUC", "hosp.", "s", "MB up", "prot s", "agg s", "unprot s")
_LEGEND = (
    "loss/acc/AUC: global model on the test data; hosp.: hospitals that contributed; "
    "s: round seconds; MB up: protected bytes sent per hospital; prot/agg/unprot s: "
    "hospital protect, server aggregate, hospital unprotect seconds."
)


def _row(r: RoundRecord) -> list[str]:
    def f(v: float, d: int = 4) -> str:
        return "—" if math.isnan(v) else f"{v:.{d}f}"

    return [
        str(r.round),
        f(r.loss),
        f(r.accuracy),
        f(r.auc),
        str(r.clients) + (f" (-{len(r.dropped)})" if r.dropped else ""),
        f"{r.seconds:.2f}",
        f"{r.bytes_up_per_client / 1e6:.3f}",
        f"{r.protect_seconds:.3f}",
        f"{r.aggregate_seconds:.3f}",
        f"{r.unprotect_seconds:.3f}",
    ]


def _table(config: RunConfig, task_name: str) -> Table:
    preset = f" ({config.he_preset})" if config.he_preset else ""
    table = Table(
        title=f"{task_name} · {config.model} · {config.protection}{preset} · "
        f"{config.clients} hospitals",
        caption=_LEGEND,
    )
    for name in _COLUMNS:
        table.add_column(name, justify="right")
    return table


def simulate(
    task: str | None = typer.Option(
        None,
        "--task",
        help="Your own task: FILE.py:NAME or package.module:NAME (a fedcrypt.Task); "
        "replaces --dataset/--model.",
    ),
    dataset: str = typer.Option(
        "wdbc",
        help="Built-in task: wdbc (embedded Wisconsin breast-cancer table), a MedMNIST name "
        "(breastmnist, pneumoniamnist, chestmnist, ...), a MedMNIST .npz path, a folder of "
        "images in class sub-folders (optionally under train/ val/ test/), or a CSV "
        "manifest (path,label or path,label_1,...,label_K).",
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Folder holding <dataset>.npz (e.g. ../shared/data)."
    ),
    model: str | None = typer.Option(
        None,
        help="Built-in model: mlp, cnn, mobilenetv2 or resnet18.",
        show_default="mlp for tables, cnn for images",
    ),
    clients: int = typer.Option(3, help="Number of simulated hospitals."),
    rounds: int = typer.Option(5, help="FedAvg rounds (with --resume: the total to reach)."),
    local_epochs: int = typer.Option(3, "--local-epochs", help="Local epochs per round."),
    batch_size: int = typer.Option(32, "--batch-size", help="Local batch size."),
    lr: float | None = typer.Option(
        None, help="Adam learning rate.", show_default="the model's: 1e-2 for mlp, 1e-3 otherwise"
    ),
    class_weight: str = typer.Option(
        "none",
        "--class-weight",
        help="none, or balanced (weights the loss against class imbalance).",
    ),
    partition: str = typer.Option(
        "iid",
        help="iid, dirichlet (non-IID label skew), or none (every hospital uses the whole "
        "dataset: its own data on the deployment engine).",
    ),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more skewed)."),
    seed: int = typer.Option(0, help="Seed for partitioning, initialisation and training."),
    protection: str = typer.Option(
        "he",
        help="he (homomorphic encryption), secagg (pairwise masking), or plain (baseline); "
        "ckks is a deprecated alias of he.",
    ),
    he_preset: str | None = typer.Option(
        None,
        "--he-preset",
        help="HE parameter preset (see 'fedcrypt keys presets').",
        show_default="packed, or the preset of --keys",
    ),
    encrypt_layers: str = typer.Option(
        "all", "--encrypt-layers", help="he only: all, last, last:N, or a regex of tensor names."
    ),
    keys: Path | None = typer.Option(
        None,
        "--keys",
        help="he only: folder from 'fedcrypt keys generate'.",
        show_default="a fresh pair, kept in <run>/keys",
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="A state_dict file to start from (e.g. pretrained MobileNetV2)."
    ),
    width_mult: float = typer.Option(1.0, "--width-mult", help="Model width multiplier."),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        help="Side in pixels images are resized to (MedMNIST names: 64, 128 or 224 read "
        "the MedMNIST+ file <name>_<size>.npz).",
        show_default="the model's native size",
    ),
    min_hospitals: int | None = typer.Option(
        None,
        "--min-hospitals",
        help="Quorum: a round proceeds with the hospitals that answered in time if at least "
        "this many did.",
        show_default="all invited",
    ),
    round_timeout: float = typer.Option(
        3600.0, "--round-timeout", help="Seconds to wait for the hospitals in each exchange."
    ),
    fraction: float = typer.Option(
        1.0, help="Share of the hospitals invited to each round (seeded sample)."
    ),
    drop: list[str] = typer.Option(
        [],
        "--drop",
        help="Simulate hospital ID going offline at ROUND[:STAGE], e.g. 2@1:masked_input "
        "(repeatable).",
    ),
    device: str = typer.Option("auto", help="Where hospitals train: auto, cpu or cuda."),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        help="Differential privacy: DP-SGD at every hospital, spending at most this ε on its "
        "patients over all rounds.",
        show_default="no DP",
    ),
    dp_delta: float | None = typer.Option(
        None, "--dp-delta", help="δ of the DP guarantee.", show_default="below 1/(10 n)"
    ),
    dp_max_grad_norm: float = typer.Option(
        1.0, "--dp-max-grad-norm", help="DP-SGD's per-example gradient clipping norm."
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue RUN_DIR from its checkpoint up to --rounds rounds."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Run directory.", show_default="runs/<time>-<dataset>-<protection>"
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Train one model across simulated hospitals with protected FedAvg.

    Runs Flower's simulation engine on this machine: each hospital trains on its own
    data, protects its update (encrypts it with he, masks it with secagg), the server
    aggregates without unprotecting, and hospitals unprotect and evaluate the global
    model. Writes metrics.json, report.md, roc.png, rounds.png and model.pt to the run
    directory, and a checkpoint after every round (--resume continues from it).
    """
    from fedcrypt.federation.simulation import PreparedRun, prepare_run, run_simulation

    protection = cli_protection(protection)
    config = RunConfig.build(
        task=task,
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
        image_size=image_size,
        min_hospitals=min_hospitals,
        round_timeout=round_timeout,
        fraction=fraction,
        drop=tuple(drop),
        device=device,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        dp_max_grad_norm=dp_max_grad_norm,
    )
    prepared: PreparedRun | None = None
    if resume is not None:
        from fedcrypt.federation.checkpoint import read_checkpoint

        ckpt = read_checkpoint(resume)
        shown = ckpt.config.model_copy(update={"rounds": rounds})
        run_dir = resume
        task_name = str(ckpt.info.get("task") or shown.dataset)
        console.print(f"resuming {run_dir} after round {ckpt.round}, up to round {rounds}")
    else:
        with console.status("checking task, data, model and keys"):
            prepared = prepare_run(config, keys_dir=keys)
        shown = prepared.config
        task_name = prepared.task.name
        run_dir = out or default_run_dir(shown, task_name=task_name if shown.task else None)
        _describe(prepared)

    table = _table(shown, task_name)
    if resume is not None:
        for r in ckpt.history:
            table.add_row(*_row(r))
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
    )
    bar = progress.add_task("starting Flower simulation engine", total=shown.rounds)

    def on_round(r: RoundRecord) -> None:
        table.add_row(*_row(r))
        progress.update(
            bar,
            completed=r.round,
            description=f"round {r.round + 1}" if r.round < shown.rounds else "writing report",
        )

    with Live(Group(table, progress), console=console, refresh_per_second=4, transient=False):
        record = run_simulation(
            config if prepared is None else prepared.config,
            run_dir=run_dir,
            keys_dir=keys,
            on_round=on_round,
            verbose=verbose,
            prepared=prepared,
            resume=resume is not None,
        )
        progress.update(bar, description="done")
    console.print()
    final = record.final
    extra = ", ".join(
        f"{k} {final[k]:.4f}"
        for k in ("sensitivity", "specificity", "balanced_accuracy")
        if isinstance(final.get(k), float)
    )
    if isinstance(final.get("epsilon"), float):
        extra += (", " if extra else "") + f"DP ε {final['epsilon']:.3g} at δ {final['delta']:g}"
    console.print(
        f"final test accuracy [bold]{final['accuracy']:.4f}[/], ROC AUC [bold]{final['auc']:.4f}[/]"
        + (f", {extra}" if extra else "")
        + f" in {record.seconds:.1f} s"
    )
    console.print(
        f"run directory: [bold]{run_dir}[/] (metrics.json, report.md, roc.png, rounds.png, "
        "model.pt)"
    )


def _describe(run: object) -> None:
    """One line on what will run; a warning when he leaves tensors in plaintext."""
    from fedcrypt.federation.simulation import PreparedRun

    assert isinstance(run, PreparedRun)
    cfg = run.config
    preset = f", preset {cfg.he_preset}" if cfg.he_preset else ""
    console.print(
        f"task {run.task.name!r} ({run.info.label_kind}, {run.info.num_outputs} outputs), "
        f"model {cfg.model}, lr {cfg.lr:g}, {cfg.local_epochs} local epoch(s), "
        f"protection {cfg.protection}{preset}"
        + (f", DP-SGD ε ≤ {cfg.dp_epsilon:g} at δ {cfg.dp_delta:g}" if cfg.dp_epsilon else "")
    )
    if run.scheme.layer_selection and cfg.encrypt_layers != "all":
        enc, frac, clear = run.layer_selection()
        shown = ", ".join(clear[:6]) + (f" and {len(clear) - 6} more" if len(clear) > 6 else "")
        warn(
            f"--encrypt-layers {cfg.encrypt_layers}: the server sees {1 - frac:.1%} of the "
            f"model's values in plaintext ({len(clear)} tensors: {shown}); "
            f"{len(enc)} tensors are encrypted"
        )
