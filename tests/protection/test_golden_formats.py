"""Golden-file tests: formats other parties depend on must not change under a refactor.

The files in ``tests/golden`` were written by ``tests/golden/make_golden.py`` with the
code of 2026-12-01. Key files outlive any release (hospitals keep them for a whole
study), so every later version must load them, recompute the same fingerprint and
decrypt what they encrypted.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcrypt.exceptions import KeyMaterialError
from fedcrypt.protection import wire
from fedcrypt.protection.plain import PlainAggregator, PlainHospital

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import EXAMPLES, golden_vectors  # noqa: E402

INFO = json.loads((GOLDEN / "golden.json").read_text())


def _expected_mean() -> np.ndarray:
    a, b = golden_vectors()
    n1, n2 = EXAMPLES
    return (n1 * a + n2 * b) / (n1 + n2)


def _keys():  # type: ignore[no-untyped-def]
    from fedcrypt.protection.he import keys  # the module path may move; the format may not

    return keys


def test_envelope_bytes_are_stable() -> None:
    data = (GOLDEN / "envelope.bin").read_bytes()
    assert wire.pack({"scheme": "test", "n": 1, "s": "é"}, [b"", b"abc", bytes(range(256))]) == data
    env = wire.unpack(data)
    assert env.header == {"scheme": "test", "n": 1, "s": "é"}
    assert [bytes(s) for s in env.sections] == [b"", b"abc", bytes(range(256))]


def test_plain_messages_still_read() -> None:
    a, _ = golden_vectors()
    upd = PlainHospital().unprotect((GOLDEN / "plain-update.bin").read_bytes())
    np.testing.assert_allclose(upd.mean, a, rtol=0, atol=1e-7)
    agg = PlainHospital().unprotect((GOLDEN / "plain-aggregate.bin").read_bytes())
    assert (agg.total_examples, agg.num_updates) == (sum(EXAMPLES), 2)
    np.testing.assert_allclose(agg.mean, _expected_mean(), rtol=0, atol=1e-7)
    # the server still adds old-format plain updates
    again = PlainAggregator().aggregate([(GOLDEN / "plain-update.bin").read_bytes()] * 2)
    assert PlainHospital().unprotect(again).num_updates == 2


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_key_files_still_load(preset: str, tmp_path: Path) -> None:
    keys = _keys()
    hospital_bytes = (GOLDEN / f"{preset}-hospital-key.bin").read_bytes()
    server_bytes = (GOLDEN / f"{preset}-server-key.bin").read_bytes()
    hospital = keys.hospital_from_bytes(hospital_bytes)
    server = keys.server_from_bytes(server_bytes)
    fp = INFO["keys"][preset]["fingerprint"]
    assert hospital.fingerprint == server.fingerprint == fp
    # through files too, with the 0600 rule
    path = tmp_path / "hospital.key"
    shutil.copyfile(GOLDEN / f"{preset}-hospital-key.bin", path)
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="0600"):
        keys.load_hospital(path)
    path.chmod(0o600)
    assert keys.load_hospital(path).fingerprint == fp
    info = keys.read_info(path)
    assert (info.kind, info.has_secret_key, info.preset.name) == ("hospital-secret", True, preset)
    with pytest.raises(KeyMaterialError):
        keys.server_from_bytes(hospital_bytes)


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_golden_keys_round_trip(preset: str) -> None:
    """Golden keys still encrypt, aggregate and decrypt (within the scheme's bound)."""
    keys = _keys()
    hospital = keys.hospital_from_bytes((GOLDEN / f"{preset}-hospital-key.bin").read_bytes())
    server = keys.server_from_bytes((GOLDEN / f"{preset}-server-key.bin").read_bytes())
    a, b = golden_vectors()
    msgs = [hospital.protect(v, num_examples=n) for v, n in zip((a, b), EXAMPLES, strict=True)]
    agg = hospital.unprotect(server.aggregate(msgs))
    assert agg.total_examples == sum(EXAMPLES)
    np.testing.assert_allclose(agg.mean, _expected_mean(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_golden_messages_still_decrypt(preset: str) -> None:
    """Aggregates written by the 2026-12-01 code decrypt to the FedAvg of the golden updates.

    A protected message lives for one round; if a later format version retires this one,
    it must say so with a new wire version and replace this test, not silently break it.
    """
    keys = _keys()
    hospital = keys.hospital_from_bytes((GOLDEN / f"{preset}-hospital-key.bin").read_bytes())
    agg = hospital.unprotect((GOLDEN / f"{preset}-aggregate.bin").read_bytes())
    assert (agg.total_examples, agg.num_updates) == (sum(EXAMPLES), 2)
    np.testing.assert_allclose(agg.mean, _expected_mean(), rtol=0, atol=1e-3)
