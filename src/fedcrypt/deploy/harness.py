"""Run the deployed fedcrypt app on Flower's deployment engine, entirely on 127.0.0.1.

:func:`deploy_locally` plays every party of a real deployment on this machine, each
with its own folder and ``FLWR_HOME`` under ``work_dir``:

* ``ca/``: a self-signed CA and the SuperLink's certificate (SAN ``IP:127.0.0.1``);
* ``server/``: the aggregation server, a ``flower-superlink`` with TLS, SuperNode
  authentication and runtime dependency installation disabled; it holds the CA
  certificate, its TLS key, and ``server.key`` (the *public* CKKS material) only;
* ``hospital-<i>/``: one ``flower-supernode`` per hospital, authenticated with its own
  P-384 key pair (registered with ``flwr supernode register``), holding the CA
  certificate, ``hospital.key`` (the CKKS secret) and its output folder;
* ``operator/``: the ``flwr`` CLI (``FLWR_HOME`` with a SuperLink connection over TLS)
  that registers the SuperNodes, submits the run and polls its status.

The hospital key path travels only in the SuperNodes' ``--node-config``; the run config
(seen by the SuperLink, the ServerApp and every SuperNode) carries only ``server-key``
and ``run-dir``. Every process is started in its own process group and stopped
(SIGTERM, then SIGKILL, then any descendant that left its group) when the function
returns, also on failure or timeout.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrypt.deploy.flwr_cli import (
    _COMPLETED,
    CONNECTION,
    Flwr,
    node_config,
    register,
    save_run_log,
    toml_value,
    tool,
    wait_for_run,
)
from fedcrypt.deploy.processes import (
    HOST,
    ConfigValue,
    base_env,
    free_port,
    started_processes,
    wait_for_port,
)
from fedcrypt.deploy.tls import make_node_key_pair, make_tls_files, write_secret
from fedcrypt.exceptions import DeploymentError
from fedcrypt.protection.registry import get_scheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentResult:
    """What a finished local deployment left behind.

    Attributes
    ----------
    run_id : int
        Flower's run ID.
    status : str
        Flower's final run status, e.g. ``finished:completed``.
    run_dir : Path
        The ServerApp's run directory (``metrics.json``, ``report.md``, plots).
    hospital_dirs : list of Path
        Each hospital's output folder (hospital ``i`` writes ``model.pt`` there).
    metrics : dict
        The parsed ``metrics.json``.
    seconds : float
        Wall-clock seconds from submitting the run to its end.
    logs_dir : Path
        One log file per process (``superlink.log``, ``hospital-<i>.log``).
    """

    run_id: int
    status: str
    run_dir: Path
    hospital_dirs: list[Path]
    metrics: dict[str, Any]
    seconds: float
    logs_dir: Path


# -- key material ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Parties:
    """Every party's folder and files under ``work_dir``."""

    work_dir: Path
    clients: int

    @property
    def logs(self) -> Path:
        return self.work_dir / "logs"

    @property
    def server(self) -> Path:
        return self.work_dir / "server"

    @property
    def operator(self) -> Path:
        return self.work_dir / "operator"

    @property
    def hospitals(self) -> list[Path]:
        return [self.work_dir / f"hospital-{i}" for i in range(self.clients)]

    @property
    def run_dir(self) -> Path:
        return self.server / "run"

    def create(self, *, protection: str, he_preset: str | None) -> None:
        """Make the folders, the TLS files and distribute fresh key material.

        As a consortium would: the CA certificate to everyone, the SuperLink's TLS key
        to the server; ``he``: ``hospital.key`` (secret) to the hospitals only and
        ``server.key`` (public) to the server only; ``secagg``: ``hospital-<i>.key``
        (secret) to hospital ``i`` only, ``group-mask.key`` (secret) to every hospital,
        ``registry.pub`` (public) to the server and every hospital.
        """
        for folder in (self.logs, self.server, self.operator, *self.hospitals):
            folder.mkdir(parents=True, exist_ok=True)
        tls = make_tls_files(self.work_dir / "ca")
        for folder in (self.server, self.operator, *self.hospitals):
            shutil.copyfile(tls.ca_cert, folder / "ca.crt")
        (self.server / "tls").mkdir(exist_ok=True)
        shutil.copyfile(tls.server_cert, self.server / "tls" / "server.crt")
        write_secret(self.server / "tls" / "server.key", tls.server_key.read_bytes())
        if get_scheme(protection).staged:
            self._secagg_keys()
            return
        if not get_scheme(protection).key_pair:
            return
        from fedcrypt.protection.he.keys import write_key_files
        from fedcrypt.protection.he.params import DEFAULT_PRESET

        ceremony = self.work_dir / "consortium"
        hospital_key, server_key = write_key_files(ceremony, preset=he_preset or DEFAULT_PRESET)
        for folder in self.hospitals:
            write_secret(folder / "hospital.key", hospital_key.read_bytes())
        shutil.copyfile(server_key, self.server / "server.key")
        shutil.rmtree(ceremony)

    def _secagg_keys(self) -> None:
        from fedcrypt.protection.secagg.keys import write_consortium

        ceremony = self.work_dir / "consortium"
        files = write_consortium(ceremony, hospitals=self.clients)
        shutil.copyfile(files.registry, self.server / "registry.pub")
        for i, folder in enumerate(self.hospitals):
            shutil.copyfile(files.registry, folder / "registry.pub")
            write_secret(folder / "identity.key", files.identities[i].read_bytes())
            if files.group_mask is not None:
                write_secret(folder / "group-mask.key", files.group_mask.read_bytes())
        shutil.rmtree(ceremony)

    def secagg_node(self, i: int) -> dict[str, ConfigValue]:
        """Hospital ``i``'s secagg key-file paths for its node config (none without)."""
        folder = self.hospitals[i]
        if not (folder / "identity.key").is_file():
            return {}
        node: dict[str, ConfigValue] = {
            "secagg-identity": str(folder / "identity.key"),
            "secagg-registry": str(folder / "registry.pub"),
            "secagg-state": str(folder / "secagg-state"),
        }
        if (folder / "group-mask.key").is_file():
            node["secagg-group-mask"] = str(folder / "group-mask.key")
        return node

    def registry(self) -> Path | None:
        path = self.server / "registry.pub"
        return path if path.is_file() else None

    def hospital_key(self, i: int) -> Path | None:
        path = self.hospitals[i] / "hospital.key"
        return path if path.is_file() else None

    def server_key(self) -> Path | None:
        path = self.server / "server.key"
        return path if path.is_file() else None


