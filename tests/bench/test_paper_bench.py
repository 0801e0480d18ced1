"""``fedcrypt bench paper --quick``: every experiment runs and sits beside the paper's figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_paper_bench_writes_its_tables(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli.main", "bench", "paper", "--quick",
         "--out", str(tmp_path / "p")],
        env=env, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "p" / "paper.json").read_text())
    (row,) = data["table_ii"]
    assert row["batch_size"] == 32 and row["paper_accuracy_he"] == pytest.approx(0.874)
    assert 0.5 < row["accuracy_he"] <= 1 and 0.5 < row["centralised_accuracy"] <= 1
    assert [r["he_preset"] for r in data["keys"]["runs"]] == ["paper-heavy", "paper-light"]
    fractions = [r["encrypted_fraction"] for r in data["layers"]["runs"]]
    assert fractions[0] < fractions[1] <= 1.0  # last < last:4
    assert data["fig9"]["hospitals"] == 4 and math.isfinite(data["fig9"]["round_seconds_he"])
    assert data["roc"]["he"]["fpr"] and data["roc"]["plain"]["fpr"]
    assert (tmp_path / "p" / "paper-table2-roc.png").is_file()
    assert "Table II" in proc.stdout and "Fig. 9" in proc.stdout
