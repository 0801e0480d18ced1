"""``fedcrypt bench compare``: one federated task under plain, he, secagg and Flower's SecAgg+."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcrypt.config import RunConfig

log = logging.getLogger(__name__)

#: Mode names; ``flower-secagg+`` is Flower's own SecAgg+ (legacy API, real Flower code).
MODES = ("plain", "he", "secagg", "flower-secagg+")
FLOWER = "flower-secagg+"
ROUND_KEYS = (
    "bytes_up",
    "bytes_down",
    "protect_seconds",
    "aggregate_seconds",
    "wall_seconds",
    "accuracy",
    "auc",
)


@dataclass
class Options:
    """What ``bench compare`` runs.

    Parameters
    ----------
    dataset : str
        Dataset name (default: ``breastmnist``).
    data_dir : Path or None
        Folder with ``<dataset>.npz`` (default: None).
    models : sequence of str
        Models (default: ``("cnn",)``; the issue's full grid adds ``mobilenetv2``).
    hospitals : sequence of int
        Consortium sizes (default: ``(3,)``; the full grid is 3, 5, 10).
    modes : sequence of str
        Subset of :data:`MODES` (default: all).
    rounds, local_epochs : int
        FedAvg rounds and local epochs (default: 2 and 1).
    seed : int
        Seed shared by every run (default: 0).
    """

    dataset: str = "breastmnist"
    data_dir: Path | None = None
    models: Sequence[str] = ("cnn",)
    hospitals: Sequence[int] = (3,)
    modes: Sequence[str] = MODES
    rounds: int = 2
    local_epochs: int = 1
    seed: int = 0

    @classmethod
    def for_quick(cls, *, data_dir: Path | None = None) -> Options:
        """A smoke run: the embedded ``wdbc`` table, MLP, 3 hospitals, 1 round."""
        return cls(dataset="wdbc", data_dir=data_dir, models=("mlp",), rounds=1)


@dataclass
class Result:
    """One (model, hospitals, mode) run: per-round figures, finals, status."""

    model: str
    hospitals: int
    mode: str
    status: str = "ok"
    error: str = ""
    parameters: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)
    accuracy: float = float("nan")
    auc: float = float("nan")
    seconds: float = 0.0


def _config(opts: Options, *, model: str, hospitals: int, protection: str) -> RunConfig:
    return RunConfig.build(
        dataset=opts.dataset,
        data_dir=opts.data_dir,
        model=model,
        clients=hospitals,
        rounds=opts.rounds,
        local_epochs=opts.local_epochs,
        seed=opts.seed,
        protection=protection,
    )


def _fedcrypt_run(cfg: RunConfig, run_dir: Path, res: Result) -> None:
    from fedcrypt.federation.simulation import run_simulation

    record = run_simulation(cfg, run_dir=run_dir)
    data = json.loads((run_dir / "metrics.json").read_text())
    res.parameters = int(data.get("info", {}).get("parameters", 0) or 0)
    for r in data["rounds"]:
        res.rounds.append(
            {
                "round": r["round"],
                "bytes_up": r["bytes_up_per_client"],
                "bytes_down": r["bytes_down_per_client"],
                "protect_seconds": r["protect_seconds"],
                "aggregate_seconds": r["aggregate_seconds"],
                "wall_seconds": r["seconds"],
                "accuracy": r["accuracy"],
                "auc": r["auc"],
            }
        )
    del record
    res.accuracy = float(data["final"]["accuracy"])
    res.auc = float(data["final"]["auc"])


def run_compare(
    out: Path, *, options: Options, log_fn: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run every (model, hospitals, mode) and write ``compare.json`` and PNG plots to ``out``.

    A failed run is reported with ``status == "failed"`` and its error; it does not stop
    the others. Flower's SecAgg+ counts as failed when the global model did not change in
    a round (Flower then still reports success; DESIGN.md §7).

    Returns
    -------
    dict
        ``options``, ``results`` (list of :class:`Result` as dicts), ``png`` (paths).
    """
    from fedcrypt.exceptions import FedcryptError

    out.mkdir(parents=True, exist_ok=True)
    bad = set(options.modes) - set(MODES)
    if bad:
        from fedcrypt.exceptions import ConfigError

        raise ConfigError(f"unknown modes {sorted(bad)}; use {', '.join(MODES)}")
    results: list[Result] = []
    for model in options.models:
        for n in options.hospitals:
            for mode in options.modes:
                if log_fn is not None:
                    log_fn(f"{model} · {n} hospitals · {mode}")
                res = Result(model=model, hospitals=n, mode=mode)
                run_dir = out / "runs" / f"{model}-{n}-{mode.replace('+', 'plus')}"
                t0 = time.perf_counter()
                try:
                    if mode == FLOWER:
                        cfg = _config(options, model=model, hospitals=n, protection="plain")
                        _flower_run(cfg, run_dir, res)
                    else:
                        cfg = _config(options, model=model, hospitals=n, protection=mode)
                        _fedcrypt_run(cfg, run_dir, res)
                except FedcryptError as exc:
                    res.status, res.error = "failed", f"{type(exc).__name__}: {exc}"
                res.seconds = time.perf_counter() - t0
                results.append(res)
    payload: dict[str, Any] = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "results": [asdict(r) for r in results],
    }
    payload["png"] = [str(p) for p in _plots(results, out)]
    (out / "compare.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    return payload


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def mean_round(res: Result, key: str) -> float:
    """Mean of ``key`` over a result's rounds (NaN when none)."""
    vals = [float(r[key]) for r in res.rounds if key in r]
    return float(np.mean(vals)) if vals else float("nan")


def render(payload: dict[str, Any], console: Any) -> None:
    """Print a rich table of ``payload`` (per-round means, final accuracy and AUC)."""
    from rich.table import Table

    table = Table(title="protection side by side (per round means; per hospital)")
    for col in (
        "model",
        "hosp.",
        "mode",
        "status",
        "MB up",
        "MB down",
        "protect s",
        "aggregate s",
        "round s",
        "accuracy",
        "AUC",
    ):
        table.add_column(col, justify="left" if col in ("model", "mode", "status") else "right")
    for d in payload["results"]:
        res = Result(**d)

        def f(key: str, scale: float = 1.0, digits: int = 3, res: Result = res) -> str:
            v = mean_round(res, key)
            return "-" if math.isnan(v) else f"{v / scale:.{digits}f}"

        table.add_row(
            res.model,
            str(res.hospitals),
            res.mode,
            res.status if res.status == "ok" else f"[red]{res.status}[/red]",
            f("bytes_up", 1e6),
            f("bytes_down", 1e6),
            f("protect_seconds"),
            f("aggregate_seconds"),
            f("wall_seconds", digits=2),
            "-" if res.accuracy is None or math.isnan(res.accuracy) else f"{res.accuracy:.4f}",
            "-" if res.auc is None or math.isnan(res.auc) else f"{res.auc:.4f}",
        )
    console.print(table)
    for d in payload["results"]:
        if d["status"] != "ok":
            console.print(f"{d['model']}/{d['hospitals']}/{d['mode']}: {d['error']}", markup=False)


def _plots(results: list[Result], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    metrics = (
        ("bytes_up", "bytes up per hospital per round", True),
        ("protect_seconds", "hospital protect seconds per round", True),
        ("wall_seconds", "round wall seconds", False),
        ("auc", "final ROC AUC", False),
    )
    groups = sorted({(r.model, r.hospitals) for r in results})
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    width = 0.8 / max(1, len(modes))
    for ax, (key, title, logy) in zip(axes, metrics, strict=True):
        for k, mode in enumerate(modes):
            vals = []
            for g in groups:
                res = next(
                    (r for r in results if (r.model, r.hospitals) == g and r.mode == mode), None
                )
                if res is None or res.status != "ok":
                    vals.append(0.0)
                elif key == "auc":
                    vals.append(res.auc)
                else:
                    vals.append(mean_round(res, key))
            xs = np.arange(len(groups)) + k * width
            ax.bar(xs, vals, width=width, label=mode)
        ax.set_xticks(np.arange(len(groups)) + width * (len(modes) - 1) / 2)
        ax.set_xticklabels([f"{m}\n{n} hosp." for m, n in groups])
        ax.set_title(title)
        if logy:
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


# -- Flower's built-in SecAgg+ (legacy API) ---------------------------------------------
def _message_bytes(msg: Any) -> int:
    from flwr.common.serde import message_to_proto

    return len(message_to_proto(msg).SerializeToString())


def _flower_apps(cfg: RunConfig, log_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Legacy ServerApp (SecAggPlusWorkflow) and ClientApp (secaggplus_mod) for ``cfg``."""
    from flwr.client import ClientApp as LegacyClientApp
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server import ServerApp as LegacyServerApp
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from fedcrypt.federation.client import SiteSetup
    from fedcrypt.site import LocalSite, task_for

    site0 = LocalSite(task_for(cfg), config=cfg, hospital=0, num_hospitals=cfg.clients)
    init_vec = site0.initial.astype(np.float32)
    setup = SiteSetup(config=cfg, torch_threads=1)
    stats: dict[str, Any] = {"rounds": {}, "parameters": site0.layout.size}
    del site0

    def _record(kind: str, **values: float) -> None:
        with log_path.open("a") as fh:
            fh.write(json.dumps({"kind": kind, "pid": os.getpid(), **values}) + "\n")

    class _Client(NumPyClient):
        def __init__(self, context: Context) -> None:
            self.site = setup.site(context)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            vec = np.asarray(parameters[0], dtype=np.float64)
            rnd = int(config.get("server-round", 1))
            weights, metrics = self.site.train_round(vec, server_round=rnd)
            return (
                [weights.astype(np.float32)],
                self.site.num_train,
                {"train-loss": metrics["train-loss"]},
            )

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            vec = np.asarray(parameters[0], dtype=np.float64)
            metrics, _ = self.site.evaluate(vec)
            n = int(metrics.get("test-examples", 1))
            return (
                float(metrics.get("test-loss", 0.0)),
                n,
                {
                    "accuracy": metrics.get("test-accuracy", 0.0),
                    "auc": metrics.get("test-auc", 0.0),
                },
            )

    def client_fn(context: Context) -> Any:
        return _Client(context).to_client()

    def size_mod(msg: Any, context: Context, call_next: Any) -> Any:
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        total = time.perf_counter() - t0
        if msg.metadata.message_type.startswith("train"):
            _record("outer", down=_message_bytes(msg), up=_message_bytes(reply), seconds=total)
        return reply

    def inner_mod(msg: Any, context: Context, call_next: Any) -> Any:
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        if msg.metadata.message_type.startswith("train"):
            _record("inner", seconds=time.perf_counter() - t0)
        return reply

    client_app = LegacyClientApp(client_fn=client_fn, mods=[size_mod, secaggplus_mod, inner_mod])

    class _Timed(FedAvg):
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            if out[0] is not None:
                new = parameters_to_ndarrays(out[0])[0]
                stats["rounds"].setdefault(server_round, {})["changed"] = bool(
                    not np.array_equal(new, stats.get("last", init_vec))
                )
                stats["last"] = new
            return out

    def _agg_eval(pairs: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        total = sum(n for n, _ in pairs) or 1
        return {k: sum(n * float(m[k]) for n, m in pairs) / total for k in ("accuracy", "auc")}

    strategy = _Timed(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=cfg.clients,
        min_evaluate_clients=cfg.clients,
        min_available_clients=cfg.clients,
        initial_parameters=ndarrays_to_parameters([init_vec]),
        on_fit_config_fn=lambda rnd: {"server-round": rnd},
        evaluate_metrics_aggregation_fn=_agg_eval,
    )
    server_app = LegacyServerApp()

    @server_app.main()
    def _main(grid: Any, context: Context) -> None:
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy
        )
        secagg = SecAggPlusWorkflow(
            num_shares=cfg.clients, reconstruction_threshold=cfg.clients // 2 + 1
        )
        timed = _TimedWorkflow(secagg, stats)
        DefaultWorkflow(fit_workflow=timed)(grid, legacy)
        stats["history"] = legacy.history

    return server_app, client_app, stats


class _TimedWorkflow:
    """Wraps the SecAgg+ fit workflow to time the server's share of each round."""

    def __init__(self, inner: Any, stats: dict[str, Any]) -> None:
        self.inner = inner
        self.stats = stats

    def __call__(self, grid: Any, context: Any) -> None:
        rnd = len(self.stats["rounds"]) + 1
        t0 = time.perf_counter()
        self.inner(grid, context)
        self.stats["rounds"].setdefault(rnd, {})["fit_seconds"] = time.perf_counter() - t0


def _flower_run(cfg: RunConfig, run_dir: Path, res: Result) -> None:
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedcrypt.exceptions import AggregationError
    from fedcrypt.federation.simulation import quiet_environment

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "flower-mods.jsonl"
    log_path.unlink(missing_ok=True)
    quiet_environment(False)
    server_app, client_app, stats = _flower_apps(cfg, log_path)
    res.parameters = int(stats["parameters"])
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, min(os.cpu_count() or 1, cfg.clients)),
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        },
    }
    t0 = time.perf_counter()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory():
        warnings.simplefilter("ignore")
        flwr_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend,  # type: ignore[arg-type]
        )
    wall = time.perf_counter() - t0
    history = stats.get("history")
    rounds = stats["rounds"]
    failed = [r for r in range(1, cfg.rounds + 1) if not rounds.get(r, {}).get("changed")]
    if history is None or failed:
        raise AggregationError(
            f"Flower SecAgg+ reported success but the global model did not change in "
            f"round(s) {failed}: its aggregation failed"
        )
    entries = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    outer = [e for e in entries if e["kind"] == "outer"]
    inner = [e for e in entries if e["kind"] == "inner"]
    per_round = max(1, len(outer) // (cfg.clients * cfg.rounds))  # SecAgg+ stages per round
    acc = dict(history.metrics_distributed.get("accuracy", []))
    auc = dict(history.metrics_distributed.get("auc", []))
    for rnd in range(1, cfg.rounds + 1):
        chunk = outer[(rnd - 1) * per_round * cfg.clients : rnd * per_round * cfg.clients]
        train_s = sum(e["seconds"] for e in inner[(rnd - 1) * cfg.clients : rnd * cfg.clients])
        res.rounds.append(
            {
                "round": rnd,
                "bytes_up": sum(e["up"] for e in chunk) / cfg.clients,
                "bytes_down": sum(e["down"] for e in chunk) / cfg.clients,
                "protect_seconds": (sum(e["seconds"] for e in chunk) - train_s) / cfg.clients,
                # the server's share: the fit workflow's time minus the slowest hospital's
                "aggregate_seconds": float("nan"),
                "wall_seconds": rounds.get(rnd, {}).get("fit_seconds", wall / cfg.rounds),
                "accuracy": float(acc.get(rnd, float("nan"))),
                "auc": float(auc.get(rnd, float("nan"))),
            }
        )
    res.accuracy = res.rounds[-1]["accuracy"]
    res.auc = res.rounds[-1]["auc"]
