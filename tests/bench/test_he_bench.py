"""Smoke test for ``fedcrypt bench he`` (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcrypt.bench.he import TABLE_I, Options, measure, run_he
from fedcrypt.protection.he.params import check_security


def test_table_i_is_the_papers_and_secure() -> None:
    """The ten parameter sets of Lessage et al.'s Table I, with its published figures."""
    assert len(TABLE_I) == 10
    for cfg in TABLE_I:
        check_security(cfg.poly_modulus_degree, cfg.coeff_mod_bit_sizes)
    first, last = TABLE_I[0], TABLE_I[-1]
    assert (first.poly_modulus_degree, first.coeff_mod_bit_sizes) == (32768, (60, *[40] * 8, 60))
    assert (first.values, first.paper_s) == (12_000, 301)
    assert (last.poly_modulus_degree, last.coeff_mod_bit_sizes, last.scale_bits) == (
        4096,
        (30, 20, 30),
        20,
    )
    assert (last.values, last.paper_s) == (683_000, 428)


def test_quick_run_writes_json_and_png(tmp_path: Path) -> None:
    opts = Options.for_quick()
    opts.values = 6 * 8186  # six full ciphertexts of 2 x 4093 values
    opts.paper_values = 3
    opts.fig_sizes = [100]
    lines: list[str] = []
    result = run_he(tmp_path, options=opts, log=lines.append)
    data = json.loads((tmp_path / "he.json").read_text())
    assert lines
    assert len(data["table_i"]) == 2 and data["table_i"][0]["extrapolated"]
    row = data["table_i"][0]
    assert row["paper_s"] == 346 and row["seeded_bytes"] < row["vector_bytes"]
    assert set(data["figures"]) == {"paper", "nvflare", "ours"}
    rows = {r["method"]: r for r in data["side_by_side"]}
    assert {"paper", "nvflare-ref", "packed", "compact", "plain"} <= set(rows)
    ours = rows["packed"]
    assert ours["protect_s_ratio"] == 1.0
    assert ours["max_error"] < 1e-3
    # seeded ciphertexts: below float32 plaintext, far below the NVIDIA FLARE reference
    assert (
        ours["bytes_per_param"]
        < 4.0
        < 14 * ours["bytes_per_param"]
        < rows["nvflare-ref"]["bytes_per_param"]
    )
    assert rows["plain"]["bytes_per_param"] < 4.1
    assert ours["bytes_down_per_param"] >= ours["bytes_per_param"]
    real = data["real_aggregation"][0]
    assert real["preset"] == "packed" and real["values_above_bound"] == 0
    assert real["max_tensor_rel_error"] < 1e-4
    assert {g["goal"] for g in data["goals"]} >= {"upload bytes per parameter (default preset)"}
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
