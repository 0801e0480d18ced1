"""``fedcrypt simulate`` refuses bad input with one stderr line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcrypt.protection.he.keys import write_key_files


def _fedcrypt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
        check=False,
    )


def _assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--dataset", "nosuchset"], ["nosuchset"]),
        (["--model", "resnet"], ["resnet"]),
        (["--protection", "rsa"], ["protection"]),
        (["--clients", "0"], ["clients"]),
        (["--he-preset", "no-such-preset"], ["no-such-preset"]),
    ],
)
def test_unknown_choices(args: list[str], needles: list[str], tmp_path: Path) -> None:
    _assert_user_error(_fedcrypt("simulate", *args, cwd=tmp_path), *needles)


def test_missing_and_corrupt_npz(tmp_path: Path) -> None:
    proc = _fedcrypt(
        "simulate", "--dataset", "breastmnist", "--data-dir", str(tmp_path), cwd=tmp_path
    )
    _assert_user_error(proc, "breastmnist.npz")
    (tmp_path / "breastmnist.npz").write_bytes(b"this is not a zip archive")
    proc = _fedcrypt(
        "simulate", "--dataset", "breastmnist", "--data-dir", str(tmp_path), cwd=tmp_path
    )
    _assert_user_error(proc, "breastmnist.npz")


def test_key_files_from_different_contexts(tmp_path: Path) -> None:
    hospital_a, _ = write_key_files(tmp_path / "a")
    _, server_b = write_key_files(tmp_path / "b")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "hospital.key").write_bytes(hospital_a.read_bytes())
    (mixed / "hospital.key").chmod(0o600)
    (mixed / "server.key").write_bytes(server_b.read_bytes())
    proc = _fedcrypt("simulate", "--keys", str(mixed), cwd=tmp_path)
    _assert_user_error(proc, "different key contexts")


def test_key_file_that_does_not_deserialize(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_key_files(keys)
    (keys / "server.key").write_bytes(b"FCRY garbage that is not a key file")
    _assert_user_error(_fedcrypt("simulate", "--keys", str(keys), cwd=tmp_path), "server.key")