def _superlink_argv(parties: _Parties, port: int) -> list[str]:
    tls = parties.server / "tls"
    return [
        tool("flower-superlink"),
        "--ssl-ca-certfile", str(parties.server / "ca.crt"),
        "--ssl-certfile", str(tls / "server.crt"),
        "--ssl-keyfile", str(tls / "server.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", HOST,
        "--port", str(port),
    ]  # fmt: skip


def _supernode_argv(
    parties: _Parties, i: int, *, port: int, private_key: Path, data_dir: Path | None
) -> list[str]:
    folder = parties.hospitals[i]
    node: dict[str, ConfigValue] = {
        "partition-id": i,
        "num-partitions": parties.clients,
        "output-dir": str(folder / "output"),
    }
    if (key := parties.hospital_key(i)) is not None:
        node["hospital-key"] = str(key)  # the secret key's path: this SuperNode only
    node.update(parties.secagg_node(i))  # its identity and the group-mask key: secret
    if data_dir is not None:
        node["data-dir"] = str(data_dir)
    return [
        tool("flower-supernode"),
        "--root-certificates", str(folder / "ca.crt"),
        "--superlink", f"{HOST}:{port}",
        "--auth-supernode-private-key", str(private_key),
        "--node-config", node_config(node),
        "--host", HOST,
        "--port", str(free_port()),  # each SuperNode's own ClientApp runtime API
    ]  # fmt: skip


def _write_operator_files(
    parties: _Parties, *, port: int, overrides: Mapping[str, ConfigValue]
) -> tuple[Path, Path]:
    """Write the operator's ``FLWR_HOME/config.toml`` and ``run-config.toml``."""
    home = parties.operator / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{HOST}:{port}"\n'
        f"root-certificates = {toml_value(str(parties.operator / 'ca.crt'))}\n"
    )
    run_config = parties.operator / "run-config.toml"
    run_config.write_text(
        "".join(f"{key} = {toml_value(value)}\n" for key, value in overrides.items())
    )
    return home, run_config


