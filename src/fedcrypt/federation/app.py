"""Flower ServerApp and ClientApp of fedcrypt on the deployment engine.

The module-level ``server_app``/``client_app`` (referenced from ``deploy/pyproject.toml``)
read their configuration from Flower: the run config from ``[tool.flwr.app.config]`` /
``flwr run --run-config`` (a task reference in ``task``, or the built-in ``dataset``/
``model``), and per site ``--node-config``:

* SuperNode (hospital): ``partition-id``, ``num-partitions``, ``hospital-key`` (path to
  the hospital key file, secret), optionally ``data-dir``, ``task`` and ``output-dir``.
* ServerApp: ``server-key`` (path to the public server key file), ``run-dir``, and
  ``resume`` (true to continue from the run directory's checkpoint).

The server side is only ever given the *server* key file path, and needs no data: the
hospitals build the initial model from the task's seeded factory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrypt.config import RunConfig
from fedcrypt.federation.checkpoint import read_checkpoint
from fedcrypt.federation.client import SiteSetup, build_client_app
from fedcrypt.federation.outcome import Outcome
from fedcrypt.federation.server import run_server, single_message_strategy
from fedcrypt.protection.registry import get_scheme
from fedcrypt.report.writer import write_run

log = logging.getLogger(__name__)

client_app = build_client_app(SiteSetup())
server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    run_cfg = dict(context.run_config)
    key = Path(str(run_cfg["server-key"])) if run_cfg.get("server-key") else None
    run_dir = Path(str(run_cfg.get("run-dir") or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}"))
    resume = read_checkpoint(run_dir) if str(run_cfg.get("resume", "")).lower() == "true" else None
    config = RunConfig.from_flower(run_cfg)
    if resume is not None:
        config = resume.config.model_copy(update={"rounds": config.rounds})
    outcome = Outcome()
    started = time.perf_counter()
    run_server(
        grid,
        config,
        strategy=single_message_strategy(config, server_key=key),
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


def resolved(config: RunConfig, outcome: Outcome, *, server_key: Path | None) -> RunConfig:
    """``config`` with what actually ran filled in: the model and lr the hospitals used
    (from their hello) and the HE preset of the server key file."""
    updates: dict[str, object] = {}
    if config.model is None and outcome.info.get("model"):
        updates["model"] = str(outcome.info["model"])
    if config.lr is None and isinstance(outcome.info.get("lr"), int | float):
        updates["lr"] = float(outcome.info["lr"])
    if server_key is not None and get_scheme(config.protection).key_files:
        from fedcrypt.protection.he.keys import read_info

        updates["he_preset"] = read_info(server_key).preset.name
    return config.model_copy(update=updates) if updates else config
