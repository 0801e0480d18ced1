"""Smoke test for ``fedcrypt bench he`` (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcrypt.bench.he import TABLE_I, Options, measure, run_he
from fedcrypt.protection.he.params import check_security


def test_table_i_configurations_are_secure() -> None:
    assert len(TABLE_I) == 10
    for cfg in TABLE_I:
        check_security(cfg.poly_modulus_degree, cfg.coeff_mod_bit_sizes)


def test_quick_run_writes_json_and_png(tmp_path: Path) -> None:
    opts = Options.for_quick()
    opts.values = 9000
    opts.paper_values = 3
    opts.fig_sizes = [100]
    lines: list[str] = []
    result = run_he(tmp_path, options=opts, log=lines.append)
    data = json.loads((tmp_path / "he.json").read_text())
    assert lines
    assert len(data["table_i"]) == 2 and data["table_i"][0]["extrapolated"]
    assert set(data["figures"]) == {"paper", "nvflare", "ours"}
    methods = [r["method"] for r in data["side_by_side"]]
    assert {"paper", "nvflare", "packed", "plain"} <= set(methods)
    ours = next(r for r in data["side_by_side"] if r["method"] == "packed")
    assert ours["protect_s_ratio"] == 1.0
    assert ours["max_error"] < 1e-3
    assert {g["goal"] for g in data["goals"]} >= {"server adds 10 updates, s"}
    for png in result["png"]:
        assert Path(png).stat().st_size > 1000


def test_isolated_measurement_reports_peak_memory(tmp_path: Path) -> None:
    out = tmp_path / "u.bin"
    r = measure(
        {
            "kind": "protect",
            "preset": "plain",
            "key_dir": str(tmp_path),
            "values": 1000,
            "out": str(out),
        },
        isolate=True,
    )
    assert r["peak_bytes"] >= r["baseline_bytes"] > 10_000_000
    assert out.stat().st_size == r["bytes"]
    with pytest.raises(RuntimeError, match="failed"):
        measure(
            {
                "kind": "protect",
                "preset": "nope",
                "key_dir": str(tmp_path),
                "values": 1,
                "out": str(out),
            },
            isolate=True,
        )
