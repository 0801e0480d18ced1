"""Tests for ``fedcrypt keys generate --protection secagg``."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from fedcrypt.cli.main import main
from fedcrypt.protection.secagg import keys as sk


def _run(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["fedcrypt", *args])
    with pytest.raises(SystemExit) as info:
        main()
    code = info.value.code
    return int(code) if code is not None else 0


def test_generate_secagg_writes_a_consortium_and_says_who_holds_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "consortium"
    args = ["keys", "generate", "--protection", "secagg", "--hospitals", "4", "--out", str(out)]
    assert _run(args, monkeypatch) == 0
    text = capsys.readouterr().out
    assert "who holds what" in text and "never the server" in text
    reg = sk.load_registry(out / "registry.pub")
    assert reg.hospital_ids == (0, 1, 2, 3)
    assert reg.fingerprint in text.replace("\n", "")
    for hid in range(4):
        assert stat.S_IMODE((out / f"hospital-{hid}.key").stat().st_mode) == 0o600
        assert sk.load_identity(out / f"hospital-{hid}.key").hospital_id == hid
    assert stat.S_IMODE((out / "group-mask.key").stat().st_mode) == 0o600
    # again without --force: one line, exit 2
    assert _run(args, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and err.count("\n") == 1


def test_generate_secagg_without_group_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["keys", "generate", "--protection", "secagg", "--hospitals", "2", "--no-group-mask"]
    assert _run([*args, "--out", str(tmp_path)], monkeypatch) == 0
    assert "group mask OFF" in capsys.readouterr().out
    assert not (tmp_path / "group-mask.key").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--protection", "secagg"], "needs --hospitals"),
        (["--protection", "secagg", "--hospitals", "1"], "--hospitals"),
        (["--hospitals", "3"], "secagg only"),
        (["--protection", "plain"], "he or secagg"),
    ],
)
def test_generate_bad_options_are_one_line_errors(
    extra: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _run(["keys", "generate", "--out", str(tmp_path), *extra], monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err
