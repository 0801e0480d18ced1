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

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcrypt.exceptions import DeploymentError
from fedcrypt.protection.registry import get_scheme

log = logging.getLogger(__name__)

#: Name of the SuperLink connection written to the operator's ``config.toml``.
CONNECTION = "fedcrypt-local"
HOST = "127.0.0.1"
_TERMINAL = "finished"
_COMPLETED = "finished:completed"
_MARKER = "FEDCRYPT_DEPLOYMENT"
_STATUS_EVERY = 10.0  # seconds between run-status queries while the run goes on

ConfigValue = str | int | float | bool


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
def _write_secret(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new file readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a local TLS setup.

    Attributes
    ----------
    ca_cert : Path
        The CA certificate every party trusts.
    server_cert, server_key : Path
        The SuperLink's certificate (SAN ``IP:127.0.0.1``, ``DNS:localhost``) and its
        private key (0600).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(out_dir: Path, *, days: int = 2) -> TlsFiles:
    """Create a throw-away CA and a SuperLink certificate for 127.0.0.1.

    Parameters
    ----------
    out_dir : Path
        Folder for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` (created).
    days : int
        Validity of both certificates in days (default: 2).

    Returns
    -------
    TlsFiles
    """
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcrypt local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write_secret(out_dir / "ca.key", _pem_key(ca_key))
    (out_dir / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (out_dir / "server.crt").write_bytes(server_cert.public_bytes(pem))
    _write_secret(out_dir / "server.key", _pem_key(server_key))
    return TlsFiles(out_dir / "ca.crt", out_dir / "server.crt", out_dir / "server.key")


def make_node_key_pair(out_dir: Path, name: str = "supernode") -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair (NIST P-384, OpenSSH format).

    Parameters
    ----------
    out_dir : Path
        Folder for ``<name>`` (private key, 0600) and ``<name>.pub`` (created).
    name : str
        File name of the private key (default: ``supernode``).

    Returns
    -------
    tuple of Path
        ``(private_key, public_key)`` for ``flower-supernode
        --auth-supernode-private-key`` and ``flwr supernode register``.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write_secret(
        out_dir / name,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = out_dir / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


# -- processes -----------------------------------------------------------------------------
def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; else IANA's)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range.

    A port the kernel hands out with ``bind(0)`` can be taken by an outgoing
    connection (the SuperNodes open many) before the server that is meant to listen
    on it starts, so ports are picked at random below the ephemeral range.
    """
    low, high = _ephemeral_ports()
    first, last = (10_000, low - 1) if low > 11_000 else (high + 1, 65_535)
    rng = random.SystemRandom()
    for _ in range(200 if first < last else 0):
        port = rng.randint(first, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    """Path of a Flower console script, preferring this interpreter's environment."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"'{name}' not found: install flwr in this environment")
    return found


def _toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run config values must be finite, got {value!r}")
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _node_config(values: Mapping[str, ConfigValue]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


@dataclass
class _Processes:
    """Long-running processes of the deployment, each in its own process group.

    Every process gets ``FEDCRYPT_DEPLOYMENT=<token>`` in its environment, which its
    descendants inherit; :meth:`stop_all` uses it to also find the processes that
    leave the group (the SuperLink starts its SuperExec in a new session, and the
    ServerApp process below it outlives the SuperLink by a while).
    """

    base_env: dict[str, str]
    logs_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    def env(self, flwr_home: Path) -> dict[str, str]:
        """The environment of a process whose Flower home is ``flwr_home``."""
        return {**self.base_env, "FLWR_HOME": str(flwr_home), _MARKER: self.token}

    def start(self, name: str, args: list[str], *, env: dict[str, str], cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.logs_dir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(  # noqa: S603 (fixed argv, no shell)
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.debug("started %s (pid %d): %s", name, self.procs[name].pid, " ".join(args))

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DeploymentError(
                    f"{name} exited with status {proc.returncode}; see "
                    f"{self.logs_dir / (name + '.log')}:\n{self.tail(name)}"
                )

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs_dir / f"{name}.log"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after ``grace`` s."""
        for proc in reversed(list(self.procs.values())):  # SuperNodes first
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            # Kill the whole group even if its leader has exited: children
            # (SuperExec, ServerApp/ClientApp processes) may outlive it.
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        deadline = time.monotonic() + grace
        while True:
            strays = _marked_processes(self.token)
            for pid in strays:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not strays and not any(_group_exists(proc) for proc in self.procs.values()):
                return
            if time.monotonic() > deadline:
                log.warning("some processes of the deployment did not exit: %s", strays)
                return
            time.sleep(0.1)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group ID is the leader's PID


def _marked_processes(token: str) -> list[int]:
    """PIDs of live processes whose environment holds ``FEDCRYPT_DEPLOYMENT=token``.

    Linux only (``/proc``); elsewhere an empty list.
    """
    needle = f"{_MARKER}={token}".encode()
    found: list[int] = []
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return found
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def _group_exists(proc: subprocess.Popen[bytes]) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_port(port: int, procs: _Processes, deadline: float) -> None:
    while True:
        procs.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((HOST, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise DeploymentError(f"the SuperLink did not listen on {HOST}:{port} in time")
        time.sleep(0.3)


class _Flwr:
    """The operator's ``flwr`` CLI, talking to the SuperLink over TLS."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.exe = _tool("flwr")

    def raw(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``flwr <args>`` and return the finished process (output captured)."""
        try:
            return subprocess.run(  # noqa: S603 (fixed argv, no shell)
                [self.exe, *args],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"'flwr {args[0]}' timed out after {timeout:.0f} s") from exc

    def __call__(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr <args> --format json`` and return its JSON answer."""
        done = self.raw(*args, "--format", "json", timeout=timeout)
        answer = _last_json(done.stdout)
        if done.returncode != 0 or answer is None or answer.get("success") is False:
            detail = (answer or {}).get("error-message") or (done.stderr or done.stdout).strip()
            raise DeploymentError(f"'flwr {' '.join(args)}' failed: {detail[-2000:]}")
        return answer


def _last_json(text: str) -> dict[str, Any] | None:
    """The JSON object printed by ``flwr ... --format json`` (it may follow other lines)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


@contextlib.contextmanager
def _processes(base_env: dict[str, str], logs_dir: Path) -> Iterator[_Processes]:
    procs = _Processes(base_env=base_env, logs_dir=logs_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in list(env):  # leave no Flower settings of the caller in the children
        if key.startswith("FLWR_"):
            del env[key]
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec is looked up on PATH
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    # Many processes on few cores: one thread each keeps them from starving each other.
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(key, "1")
    return env


# -- the whole deployment ------------------------------------------------------------------
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
        """Make the folders, the TLS files and (``ckks``) distribute fresh CKKS keys.

        As a consortium would: the CA certificate to everyone, the SuperLink's TLS key
        to the server, ``hospital.key`` (secret) to the hospitals only and
        ``server.key`` (public) to the server only.
        """
        for folder in (self.logs, self.server, self.operator, *self.hospitals):
            folder.mkdir(parents=True, exist_ok=True)
        tls = make_tls_files(self.work_dir / "ca")
        for folder in (self.server, self.operator, *self.hospitals):
            shutil.copyfile(tls.ca_cert, folder / "ca.crt")
        (self.server / "tls").mkdir(exist_ok=True)
        shutil.copyfile(tls.server_cert, self.server / "tls" / "server.crt")
        _write_secret(self.server / "tls" / "server.key", tls.server_key.read_bytes())
        if not get_scheme(protection).key_files:
            return
        from fedcrypt.protection.he.keys import write_key_files
        from fedcrypt.protection.he.params import DEFAULT_PRESET

        ceremony = self.work_dir / "consortium"
        hospital_key, server_key = write_key_files(ceremony, preset=he_preset or DEFAULT_PRESET)
        for folder in self.hospitals:
            _write_secret(folder / "hospital.key", hospital_key.read_bytes())
        shutil.copyfile(server_key, self.server / "server.key")
        shutil.rmtree(ceremony)

    def hospital_key(self, i: int) -> Path | None:
        path = self.hospitals[i] / "hospital.key"
        return path if path.is_file() else None

    def server_key(self) -> Path | None:
        path = self.server / "server.key"
        return path if path.is_file() else None


def _superlink_argv(parties: _Parties, port: int) -> list[str]:
    tls = parties.server / "tls"
    return [
        _tool("flower-superlink"),
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
    if data_dir is not None:
        node["data-dir"] = str(data_dir)
    return [
        _tool("flower-supernode"),
        "--root-certificates", str(folder / "ca.crt"),
        "--superlink", f"{HOST}:{port}",
        "--auth-supernode-private-key", str(private_key),
        "--node-config", _node_config(node),
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
        f"root-certificates = {_toml_value(str(parties.operator / 'ca.crt'))}\n"
    )
    run_config = parties.operator / "run-config.toml"
    run_config.write_text(
        "".join(f"{key} = {_toml_value(value)}\n" for key, value in overrides.items())
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
    protection : {"he", "plain"}
        Protection mode (default: ``he``); ``he`` creates fresh keys.
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
    if get_scheme(protection).staged:
        raise ValueError(
            f"protection {protection!r} is not supported on the deployment harness yet"
        )
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
    if he_preset:
        overrides["he-preset"] = he_preset
    overrides.update(run_config or {})
    operator_home, run_config_file = _write_operator_files(parties, port=port, overrides=overrides)

    with _processes(_base_env(), parties.logs) as procs:
        procs.start(
            "superlink",
            _superlink_argv(parties, port),
            env=procs.env(parties.server / "flwr-home"),
            cwd=parties.server,
        )
        _wait_for_port(port, procs, deadline)
        flwr = _Flwr(procs.env(operator_home), parties.operator)
        keys = [make_node_key_pair(folder / "auth") for folder in parties.hospitals]
        with ThreadPoolExecutor(max_workers=min(8, clients)) as pool:
            registrations = [
                pool.submit(
                    _register, flwr, public, name=f"hospital-{i}", procs=procs, deadline=deadline
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
            status = _wait_for_run(
                flwr, run_id, procs=procs, deadline=deadline, done_file=metrics_file
            )
        finally:
            seconds = time.monotonic() - started
            if status != _COMPLETED:
                _save_run_log(flwr, run_id, parties.logs / "serverapp.log")

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


def _register(
    flwr: _Flwr, public_key: Path, *, name: str, procs: _Processes, deadline: float
) -> None:
    """``flwr supernode register``, retried while the SuperLink is still starting."""
    while True:
        try:
            flwr("supernode", "register", str(public_key), CONNECTION, "--name", name)
            return
        except DeploymentError:
            procs.check_alive()
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _save_run_log(flwr: _Flwr, run_id: int, path: Path) -> None:
    """Save the ServerApp's log (``flwr log --show``); best effort, never raises."""
    try:
        done = flwr.raw("log", str(run_id), CONNECTION, "--show", timeout=60.0)
        path.write_text(done.stdout + done.stderr)
    except (DeploymentError, OSError) as exc:
        log.warning("could not fetch the log of run %d: %s", run_id, exc)


def _wait_for_run(
    flwr: _Flwr, run_id: int, *, procs: _Processes, deadline: float, done_file: Path
) -> str:
    """Wait until the run has finished and return its status (``flwr ls --run-id``).

    Every ``flwr`` call starts a Python process, so the status is asked for every
    ``_STATUS_EVERY`` seconds only, and once a second after ``done_file`` appears.
    """
    status, asked = "pending", -math.inf
    while True:
        procs.check_alive()
        now = time.monotonic()
        if done_file.is_file() or now - asked >= _STATUS_EVERY:
            asked = now
            answer = flwr("ls", CONNECTION, "--run-id", str(run_id))
            runs = answer.get("runs") or []
            status = str(runs[0].get("status", status)) if runs else status
            if status.startswith(_TERMINAL):
                return status
        if now > deadline:
            raise DeploymentError(f"run {run_id} still {status!r} at the timeout")
        time.sleep(1.0)
