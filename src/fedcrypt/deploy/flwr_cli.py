"""The ``flwr`` CLI as the operator uses it: config values, SuperNode registration, run status."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcrypt.deploy.processes import ConfigValue, Processes
from fedcrypt.exceptions import DeploymentError

log = logging.getLogger(__name__)
_STATUS_EVERY = 10.0  # seconds between run-status queries while the run goes on
_COMPLETED = "finished:completed"
_TERMINAL = "finished"
#: Name of the SuperLink connection written to the operator's ``config.toml``.
CONNECTION = "fedcrypt-local"


def tool(name: str) -> str:
    """Path of a Flower console script, preferring this interpreter's environment."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"'{name}' not found: install flwr in this environment")
    return found


def toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run config values must be finite, got {value!r}")
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_config(values: Mapping[str, ConfigValue]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


class Flwr:
    """The operator's ``flwr`` CLI, talking to the SuperLink over TLS."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.exe = tool("flwr")

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
        answer = last_json(done.stdout)
        if done.returncode != 0 or answer is None or answer.get("success") is False:
            detail = (answer or {}).get("error-message") or (done.stderr or done.stdout).strip()
            raise DeploymentError(f"'flwr {' '.join(args)}' failed: {detail[-2000:]}")
        return answer


def last_json(text: str) -> dict[str, Any] | None:
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


def register(flwr: Flwr, public_key: Path, *, name: str, procs: Processes, deadline: float) -> None:
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


def save_run_log(flwr: Flwr, run_id: int, path: Path) -> None:
    """Save the ServerApp's log (``flwr log --show``); best effort, never raises."""
    try:
        done = flwr.raw("log", str(run_id), CONNECTION, "--show", timeout=60.0)
        path.write_text(done.stdout + done.stderr)
    except (DeploymentError, OSError) as exc:
        log.warning("could not fetch the log of run %d: %s", run_id, exc)


def wait_for_run(
    flwr: Flwr, run_id: int, *, procs: Processes, deadline: float, done_file: Path
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
