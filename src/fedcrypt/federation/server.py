"""The ServerApp body: build the mode's strategy from public material, run the rounds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrypt.config import RunConfig
from fedcrypt.federation.checkpoint import Checkpoint, write_checkpoint
from fedcrypt.federation.outcome import Outcome
from fedcrypt.federation.strategy import ProtectedFedAvg
from fedcrypt.protection.registry import get_scheme
from fedcrypt.report.records import RoundRecord

log = logging.getLogger(__name__)

#: Builds the strategy of a run (the secagg flow brings its own).
StrategyFactory = Callable[[RunConfig], ProtectedFedAvg]


def single_message_strategy(config: RunConfig, *, server_key: Path | None) -> ProtectedFedAvg:
    """:class:`ProtectedFedAvg` for ``plain``/``he``: the server half from public material.

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If the mode needs the server key file and it is missing or is a secret key file.
    """
    scheme = get_scheme(config.protection)
    aggregator = scheme.server_aggregator(key_file=server_key, encrypt_layers=config.encrypt_layers)
    return ProtectedFedAvg(
        aggregator,
        num_clients=config.clients,
        min_hospitals=config.min_hospitals,
        fraction=config.fraction,
        seed=config.seed,
        timeout=config.round_timeout,
    )


def run_server(
    grid: Grid,
    config: RunConfig,
    *,
    strategy: ProtectedFedAvg,
    outcome: Outcome,
    run_dir: Path | None = None,
    resume: Checkpoint | None = None,
) -> None:
    """Run ``config.rounds`` rounds (from a checkpoint's next round when resuming).

    With a ``run_dir`` the server checkpoints after every round. Errors are stored in
    ``outcome.error`` (and re-raised) so the caller can exit non-zero: Flower's
    simulation runtime only logs an exception from the ServerApp.
    """
    try:
        scheme = get_scheme(config.protection)
        outcome.info.update({"scheme": scheme.name})
        if resume is not None:
            outcome.info.update(resume.info)
            outcome.rounds.extend(resume.history)

        def checkpoint(rnd: int, kept: dict[int, bytes], history: list[RoundRecord]) -> None:
            if run_dir is not None:
                write_checkpoint(
                    run_dir,
                    config=config,
                    server_round=rnd,
                    aggregates=kept,
                    history=history,
                    info={**outcome.info, **strategy.info},
                )

        strategy.run(
            grid,
            num_rounds=config.rounds,
            start_round=1 if resume is None else resume.round + 1,
            resume=None if resume is None else (resume.aggregates, resume.history),
            on_round=outcome.add,
            checkpoint=checkpoint,  # type: ignore[arg-type]
        )
        outcome.roc = strategy.roc
        outcome.info.update(strategy.info)
    except BaseException as exc:
        outcome.error = exc
        raise
    finally:
        outcome.done.set()


def build_server_app(
    config: RunConfig,
    *,
    factory: StrategyFactory,
    outcome: Outcome,
    run_dir: Path | None = None,
    resume: Checkpoint | None = None,
) -> ServerApp:
    """A ServerApp with ``config`` and the strategy factory baked in (simulation)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(
            grid,
            config,
            strategy=factory(config),
            outcome=outcome,
            run_dir=run_dir,
            resume=resume,
        )

    return app
