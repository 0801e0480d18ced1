"""Run a whole federation on this machine with Flower's simulation engine."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import AggregationError, ConfigError, KeyMaterialError
from fedcrypt.federation.checkpoint import Checkpoint, read_checkpoint
from fedcrypt.federation.client import SiteSetup, build_client_app
from fedcrypt.federation.drops import check_drops, parse_drop
from fedcrypt.federation.outcome import Outcome
from fedcrypt.federation.server import build_server_app, single_message_strategy
from fedcrypt.protection.base import Scheme
from fedcrypt.protection.registry import HOSPITAL_KEY_FILE, SERVER_KEY_FILE, get_scheme
from fedcrypt.report.records import RoundRecord, RunRecord
from fedcrypt.report.writer import write_run
from fedcrypt.site import FALLBACK_LR, task_for
from fedcrypt.task import Task, TaskInfo, inspect_task

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedcrypt.federation.secagg_flow import SecAggOptions

log = logging.getLogger(__name__)

#: Where a simulation keeps the key pair it made (every party is on this machine).
KEYS_FOLDER = "keys"


def quiet_environment(verbose: bool) -> None:
    """No telemetry (there is no network), no Ray dashboard; quiet Flower/Ray logs."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


@dataclass(frozen=True)
class PreparedRun:
    """A run checked and resolved before any process starts.

    Attributes
    ----------
    config : RunConfig
        The configuration that will actually run: model, lr and HE preset filled in
        (never None for a default).
    task : Task
        The task.
    info : TaskInfo
        What inspecting the task on hospital 0's data found.
    scheme : Scheme
        The protection mode's descriptor.
    keys_dir : Path or None
        The ``--keys`` folder, if given.
    """

    config: RunConfig
    task: Task
    info: TaskInfo
    scheme: Scheme
    keys_dir: Path | None

    @property
    def encrypted_fraction(self) -> float | None:
        """Fraction of the model's values ``he`` encrypts (None when not ``he``)."""
        if not self.scheme.layer_selection:
            return None
        return self.layer_selection()[1]

    def layer_selection(self) -> tuple[list[str], float, list[str]]:
        """``(encrypted tensors, fraction of values encrypted, tensors sent in clear)``."""
        from fedcrypt.protection.flatten import Layout
        from fedcrypt.protection.selective import select_layers
        from fedcrypt.site import build_model

        dp = self.config.dp_epsilon is not None
        layout = Layout.of(build_model(self.task, seed=self.config.seed, dp=dp).state_dict())
        if self.config.encrypt_layers == "all":
            return layout.names(), 1.0, []
        mask = select_layers(layout, self.config.encrypt_layers)
        enc: list[str] = []
        clear: list[str] = []
        for spec in layout.tensors:
            part = mask[spec.offset : spec.offset + spec.numel]
            (enc if part.any() else clear).append(spec.name)
        return enc, float(mask.mean()), clear


def _keys_preset(keys_dir: Path) -> str:
    from fedcrypt.protection.he.keys import read_info

    hospital, server = keys_dir / HOSPITAL_KEY_FILE, keys_dir / SERVER_KEY_FILE
    for path in (hospital, server):
        if not path.is_file():
            raise KeyMaterialError(
                f"{path} not found: create keys with 'fedcrypt keys generate --out {keys_dir}'"
            )
    infos = []
    for path in (hospital, server):
        try:
            infos.append(read_info(path))
        except KeyMaterialError as exc:
            msg = str(exc)
            raise (exc if str(path) in msg else KeyMaterialError(f"{path}: {msg}")) from None
    h, s = infos
    if h.fingerprint != s.fingerprint:
        raise KeyMaterialError(
            f"{hospital} and {server} belong to different key contexts: "
            "use the pair written by one 'fedcrypt keys generate'"
        )
    return h.preset.name


