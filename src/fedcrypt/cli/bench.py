"""``fedcrypt bench``: benchmarks that print tables and write JSON + PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Benchmarks: HE cost, round time, protection side-by-side, privacy evidence.",
    no_args_is_help=True,
)

_console = Console(highlight=False)
if not _console.is_terminal:
    _console.width = max(_console.width, 160)  # wide tables stay readable in logs


@app.command(
    "he",
    short_help="HE cost: the paper's Table I, NVIDIA FLARE and ours; a real aggregation's error.",
)
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


@app.command(
    "compare",
    short_help="One task under plain, he, secagg and Flower's SecAgg+: bytes, seconds, AUC.",
)
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
    """The same federated task (BreastMNIST) under plain, he, secagg and Flower's SecAgg+:
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


@app.command(
    "rounds",
    short_help="HE round time over plain FedAvg's: MobileNetV2 with 3, CNN with 20 hospitals.",
)
def rounds(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for rounds.json and rounds.png.")
    ] = Path("bench-rounds"),
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder holding breastmnist.npz.")
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--setting",
            help="MODEL:HOSPITALS to time (repeat).",
            show_default="mobilenetv2:3 and cnn:20",
        ),
    ] = None,
    rounds_: Annotated[
        int, typer.Option("--rounds", min=2, help="Rounds per run (round 1 is not counted).")
    ] = 3,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="Runs per mode, alternating plain and he.")
    ] = 2,
    he_preset: Annotated[
        str | None, typer.Option("--he-preset", help="HE preset.", show_default="packed")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Smoke run: wdbc, MLP, 3 hospitals, 2 rounds.")
    ] = False,
) -> None:
    """HE round time next to plain FedAvg: the same federation under both, alternated, and
    the ratio of the median round seconds (goals: 1.10 for MobileNetV2 with 3 hospitals,
    1.25 for the CNN with 20)."""
    from fedcrypt.bench.rounds import Options, Setting, render, run_rounds
    from fedcrypt.exceptions import ConfigError

    if quick:
        opts = Options.for_quick(data_dir=data_dir)
    else:
        opts = Options(data_dir=data_dir, rounds=rounds_, repeats=repeats, he_preset=he_preset)
        if setting:
            parsed = []
            for item in setting:
                model, sep, n = item.partition(":")
                if not sep or not n.isdigit():
                    raise ConfigError(f"--setting {item!r}: expected MODEL:HOSPITALS, e.g. cnn:20")
                parsed.append(Setting(model, int(n)))
            opts.settings = parsed
    with _console.status("running…") as status:
        payload = run_rounds(out, options=opts, log=lambda msg: status.update(msg))
    render(payload, _console)
    _console.print(f"wrote {out / 'rounds.json'} and {out / 'rounds.png'}")


@app.command(
    "privacy",
    short_help="What each party learns: gradient inversion and membership inference per mode.",
)
def privacy(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for privacy.json and the PNG figures.")
    ] = Path("bench-privacy"),
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Folder holding breastmnist.npz (default: ~/.medmnist)."),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="About a minute on one core: 1 image, MLP target, no shadow models."
        ),
    ] = False,
    dp_epsilon: Annotated[
        float, typer.Option("--dp-epsilon", min=0.0, help="ε of the DP arm (over all rounds).")
    ] = 4.0,
    dp_delta: Annotated[float, typer.Option("--dp-delta", min=0.0, help="δ of the DP arm.")] = 1e-3,
    dp_max_grad_norm: Annotated[
        float, typer.Option("--dp-max-grad-norm", min=0.0, help="Per-example clipping norm C.")
    ] = 1.0,
    shadows: Annotated[
        int | None,
        typer.Option(
            "--shadows", min=0, help="Shadow models for LiRA (default 8; 0 with --quick)."
        ),
    ] = None,
    images: Annotated[
        list[int] | None,
        typer.Option(
            "--images", min=1, max=8, help="Images per attacked update (repeat; default 1 and 2)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, models and attacks.")] = 0,
) -> None:
    """What the server learns from one hospital's update in each mode (gradient inversion:
    PSNR/SSIM), what the global model reveals with and without DP (membership inference:
    ROC AUC), and who can compute what (DESIGN.md §2)."""
    from fedcrypt.bench.privacy import Options, render, run_privacy

    opts = Options.for_quick(data_dir=data_dir) if quick else Options(data_dir=data_dir)
    opts.dp_epsilon, opts.dp_delta, opts.dp_max_grad_norm = dp_epsilon, dp_delta, dp_max_grad_norm
    opts.seed = seed
    if shadows is not None:
        opts.shadows = shadows
    if images:
        opts.inversion_images = tuple(images)
    with _console.status("attacking…") as status:
        payload = run_privacy(out, options=opts, log=lambda msg: status.update(msg))
    render(payload, _console)
    _console.print(
        f"wrote {out / 'privacy.json'} and {', '.join(Path(p).name for p in payload['png'])}"
    )


@app.command(
    "paper",
    short_help="The seed paper's experiments (Table II, keys, layers, Fig. 9) beside its figures.",
)
def paper(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for paper.json and the PNG figures.")
    ] = Path("bench-paper"),
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder holding breastmnist.npz.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Model: cnn, or mobilenetv2 (the paper's; much slower).")
    ] = "cnn",
    rounds_: Annotated[int, typer.Option("--rounds", min=1, help="FedAvg rounds.")] = 3,
    quick: Annotated[
        bool, typer.Option("--quick", help="Smoke run: wdbc, MLP, 1 round, batch 32.")
    ] = False,
) -> None:
    """The seed paper's experiments beside its figures: Table II (batch 16/32/64, with and
    without HE), ROC curves, heavy vs light key, one vs four encrypted layers, and Fig. 9's
    20 hospitals, each next to a centralised baseline of the same model and budget."""
    from fedcrypt.bench.paper import Options, render, run_paper

    opts = (
        Options.for_quick(data_dir=data_dir)
        if quick
        else Options(data_dir=data_dir, model=model, rounds=rounds_)
    )
    with _console.status("running…") as status:
        payload = run_paper(out, options=opts, log=lambda msg: status.update(msg))
    render(payload, _console)
    _console.print(
        f"wrote {out / 'paper.json'} and {', '.join(Path(p).name for p in payload['png'])}"
    )
