"""The public Python API and ``--task``: a hospital's own model and data, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedcrypt
from fedcrypt.exceptions import ConfigError
from fedcrypt.protection.he.keys import write_key_files

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "wdbc_task.py"


def _fedcrypt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_python_api_runs_a_task_object_with_he(tmp_path: Path) -> None:
    sys.path.insert(0, str(FIXTURE.parent))
    try:
        import wdbc_task  # the user's module, imported as they would
    finally:
        sys.path.remove(str(FIXTURE.parent))
    result = fedcrypt.simulate(
        wdbc_task.task, protection="he", clients=3, rounds=2, out=tmp_path / "run"
    )
    assert result.final["auc"] >= 0.95
    cfg = result.metrics["config"]
    assert (cfg["protection"], cfg["he_preset"], cfg["model"], cfg["lr"]) == (
        "he",
        "packed",
        "TinyNet",
        1e-2,
    )
    assert cfg["task"].endswith("wdbc_task.py:task")
    assert result.metrics["info"]["task"] == "my-study"
    assert (result.run_dir / "model.pt").is_file()


@pytest.mark.slow
def test_cli_runs_a_task_file_with_secagg(tmp_path: Path) -> None:
    proc = _fedcrypt(
        "simulate", "--task", f"{FIXTURE}:task", "--protection", "secagg", "--rounds", "2",
        "--out", str(tmp_path / "run"), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["auc"] >= 0.95
    assert metrics["config"]["protection"] == "secagg"
    assert metrics["config"]["he_preset"] is None  # not an HE run


@pytest.mark.slow
def test_ckks_still_runs_and_warns(tmp_path: Path) -> None:
    proc = _fedcrypt(
        "simulate", "--protection", "ckks", "--rounds", "1", "--out", str(tmp_path / "run"),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" in proc.stderr and "--protection he" in proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["protection"] == "he"


def test_keys_of_another_preset_exit_2(tmp_path: Path) -> None:
    write_key_files(tmp_path / "keys", preset="packed")
    proc = _fedcrypt(
        "simulate", "--keys", str(tmp_path / "keys"), "--he-preset", "fast", cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'packed'" in lines[0] and "fast" in lines[0]


def test_keys_are_refused_under_secagg(tmp_path: Path) -> None:
    write_key_files(tmp_path / "keys", preset="fast")
    proc = _fedcrypt(
        "simulate", "--keys", str(tmp_path / "keys"), "--protection", "secagg", cwd=tmp_path
    )
    assert proc.returncode == 2 and "--keys" in proc.stderr


def test_a_bad_task_exits_2_before_any_round(tmp_path: Path) -> None:
    bad = tmp_path / "bad_task.py"
    bad.write_text(
        "import torch, fedcrypt\n"
        "from torch.utils.data import TensorDataset\n"
        "def datasets(h, n, s):\n"
        "    return fedcrypt.HospitalDatasets(\n"
        "        train=TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)))\n"
        "task = fedcrypt.Task(name='bad', model=lambda: torch.nn.Linear(3, 2), datasets=datasets)\n"
    )
    proc = _fedcrypt("simulate", "--task", f"{bad}:task", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "fails on a batch" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_simulate_refuses_a_non_task() -> None:
    with pytest.raises(TypeError):
        fedcrypt.simulate(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min-hospitals"):
        fedcrypt.simulate(None, clients=2, min_hospitals=3)