def prepare_run(
    config: RunConfig,
    *,
    keys_dir: Path | None = None,
    secagg: SecAggOptions | None = None,
    task: Task | None = None,
) -> PreparedRun:
    """Fail fast, before any process starts: task, data, model, preset, keys, drops.

    Returns the run with its configuration resolved (what ``metrics.json`` records).

    Raises
    ------
    fedcrypt.exceptions.FedcryptError
        The first problem found (ConfigError, TaskError, DataError, KeyMaterialError):
        e.g. ``--keys`` of another preset than ``--he-preset``, ``--keys`` for a mode
        that takes no key files.
    """
    scheme = get_scheme(config.protection)
    if config.encrypt_layers != "all" and not scheme.layer_selection:
        raise ConfigError(f"--encrypt-layers does not apply to --protection {scheme.name}")
    if keys_dir is not None and not scheme.key_pair:
        raise ConfigError(
            f"--keys applies to key-file modes (he); protection {scheme.name!r} makes its own "
            "keys per run"
        )
    if scheme.staged:
        from fedcrypt.federation.secagg_flow import SecAggOptions

        (secagg or SecAggOptions()).params(config)
    check_drops(
        [parse_drop(d) for d in config.drop],
        stages=scheme.stages,
        hospitals=config.clients,
        rounds=config.rounds,
    )
    task = task or task_for(config)
    info = inspect_task(task, num_hospitals=config.clients, seed=config.seed)
    updates: dict[str, object] = {}
    if config.dp_epsilon is not None:
        updates.update(_dp_settings(config, task))
    if config.run_id is None:
        import secrets

        updates["run_id"] = f"sim-{secrets.token_hex(8)}"
    updates |= {
        "lr": config.lr or task.lr or FALLBACK_LR,
        "model": info.model_name,
    }
    if scheme.key_pair:
        from fedcrypt.protection.he.params import DEFAULT_PRESET, get_preset

        if keys_dir is not None:
            preset = _keys_preset(keys_dir)
            if config.he_preset is not None and get_preset(config.he_preset).name != preset:
                raise ConfigError(
                    f"--keys {keys_dir} holds a {preset!r} key pair but --he-preset is "
                    f"{config.he_preset!r}: drop --he-preset, or generate keys with "
                    f"'fedcrypt keys generate --he-preset {config.he_preset}'"
                )
        else:
            preset = get_preset(config.he_preset or DEFAULT_PRESET).name
        updates["he_preset"] = preset
    elif config.he_preset is not None:
        raise ConfigError(f"--he-preset applies to --protection he, not {scheme.name!r}")
    resolved = RunConfig.build(**{**config.model_dump(), **updates})
    run = PreparedRun(resolved, task, info, scheme, keys_dir)
    if scheme.layer_selection and config.encrypt_layers != "all":
        run.layer_selection()  # an impossible selection is refused here, not at the hospitals
    return run


def _dp_settings(config: RunConfig, task: Task) -> dict[str, object]:
    """Refuse an unreachable ε before any round; resolve δ (recorded in metrics.json).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the task brings its own training loop, or the requested ε cannot be met with
        hospital 0's data (the other hospitals check their own when they start).
    """
    from fedcrypt.site import sample_dp_plan

    if task.train is not None:
        raise ConfigError(
            f"task {task.name!r} brings its own train(): DP-SGD (--dp-epsilon) needs the "
            "built-in training loop"
        )
    data = task.datasets(0, config.clients, config.seed)
    plan = sample_dp_plan(config, num_train=len(data.train))  # type: ignore[arg-type]
    return {"dp_delta": float(plan.delta)}


def check_run(
    config: RunConfig, *, keys_dir: Path | None = None, secagg: SecAggOptions | None = None
) -> PreparedRun:
    """Alias of :func:`prepare_run` (kept for callers of the first release)."""
    return prepare_run(config, keys_dir=keys_dir, secagg=secagg)


def _key_pair(run: PreparedRun, run_dir: Path) -> tuple[Path | None, Path | None]:
    """(hospital key, server key) of an ``he`` run: ``--keys``, or a fresh pair kept in
    ``run_dir/keys`` (so that ``--resume`` finds it; the hospital key is written 0600)."""
    if not run.scheme.key_pair:
        return None, None
    if run.keys_dir is not None:
        return run.keys_dir / HOSPITAL_KEY_FILE, run.keys_dir / SERVER_KEY_FILE
    folder = run_dir / KEYS_FOLDER
    hospital, server = folder / HOSPITAL_KEY_FILE, folder / SERVER_KEY_FILE
    if hospital.is_file() and server.is_file():
        return hospital, server
    from fedcrypt.protection.he.keys import write_key_files

    assert run.config.he_preset is not None
    return write_key_files(folder, preset=run.config.he_preset)


