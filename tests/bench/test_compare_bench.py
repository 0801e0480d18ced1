"""Smoke test of ``fedcrypt bench compare``: secagg and Flower's SecAgg+ on the embedded table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcrypt.bench.compare import Options, run_compare

pytestmark = pytest.mark.slow


def test_quick_compare_writes_table_json_and_plot(tmp_path: Path) -> None:
    opts = Options.for_quick()
    opts.modes = ("secagg", "flower-secagg+")
    payload = run_compare(tmp_path, options=opts)
    data = json.loads((tmp_path / "compare.json").read_text())
    assert (tmp_path / "compare.png").is_file()
    by_mode = {r["mode"]: r for r in data["results"]}
    assert set(by_mode) == {"secagg", "flower-secagg+"}
    for mode, res in by_mode.items():
        assert res["status"] == "ok", (mode, res["error"])
        (rnd,) = res["rounds"]
        assert rnd["bytes_up"] > 0 and rnd["wall_seconds"] > 0
        assert res["auc"] > 0.9
    # secagg sends ~4 bytes per value; Flower's SecAgg+ more
    assert (
        by_mode["secagg"]["rounds"][0]["bytes_up"]
        < by_mode["flower-secagg+"]["rounds"][0]["bytes_up"]
    )
    assert payload["png"]
