"""Flower ServerApp and ClientApp of fedcrypt on the deployment engine.

The module-level ``server_app``/``client_app`` (referenced from ``deploy/pyproject.toml``)
read their configuration from Flower: the run config from ``[tool.flwr.app.config]`` /
``flwr run --run-config`` (a task reference in ``task``, or the built-in ``dataset``/
``model``), and per site ``--node-config``:

* SuperNode (hospital): ``partition-id``, ``num-partitions``, ``hospital-key`` (path to
  the hospital key file, secret; ``he``), ``secagg-identity``, ``secagg-group-mask``,
  ``secagg-registry`` and ``secagg-state`` (``secagg``), optionally ``data-dir``,
  ``task`` and ``output-dir``.
* ServerApp: ``server-key`` (path to the public server key file; ``he``),
  ``secagg-registry`` (the consortium's public registry; ``secagg``), ``run-dir``, and
  ``resume`` (true to continue from the run directory's checkpoint).

One ClientApp serves every protection mode: it answers the hello and the single-message
``train``, the secagg stage messages, and dispatches ``evaluate`` by the run's mode.

The server side is only ever given the *server* key file path, and needs no data: the
hospitals build the initial model from the task's seeded factory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError
from fedcrypt.federation.checkpoint import read_checkpoint
from fedcrypt.federation.client import SiteSetup, build_client_app, evaluate
from fedcrypt.federation.outcome import Outcome
from fedcrypt.federation.secagg_client import SecAggClientSetup, register_stage_handlers
from fedcrypt.federation.secagg_client import evaluate as secagg_evaluate
from fedcrypt.federation.server import run_server, single_message_strategy
from fedcrypt.federation.strategy import ProtectedFedAvg
from fedcrypt.protection.registry import get_scheme
from fedcrypt.report.writer import write_run

log = logging.getLogger(__name__)


def build_deployment_client_app() -> ClientApp:
    """The ClientApp of the deployment engine: every mode's handlers in one app."""
    sites = SiteSetup()
    secagg = SecAggClientSetup()
    app = build_client_app(sites, evaluate=None)
    register_stage_handlers(app, secagg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        if get_scheme(sites.run_config(context).protection).staged:
            return secagg_evaluate(secagg, msg, context)
        return evaluate(sites, msg, context)

    return app


client_app = build_deployment_client_app()
server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    run_cfg = dict(context.run_config)
    key = Path(str(run_cfg["server-key"])) if run_cfg.get("server-key") else None
    run_dir = Path(str(run_cfg.get("run-dir") or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}"))
    resume = read_checkpoint(run_dir) if str(run_cfg.get("resume", "")).lower() == "true" else None
    config = RunConfig.from_flower(run_cfg)
    if config.run_id is None:  # the same default the SuperNodes take (client.SiteSetup)
        config = config.model_copy(update={"run_id": f"flwr-{context.run_id}"})
    if resume is not None:
        config = resume.config.model_copy(update={"rounds": config.rounds})
    outcome = Outcome()
    started = time.perf_counter()
    run_server(
        grid,
        config,
        strategy=_strategy(config, run_cfg, server_key=key),
        outcome=outcome,
        run_dir=run_dir,
        resume=resume,
    )
    write_run(
        run_dir,
        outcome.to_record(
            resolved(config, outcome, server_key=key), seconds=time.perf_counter() - started
        ),
    )


def _strategy(
    config: RunConfig, run_cfg: Mapping[str, object], *, server_key: Path | None
) -> ProtectedFedAvg:
    """The run's strategy from public material: server.key (he) or the registry (secagg)."""
    if not get_scheme(config.protection).staged:
        return single_message_strategy(config, server_key=server_key)
    from fedcrypt.federation.secagg_flow import deployment_params, secagg_strategy
    from fedcrypt.protection.secagg.keys import load_registry

    if not run_cfg.get("secagg-registry"):
        raise ConfigError(
            "protection secagg on the deployment engine needs run config "
            "secagg-registry=<path of registry.pub> at the ServerApp"
        )
    registry = load_registry(Path(str(run_cfg["secagg-registry"])))
    return secagg_strategy(
        config, registry=registry.keys, params=deployment_params(config, registry)
    )


def resolved(config: RunConfig, outcome: Outcome, *, server_key: Path | None) -> RunConfig:
    """``config`` with what actually ran filled in: the model and lr the hospitals used
    (from their hello) and the HE preset of the server key file."""
    updates: dict[str, object] = {}
    if config.model is None and outcome.info.get("model"):
        updates["model"] = str(outcome.info["model"])
    if config.lr is None and isinstance(outcome.info.get("lr"), int | float):
        updates["lr"] = float(outcome.info["lr"])
    if server_key is not None and get_scheme(config.protection).key_pair:
        from fedcrypt.protection.he.keys import read_info

        updates["he_preset"] = read_info(server_key).preset.name
    return config.model_copy(update=updates) if updates else config