def _apps(
    run: PreparedRun,
    *,
    run_dir: Path,
    outcome: Outcome,
    secagg: SecAggOptions | None,
    resume: Checkpoint | None,
) -> tuple[ServerApp, ClientApp]:
    config = run.config
    drops = tuple(parse_drop(d) for d in config.drop)
    if run.scheme.staged:
        from fedcrypt.federation.secagg_client import (
            SecAggClientSetup,
            SecAggKeys,
            build_secagg_client_app,
        )
        from fedcrypt.federation.secagg_flow import SecAggOptions, secagg_strategy

        options = secagg or SecAggOptions()
        params = options.params(config)
        keys = SecAggKeys.generate(range(config.clients), group_mask=params.group_mask)
        registry = keys.public_registry()  # the server gets the public keys only
        server_app = build_server_app(
            config,
            factory=lambda cfg: secagg_strategy(cfg, registry=registry, options=options),
            outcome=outcome,
            run_dir=run_dir,
            resume=resume,
        )
        client_app = build_secagg_client_app(
            SecAggClientSetup(
                config=config,
                params=params,
                keys=keys,
                output_dir=run_dir,
                torch_threads=1,
                drops=drops,
                task=None if config.task else run.task,
            )
        )
        return server_app, client_app
    hospital_key, server_key = _key_pair(run, run_dir)
    server_app = build_server_app(
        config,
        factory=lambda cfg: single_message_strategy(cfg, server_key=server_key),
        outcome=outcome,
        run_dir=run_dir,
        resume=resume,
    )
    client_app = build_client_app(
        SiteSetup(
            config=config,
            hospital_key=hospital_key,
            output_dir=run_dir,
            torch_threads=1,
            drops=drops,
            task=None if config.task else run.task,
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
    prepared: PreparedRun | None = None,
    resume: bool = False,
    task: Task | None = None,
) -> RunRecord:
    """Simulate ``config.clients`` hospitals and a server; write the run directory.

    Parameters
    ----------
    config : RunConfig
        The run (with ``resume``: only ``rounds`` is read, the rest comes from the
        checkpoint).
    run_dir : Path
        Output folder (``metrics.json``, ``report.md``, ``roc.png``, ``rounds.png``,
        ``model.pt`` as decrypted by hospital 0, ``checkpoint/``; and ``keys/`` with the
        fresh key pair of an ``he`` run without ``keys_dir``).
    keys_dir : Path, optional
        Folder with ``hospital.key`` and ``server.key`` from ``fedcrypt keys generate``.
    on_round : callable, optional
        Called with each finished round (progress display).
    verbose : bool
        Keep Flower's and Ray's logs (default: False).
    secagg : SecAggOptions, optional
        ``secagg`` tunables (default: :class:`SecAggOptions` defaults).
    prepared : PreparedRun, optional
        The result of :func:`prepare_run` when the caller already checked the run.
    resume : bool
        Continue the run in ``run_dir`` from its checkpoint up to ``config.rounds``
        (default: False).
    task : Task, optional
        A task object to run in place of ``config.task`` (it reaches the simulation
        workers by pickling; a task reachable by reference travels as its reference).

    Returns
    -------
    RunRecord
        What was written to ``metrics.json``.

    Raises
    ------
    fedcrypt.exceptions.FedcryptError
        For bad configuration, key material, data, or a failed round.
    """
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(run_dir)
        if config.rounds <= checkpoint.round:
            raise ConfigError(
                f"{run_dir} already finished round {checkpoint.round}: pass --rounds N with "
                f"N > {checkpoint.round} to continue"
            )
        if get_scheme(checkpoint.config.protection).staged:
            raise ConfigError("--resume supports plain and he runs; secagg runs start afresh")
        config = checkpoint.config.model_copy(update={"rounds": config.rounds, "drop": config.drop})
        if keys_dir is None and (run_dir / KEYS_FOLDER).is_dir():
            keys_dir = run_dir / KEYS_FOLDER
    run = prepared or prepare_run(config, keys_dir=keys_dir, secagg=secagg, task=task)
    quiet_environment(verbose)
    from flwr.simulation import run_simulation as flwr_run_simulation

    started = time.perf_counter()
    outcome = Outcome(on_round=on_round)
    run_dir.mkdir(parents=True, exist_ok=True)
    server_app, client_app = _apps(
        run, run_dir=run_dir, outcome=outcome, secagg=secagg, resume=checkpoint
    )
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, min(os.cpu_count() or 1, run.config.clients)),
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
            num_supernodes=run.config.clients,
            backend_config=backend,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    if outcome.error is not None:
        raise outcome.error
    if len(outcome.rounds) != run.config.rounds:
        raise AggregationError(
            f"the simulation stopped after {len(outcome.rounds)} of {run.config.rounds} rounds"
        )
    _, frac, clear = run.layer_selection() if run.scheme.layer_selection else ([], 1.0, [])
    outcome.info.update(
        {
            "task": run.task.name,
            "label_kind": run.info.label_kind,
            "class_names": list(run.info.class_names),
            "positive_class": run.info.positive_class,
        }
    )
    if run.scheme.layer_selection and clear:
        outcome.info["encrypted_fraction"] = frac
        outcome.info["plaintext_tensors"] = clear
    seconds = time.perf_counter() - started
    if checkpoint is not None:
        seconds += checkpoint.info.get("seconds", 0.0)
    record = outcome.to_record(run.config, seconds=seconds)
    return write_run(run_dir, record)
