"""``fedcrypt portal decrypt`` refuses a corrupted HE aggregate with an integrity error.

The judged criterion of issue 9: a flipped byte in a ``packed`` or a ``fast``
ciphertext makes ``fedcrypt portal decrypt AGG --like state.pt --out x.pt --key
hospital.key`` exit non-zero with an integrity error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcrypt.cli.main import main
from fedcrypt.protection import wire
from fedcrypt.protection.flatten import flatten
from fedcrypt.protection.he import keys


def _run(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["fedcrypt", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_flipped_byte_makes_portal_decrypt_fail(
    preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir = tmp_path / "keys"
    keys.write_key_files(key_dir, preset=preset)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 2),
    )
    model(torch.randn(8, 1, 8, 8))
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    updates = []
    for i, n in enumerate((10, 30)):
        out = tmp_path / f"u{i}.fcry"
        code, _, err = _run(
            [
                "portal",
                "protect",
                str(state),
                "-o",
                str(out),
                "--num-examples",
                str(n),
                "--key",
                str(key_dir / "hospital.key"),
                "--round",
                "2",
                "--run",
                "fed-1",
            ],
            monkeypatch,
            capsys,
        )
        assert code == 0, err
        updates.append(out.read_bytes())
    server = keys.load_server(key_dir / "server.key")
    agg = tmp_path / "agg.fcry"
    agg.write_bytes(server.aggregate(updates))
    decrypt = [
        "portal",
        "decrypt",
        str(agg),
        "--like",
        str(state),
        "--out",
        str(tmp_path / "x.pt"),
        "--key",
        str(key_dir / "hospital.key"),
    ]
    code, out, err = _run(decrypt, monkeypatch, capsys)
    assert code == 0, err
    assert "2 updates over 40 examples" in out
    np.testing.assert_allclose(
        flatten(torch.load(tmp_path / "x.pt", weights_only=True)),
        flatten(model.state_dict()),
        atol=1e-3,
    )
    # a replay check with --round
    code, _, err = _run([*decrypt, "--round", "3", "--run", "fed-1"], monkeypatch, capsys)
    assert code != 0 and "round 2" in err and "expected round 3" in err
    # one flipped byte in the ciphertexts, at a few places
    env = wire.unpack(agg.read_bytes())
    start = len(agg.read_bytes()) - sum(len(s) for s in env.sections[-2:]) - 8
    for where in (0.1, 0.5, 0.9):
        data = bytearray(agg.read_bytes())
        data[start + 8 + int(where * len(env.sections[-2]))] ^= 0x01
        bad = tmp_path / "bad.fcry"
        bad.write_bytes(bytes(data))
        code, _, err = _run([*decrypt[:2], str(bad), *decrypt[3:]], monkeypatch, capsys)
        assert code != 0
        assert "integrity" in err and "round 2" in err, err
        assert len(err.strip().splitlines()) == 1
