"""Processes of a local deployment: free ports, process groups, clean shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedcrypt.exceptions import DeploymentError

log = logging.getLogger(__name__)
ConfigValue = str | int | float | bool
_MARKER = "FEDCRYPT_DEPLOYMENT"
HOST = "127.0.0.1"


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


@dataclass
class Processes:
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
            strays = marked_processes(self.token)
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


def marked_processes(token: str) -> list[int]:
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


def wait_for_port(port: int, procs: Processes, deadline: float) -> None:
    while True:
        procs.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((HOST, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise DeploymentError(f"the SuperLink did not listen on {HOST}:{port} in time")
        time.sleep(0.3)


@contextlib.contextmanager
def started_processes(base_env: dict[str, str], logs_dir: Path) -> Iterator[Processes]:
    procs = Processes(base_env=base_env, logs_dir=logs_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


def base_env() -> dict[str, str]:
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
