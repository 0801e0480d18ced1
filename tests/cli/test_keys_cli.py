"""Tests for ``fedcrypt keys generate`` and ``fedcrypt keys info``."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from fedcrypt.cli.main import main


def _run(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["fedcrypt", *args])
    with pytest.raises(SystemExit) as info:
        main()
    code = info.value.code
    return int(code) if code is not None else 0


def test_generate_and_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert _run(["keys", "generate", "--out", str(out)], monkeypatch) == 0
    hospital = out / "hospital.key"
    assert stat.S_IMODE(hospital.stat().st_mode) == 0o600
    assert (out / "server.key").is_file()
    capsys.readouterr()
    assert _run(["keys", "info", str(hospital)], monkeypatch) == 0
    text = capsys.readouterr().out
    assert "hospital-secret" in text
    assert "secret key" in text and "yes" in text
    assert _run(["keys", "info", str(out / "server.key")], monkeypatch) == 0
    text = capsys.readouterr().out
    assert "server-public" in text and "no" in text


def test_generate_refuses_existing_then_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert _run(["keys", "generate", "--out", str(out)], monkeypatch) == 0
    capsys.readouterr()
    assert _run(["keys", "generate", "--out", str(out)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and err.count("\n") == 1
    assert _run(["keys", "generate", "--out", str(out), "--force"], monkeypatch) == 0


def test_insecure_custom_preset_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(
        ["keys", "generate", "--out", str(tmp_path / "k"), "--he-preset", "custom:4096:60,60:40"],
        monkeypatch,
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "128-bit" in err and "Traceback" not in err
    assert not (tmp_path / "k" / "hospital.key").exists()


def test_unknown_preset_and_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["keys", "generate", "--out", str(tmp_path), "--he-preset", "x"], monkeypatch) == 2
    assert "valid presets" in capsys.readouterr().err
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"junk")
    assert _run(["keys", "info", str(bad)], monkeypatch) == 2
    assert "key file" in capsys.readouterr().err
