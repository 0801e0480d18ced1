"""Run a whole federation on this machine with Flower's simulation engine."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import AggregationError, KeyMaterialError
from fedcrypt.federation.app import HospitalSetup, Outcome, build_client_app, build_server_app
from fedcrypt.federation.secagg_flow import SecAggOptions
from fedcrypt.protection.registry import HOSPITAL_KEY_FILE, SERVER_KEY_FILE, get_scheme
from fedcrypt.report.records import RoundRecord, RunRecord
from fedcrypt.report.writer import write_run

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

log = logging.getLogger(__name__)


def _quiet_environment(verbose: bool) -> None:
    # No telemetry (there is no network), no Ray dashboard, no accelerator env override.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


@contextlib.contextmanager
def _key_files(
    config: RunConfig, keys_dir: Path | None
) -> Iterator[tuple[Path | None, Path | None]]:
    """Yield (hospital key, server key) paths; fresh keys live in a temporary folder."""
    if not get_scheme(config.protection).key_files:
        yield None, None
        return
    if keys_dir is not None:
        hospital, server = keys_dir / HOSPITAL_KEY_FILE, keys_dir / SERVER_KEY_FILE
        for path in (hospital, server):
            if not path.is_file():
                raise KeyMaterialError(
                    f"{path} not found: create keys with 'fedcrypt keys generate --out {keys_dir}'"
                )
        yield hospital, server
        return
    from fedcrypt.protection.he.keys import write_key_files
    from fedcrypt.protection.he.params import DEFAULT_PRESET

    with tempfile.TemporaryDirectory(prefix="fedcrypt-keys-") as tmp:
        hospital, server = write_key_files(Path(tmp), preset=config.he_preset or DEFAULT_PRESET)
        yield hospital, server


def _check_keys(config: RunConfig, hospital_key: Path | None, server_key: Path | None) -> None:
    from fedcrypt.protection.registry import hospital_protection, server_aggregator

    server_side = server_aggregator(config.protection, key_file=server_key)
    hospital_side = hospital_protection(config.protection, key_file=hospital_key)
    fingerprints = {
        getattr(server_side, "fingerprint", None),
        getattr(hospital_side, "fingerprint", None),
    }
    if len(fingerprints) != 1:
        raise KeyMaterialError(
            f"{hospital_key} and {server_key} belong to different key contexts: "
            "use the pair written by one 'fedcrypt keys generate'"
        )


def check_run(
    config: RunConfig, *, keys_dir: Path | None = None, secagg: SecAggOptions | None = None
) -> None:
    """Fail fast, before any process starts, on bad data, model, preset or key files.

    Raises
    ------
    fedcrypt.exceptions.FedcryptError
        The first problem found (ConfigError, DataError, KeyMaterialError, ...).
    """
    if get_scheme(config.protection).staged:
        from fedcrypt.federation.secagg_flow import SecAggOptions

        (secagg or SecAggOptions()).params(config)
    from fedcrypt.federation.hospital import initial_payload

    initial_payload(config)
    if get_scheme(config.protection).key_files:
        from fedcrypt.protection.he.params import get_preset

        if config.he_preset is not None:
            get_preset(config.he_preset)
        if keys_dir is not None:
            with _key_files(config, keys_dir) as (hospital_key, server_key):
                _check_keys(config, hospital_key, server_key)


def _secagg_apps(
    config: RunConfig, *, options: SecAggOptions, run_dir: Path, outcome: Outcome
) -> tuple[ServerApp, ClientApp]:
    """Server and client apps of a ``secagg`` run, with fresh keys for this run only."""
    from fedcrypt.federation.secagg_client import (
        SecAggClientSetup,
        SecAggKeys,
        build_secagg_client_app,
    )
    from fedcrypt.federation.secagg_flow import build_secagg_server_app

    params = options.params(config)
    keys = SecAggKeys.generate(range(config.clients), group_mask=params.group_mask)
    server_app = build_secagg_server_app(config, keys=keys, options=options, outcome=outcome)
    client_app = build_secagg_client_app(
        SecAggClientSetup(
            config=config, params=params, keys=keys, output_dir=run_dir, torch_threads=1
        )
    )
    return server_app, client_app


def run_simulation(
    config: RunConfig,
    *,
    run_dir: Path,
    keys_dir: Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    verbose: bool = False,
    secagg: SecAggOptions | None = None,
    check: bool = True,
) -> RunRecord:
    """Simulate ``config.clients`` hospitals and a server; write the run directory.

    Parameters
    ----------
    config : RunConfig
        The run.
    run_dir : Path
        Output folder (``metrics.json``, ``report.md``, ``roc.png``, ``rounds.png``,
        ``model.pt`` as decrypted by hospital 0).
    keys_dir : Path, optional
        Folder with ``hospital.key`` and ``server.key`` from ``fedcrypt keys generate``;
        without it a fresh key pair is made for this run and deleted afterwards.
    on_round : callable, optional
        Called with each finished round (progress display).
    verbose : bool
        Keep Flower's and Ray's logs (default: False).
    secagg : SecAggOptions, optional
        ``secagg`` tunables (default: :class:`SecAggOptions` defaults). Fresh Ed25519
        keys and a fresh consortium key are made for every run; the server gets only the
        registry of public keys.
    check : bool
        Run :func:`check_run` first (default: True); pass False when the caller
        already did.

    Returns
    -------
    RunRecord
        What was written to ``metrics.json``.

    Raises
    ------
    fedcrypt.exceptions.FedcryptError
        For bad configuration, key material, data, or a failed round.
    """
    if check:
        check_run(config, keys_dir=keys_dir, secagg=secagg)
    _quiet_environment(verbose)
    from flwr.simulation import run_simulation as flwr_run_simulation

    started = time.perf_counter()
    outcome = Outcome(on_round=on_round)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _key_files(config, keys_dir) as (hospital_key, server_key):
        if get_scheme(config.protection).staged:
            server_app, client_app = _secagg_apps(
                config, options=secagg or SecAggOptions(), run_dir=run_dir, outcome=outcome
            )
        else:  # a --keys pair was checked by check_run; fresh keys are one pair
            server_app = build_server_app(config, server_key=server_key, outcome=outcome)
            client_app = build_client_app(
                HospitalSetup(
                    config=config, hospital_key=hospital_key, output_dir=run_dir, torch_threads=1
                )
            )
        backend = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": max(1, min(os.cpu_count() or 1, config.clients)),
                "include_dashboard": False,
                "log_to_driver": verbose,
                "logging_level": logging.INFO if verbose else logging.ERROR,
            },
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flwr_run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.clients,
                backend_config=backend,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
    if outcome.error is not None:
        raise outcome.error
    if len(outcome.rounds) != config.rounds:
        raise AggregationError(
            f"the simulation stopped after {len(outcome.rounds)} of {config.rounds} rounds"
        )
    return write_run(run_dir, config, outcome, seconds=time.perf_counter() - started)
