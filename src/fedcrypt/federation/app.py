"""Flower ServerApp and ClientApp of fedcrypt, for simulation and deployment.

``build_server_app``/``build_client_app`` bake a validated :class:`RunConfig` and key
paths into the apps (simulation). The module-level ``server_app``/``client_app`` read
them from Flower instead (deployment engine): the run config from
``[tool.flwr.app.config]`` / ``flwr run --run-config``, and per site ``--node-config``:

* SuperNode (hospital): ``partition-id``, ``num-partitions``, ``hospital-key`` (path to
  the hospital key file, secret), optionally ``data-dir`` and ``output-dir``.
* ServerApp: ``server-key`` (path to the public server key file) and ``run-dir``.

The server side is only ever given the *server* key file path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError
from fedcrypt.federation.hospital import Hospital, initial_payload
from fedcrypt.federation.records import blob_from, blob_record
from fedcrypt.federation.strategy import ProtectedFedAvg
from fedcrypt.protection.registry import server_aggregator
from fedcrypt.report.records import RoundRecord

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the ServerApp hands back to whoever started it (the CLI, a test).

    Attributes
    ----------
    rounds : list of RoundRecord
        One per finished round.
    roc : dict
        ``fpr``/``tpr`` of the final round's test ROC curve.
    error : BaseException or None
        The error that aborted the run, if any.
    on_round : callable, optional
        Called after every round (progress display).
    """

    rounds: list[RoundRecord] = field(default_factory=list)
    roc: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    on_round: Callable[[RoundRecord], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def add(self, record: RoundRecord) -> None:
        """Record a finished round and notify the observer."""
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)


def run_server(grid: Grid, config: RunConfig, *, server_key: Path | None, outcome: Outcome) -> None:
    """The ServerApp body: protected FedAvg for ``config.rounds`` rounds.

    Errors are stored in ``outcome.error`` (and re-raised) so the caller can exit
    non-zero: Flower's simulation runtime only logs an exception from the ServerApp.
    """
    try:
        aggregator = server_aggregator(
            config.protection, key_file=server_key, encrypt_layers=config.encrypt_layers
        )
        initial, layout = initial_payload(config)
        outcome.info.update({"parameters": layout.size, "scheme": aggregator.scheme})
        strategy = ProtectedFedAvg(aggregator, num_clients=config.clients)
        strategy.run(grid, initial=initial, num_rounds=config.rounds, on_round=outcome.add)
        outcome.roc = strategy.roc
    except BaseException as exc:
        outcome.error = exc
        raise
    finally:
        outcome.done.set()


def build_server_app(config: RunConfig, *, server_key: Path | None, outcome: Outcome) -> ServerApp:
    """A ServerApp with ``config`` and the *public* server key baked in (simulation)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, config, server_key=server_key, outcome=outcome)

    return app


# -- hospitals -------------------------------------------------------------------------
_HOSPITALS: dict[tuple[str, int, int, str], Hospital] = {}


@dataclass(frozen=True)
class HospitalSetup:
    """How a ClientApp finds its configuration and key (simulation or deployment)."""

    config: RunConfig | None = None
    hospital_key: Path | None = None
    output_dir: Path | None = None
    torch_threads: int | None = None

    def hospital(self, context: Context) -> Hospital:
        """This node's :class:`Hospital`, created once per process and partition."""
        node = context.node_config
        try:
            pid = int(node["partition-id"])
            num = int(node["num-partitions"])
        except (KeyError, ValueError) as exc:
            raise ConfigError(
                "the SuperNode needs --node-config 'partition-id=<i> num-partitions=<n>'"
            ) from exc
        cfg = self.config
        if cfg is None:
            values = dict(context.run_config)
            if node.get("data-dir"):
                values["data-dir"] = node["data-dir"]
            cfg = RunConfig.from_flower(values)
        key = self.hospital_key or (
            Path(str(node["hospital-key"])) if node.get("hospital-key") else None
        )
        out = self.output_dir
        if out is None and node.get("output-dir"):
            out = Path(str(node["output-dir"]))
        cache_key = (cfg.model_dump_json(), pid, num, str(key))
        hospital = _HOSPITALS.get(cache_key)
        if hospital is None:
            if self.torch_threads:
                import torch

                torch.set_num_threads(self.torch_threads)
            hospital = Hospital(
                cfg,
                client_id=pid,
                num_clients=num,
                key_file=key,
                output_dir=out if pid == 0 or self.config is None else None,
            )
            _HOSPITALS.clear()  # one hospital per process at a time keeps memory flat
            _HOSPITALS[cache_key] = hospital
        return hospital


def build_client_app(setup: HospitalSetup) -> ClientApp:
    """A ClientApp whose hospitals are configured by ``setup``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        hospital = setup.hospital(context)
        cfg = msg.content.config_records["config"]
        payload = blob_from(msg.content.array_records.get("arrays"))
        update, metrics = hospital.fit(
            payload,
            str(cfg["kind"]),
            server_round=int(cfg["server-round"]),  # type: ignore[arg-type]
        )
        content = RecordDict({"arrays": blob_record(update), "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        hospital = setup.hospital(context)
        cfg: ConfigRecord = msg.content.config_records["config"]
        payload = blob_from(msg.content.array_records.get("arrays"))
        metrics, curves = hospital.assess(payload, final=bool(cfg.get("final", False)))
        record = MetricRecord({**metrics, **curves})
        return Message(content=RecordDict({"metrics": record}), reply_to=msg)

    return app


# -- deployment engine entry points (referenced from deploy/pyproject.toml) --------------
client_app = build_client_app(HospitalSetup())
server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    from fedcrypt.report.writer import write_run

    run_cfg = dict(context.run_config)
    config = RunConfig.from_flower(run_cfg)
    key = Path(str(run_cfg["server-key"])) if run_cfg.get("server-key") else None
    run_dir = Path(str(run_cfg.get("run-dir") or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}"))
    outcome = Outcome()
    started = time.perf_counter()
    run_server(grid, config, server_key=key, outcome=outcome)
    write_run(run_dir, config, outcome, seconds=time.perf_counter() - started)
