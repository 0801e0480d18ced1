"""``fedcrypt bench rounds --quick``: plain and he of one federation, their ratio, JSON+PNG."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_rounds_bench_writes_ratio(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli.main", "bench", "rounds", "--quick",
         "--out", str(tmp_path / "b")],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "b" / "rounds.json").read_text())
    (row,) = data["rows"]
    assert row["model"] == "mlp" and row["hospitals"] == 3
    assert row["plain_round_seconds"] > 0 and row["he_round_seconds"] > 0
    assert math.isclose(row["ratio"], row["he_round_seconds"] / row["plain_round_seconds"])
    assert row["he"]["bytes_up_per_client"] > row["plain"]["bytes_up_per_client"] > 0
    assert (tmp_path / "b" / "rounds.png").stat().st_size > 1000
    assert "he/plain" in proc.stdout