def deploy_locally(
    *,
    app_dir: Path,
    work_dir: Path,
    clients: int = 3,
    rounds: int = 1,
    protection: str = "he",
    he_preset: str | None = None,
    run_config: Mapping[str, ConfigValue] | None = None,
    data_dir: Path | None = None,
    timeout: float = 600.0,
) -> DeploymentResult:
    """Run one fedcrypt federation on Flower's deployment engine on 127.0.0.1.

    Parameters
    ----------
    app_dir : Path
        The Flower App folder (the project's ``deploy/``).
    work_dir : Path
        Folder for every party's files, logs and outputs (created; kept afterwards).
    clients : int
        Number of hospitals, i.e. SuperNodes (default: 3).
    rounds : int
        FedAvg rounds (default: 1).
    protection : {"he", "plain", "secagg"}
        Protection mode (default: ``he``); ``he`` and ``secagg`` create fresh keys.
    he_preset : str, optional
        HE preset for the fresh keys; None uses the library default.
    run_config : mapping, optional
        Further run-config overrides (keys of ``deploy/pyproject.toml``, e.g.
        ``{"local-epochs": 2}``).
    data_dir : Path, optional
        Passed to every hospital as ``data-dir`` in its node config.
    timeout : float
        Seconds allowed from starting the SuperLink to the run's end (default: 600).

    Returns
    -------
    DeploymentResult

    Raises
    ------
    ValueError
        For a bad ``clients`` or ``protection``.
    DeploymentError
        If a process fails to start or dies, the run fails, or ``timeout`` passes.
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    get_scheme(protection)  # an unknown mode is refused before anything starts
    deadline = time.monotonic() + timeout
    parties = _Parties(work_dir.resolve(), clients)
    parties.create(protection=protection, he_preset=he_preset)

    port = free_port()
    server_key = parties.server_key()
    overrides: dict[str, ConfigValue] = {
        "clients": clients,
        "rounds": rounds,
        "protection": protection,
        "run-dir": str(parties.run_dir),
        "server-key": str(server_key) if server_key else "",  # public material only
    }
    if (registry := parties.registry()) is not None:
        overrides["secagg-registry"] = str(registry)  # public keys only
    if he_preset:
        overrides["he-preset"] = he_preset
    overrides.update(run_config or {})
    operator_home, run_config_file = _write_operator_files(parties, port=port, overrides=overrides)

    with started_processes(base_env(), parties.logs) as procs:
        procs.start(
            "superlink",
            _superlink_argv(parties, port),
            env=procs.env(parties.server / "flwr-home"),
            cwd=parties.server,
        )
        wait_for_port(port, procs, deadline)
        flwr = Flwr(procs.env(operator_home), parties.operator)
        keys = [make_node_key_pair(folder / "auth") for folder in parties.hospitals]
        with ThreadPoolExecutor(max_workers=min(8, clients)) as pool:
            registrations = [
                pool.submit(
                    register, flwr, public, name=f"hospital-{i}", procs=procs, deadline=deadline
                )
                for i, (_, public) in enumerate(keys)
            ]
            for done in registrations:
                done.result()
        for i, folder in enumerate(parties.hospitals):
            private = keys[i][0]
            procs.start(
                f"hospital-{i}",
                _supernode_argv(parties, i, port=port, private_key=private, data_dir=data_dir),
                env=procs.env(folder / "flwr-home"),
                cwd=folder,
            )

        started = time.monotonic()
        app = str(app_dir.resolve())
        answer = flwr("run", app, CONNECTION, "--run-config", str(run_config_file))
        run_id = int(answer["run-id"])
        log.info("run %d submitted to %s:%d", run_id, HOST, port)
        metrics_file = parties.run_dir / "metrics.json"
        status = "unknown"
        try:
            status = wait_for_run(
                flwr, run_id, procs=procs, deadline=deadline, done_file=metrics_file
            )
        finally:
            seconds = time.monotonic() - started
            if status != _COMPLETED:
                save_run_log(flwr, run_id, parties.logs / "serverapp.log")

    if status != _COMPLETED or not metrics_file.is_file():
        raise DeploymentError(
            f"run {run_id} ended as {status!r}"
            + ("" if metrics_file.is_file() else f" without {metrics_file}")
            + f"; logs in {parties.logs}:\n{procs.tail('serverapp', 30)}"
        )
    return DeploymentResult(
        run_id=run_id,
        status=status,
        run_dir=parties.run_dir,
        hospital_dirs=[folder / "output" for folder in parties.hospitals],
        metrics=json.loads(metrics_file.read_text()),
        seconds=seconds,
        logs_dir=parties.logs,
    )
