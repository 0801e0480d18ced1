"""``fedcrypt bench``: benchmarks that print tables and write JSON + PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Benchmarks: HE cost, protection side-by-side.", no_args_is_help=True)

_console = Console(highlight=False)
if not _console.is_terminal:
    _console.width = max(_console.width, 160)  # wide tables stay readable in logs


@app.command("he")
def he(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for he.json and the PNG figures.")
    ] = Path("bench-he"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A small smoke run (seconds; memory not isolated).")
    ] = False,
    values: Annotated[
        int | None,
        typer.Option(
            "--values", min=1, help="Update size for the side-by-side (default 2,236,000)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Folder with pneumoniamnist.npz for the real CNN aggregation "
            "[default: ../shared/data; random images if absent].",
        ),
    ] = None,
) -> None:
    """The seed paper's HE measurements (Table I, Figures 8 and 10) next to an NVIDIA
    FLARE reference and ours, for one MobileNetV2-sized update, plus the error of one real
    CNN aggregation."""
    from fedcrypt.bench.he import Options, render, run_he

    opts = Options.for_quick() if quick else Options()
    if values is not None:
        opts.values = values
    if data_dir is not None:
        opts.data_dir = str(data_dir)
    with _console.status("measuring…") as status:
        result = run_he(out, options=opts, log=lambda msg: status.update(msg))
    render(result, _console)
    _console.print(f"wrote {out / 'he.json'} and {', '.join(Path(p).name for p in result['png'])}")


@app.command("compare")
def compare(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for compare.json, compare.png and runs/.")
    ] = Path("bench-compare"),
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder holding breastmnist.npz.")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="cnn and/or mobilenetv2 (repeat).")
    ] = None,
    hospitals: Annotated[
        list[int] | None,
        typer.Option("--hospitals", help="Consortium sizes, e.g. 3, 5, 10 (repeat)."),
    ] = None,
    mode: Annotated[
        list[str] | None,
        typer.Option("--mode", help="plain, ckks, secagg, flower-secagg+ (repeat; default all)."),
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="FedAvg rounds.")] = 2,
    local_epochs: Annotated[int, typer.Option("--local-epochs", min=1)] = 1,
    quick: Annotated[
        bool, typer.Option("--quick", help="Smoke run: wdbc, MLP, 3 hospitals, 1 round.")
    ] = False,
) -> None:
    """The same federated task (BreastMNIST) under plain, ckks, secagg and Flower's SecAgg+:
    bytes, protect/aggregate/wall seconds per round, final accuracy and ROC AUC."""
    from fedcrypt.bench.compare import MODES, Options, render, run_compare

    if quick:
        opts = Options.for_quick(data_dir=data_dir)
    else:
        opts = Options(data_dir=data_dir, rounds=rounds, local_epochs=local_epochs)
        if model:
            opts.models = tuple(model)
        if hospitals:
            opts.hospitals = tuple(hospitals)
    opts.modes = tuple(mode) if mode else MODES
    with _console.status("running…") as status:
        payload = run_compare(out, options=opts, log_fn=lambda msg: status.update(msg))
    render(payload, _console)
    _console.print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
