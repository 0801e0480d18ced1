"""``fedcrypt bench privacy``: the server's inversion works on plain updates only, with the
real protection objects; DP targets are checked up front; the command writes its files."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedcrypt.bench.privacy import Options, inversion_bench, judge, run_privacy
from fedcrypt.cli.main import main
from fedcrypt.exceptions import ConfigError

#: See tests/privacy/test_inversion.py: above 18 dB a 28x28 image is recognisable.
RECOGNISABLE_DB = 18.0


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(shared_data: Path) -> Options:
    return Options(
        data_dir=shared_data,
        inversion_images=(1,),
        inversion_iterations=150,
        inversion_restarts=1,
        model="mlp",
        examples_per_hospital=16,
        rounds=2,
        local_epochs=3,
        shadows=0,
    )


def test_inversion_succeeds_on_plain_and_fails_on_he_and_secagg(shared_data: Path) -> None:
    rows, images = inversion_bench(_tiny(shared_data), lambda _m: None)
    by = {r["protection"]: r for r in rows}
    assert set(by) == {"plain", "he", "secagg"}
    assert by["plain"]["psnr"] > RECOGNISABLE_DB
    for mode in ("he", "secagg"):
        assert by[mode]["psnr"] < RECOGNISABLE_DB - 5, mode
        assert by[mode]["psnr"] <= by["plain"]["psnr"] - 5.0, mode
        assert by[mode]["ssim"] < by["plain"]["ssim"] - 0.3, mode
    # the server really received protected bytes: ciphertext is larger than the plain update
    assert by["he"]["received_bytes"] > by["plain"]["received_bytes"]
    assert images["1"]["truth"].shape == images["1"]["plain"].shape == (1, 1, 28, 28)


def test_judge_flags_a_failed_claim() -> None:
    payload = {
        "gradient_inversion": [
            {"protection": "plain", "images": 1, "psnr": 20.0},
            {"protection": "he", "images": 1, "psnr": 17.0},
        ],
        "membership_inference": [
            {"attack": "loss-threshold", "dp": False, "auc": 0.6},
            {"attack": "loss-threshold", "dp": True, "auc": 0.65},
        ],
    }
    assert [c["ok"] for c in judge(payload)] == [False, False]


def test_unreachable_dp_target_is_refused_before_any_work(
    tmp_path: Path, shared_data: Path
) -> None:
    opts = _tiny(shared_data)
    opts.dp_epsilon = 1e-5
    with pytest.raises(ConfigError, match="cannot reach"):
        run_privacy(tmp_path, options=opts)
    assert not (tmp_path / "privacy.json").exists()


def test_cli_reports_bad_input_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fedcrypt", "bench", "privacy", "--quick", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*args, "--data-dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "breastmnist" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_run_writes_json_rows_and_figures(tmp_path: Path, shared_data: Path) -> None:
    payload = run_privacy(tmp_path, options=_tiny(shared_data))
    data = json.loads((tmp_path / "privacy.json").read_text())
    assert {r["protection"] for r in data["gradient_inversion"]} == {"plain", "he", "secagg"}
    assert all({"protection", "psnr", "ssim"} <= set(r) for r in data["gradient_inversion"])
    mia = data["membership_inference"]
    assert {r["dp"] for r in mia} == {False, True}
    assert all({"dp", "epsilon", "auc"} <= set(r) for r in mia)
    (with_dp,) = [r for r in mia if r["dp"]]
    assert 0 < with_dp["epsilon"] <= 4.0 and with_dp["delta"] == 1e-3
    assert data["capabilities"] and data["threat_model"] == "DESIGN.md §2"
    assert [Path(p).name for p in payload["png"]] == [
        "privacy-inversion.png",
        "privacy-membership.png",
    ]
    assert all(Path(p).stat().st_size > 1000 for p in payload["png"])
