"""Golden-file tests: formats other parties depend on must not change under a refactor.

The files in ``tests/golden`` without a ``-v2`` suffix were written by
``tests/golden/make_golden.py`` with the code of 2026-12-01 (message format 1); the
``-v2`` files by the format-2 code. Key files outlive any release (hospitals keep them
for a whole study), so every later version must load them, recompute the same
fingerprint and decrypt what they encrypted.

Protected messages live for one round. HE message format 1 (full ciphertexts, no
integrity check, no round binding) is retired by format 2 (seeded ciphertexts, check
values and counts inside every ciphertext, run and round bound into them): a format-1
message is refused with an error naming its version, and its key still decrypts its
ciphertexts at the SEAL level (proof that the key material did not change). Plain
messages of format 1 (float64) are still read.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fedcrypt.exceptions import IntegrityError, KeyMaterialError, ProtocolError, ReplayError
from fedcrypt.protection import wire
from fedcrypt.protection.he.bounds import error_bound
from fedcrypt.protection.plain import PlainAggregator, PlainHospital

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import EXAMPLES, ROUND, RUN_ID, golden_vectors  # noqa: E402

INFO = json.loads((GOLDEN / "golden.json").read_text())


def _expected_mean() -> np.ndarray:
    a, b = golden_vectors()
    n1, n2 = EXAMPLES
    return (n1 * a + n2 * b) / (n1 + n2)


def _keys():  # type: ignore[no-untyped-def]
    from fedcrypt.protection.he import keys  # the module path may move; the format may not

    return keys


def _read(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def test_envelope_bytes_are_stable() -> None:
    data = _read("envelope.bin")
    assert wire.pack({"scheme": "test", "n": 1, "s": "é"}, [b"", b"abc", bytes(range(256))]) == data
    env = wire.unpack(data)
    assert env.header == {"scheme": "test", "n": 1, "s": "é"}
    assert [bytes(s) for s in env.sections] == [b"", b"abc", bytes(range(256))]


@pytest.mark.parametrize("suffix", ["", "-v2"])
def test_plain_messages_still_read(suffix: str) -> None:
    """Format 1 (float64 weighted sums) and format 2 (float32 means) both read and add."""
    a, _ = golden_vectors()
    tol = 1e-7 if suffix == "" else 1e-7 + 2e-8  # float32 rounding of values below 0.5
    upd = PlainHospital().unprotect(_read(f"plain-update{suffix}.bin"))
    np.testing.assert_allclose(upd.mean, a, rtol=0, atol=tol)
    agg = PlainHospital().unprotect(_read(f"plain-aggregate{suffix}.bin"))
    assert (agg.total_examples, agg.num_updates) == (sum(EXAMPLES), 2)
    np.testing.assert_allclose(agg.mean, _expected_mean(), rtol=0, atol=tol)
    again = PlainAggregator().aggregate([_read(f"plain-update{suffix}.bin")] * 2)
    assert PlainHospital().unprotect(again).num_updates == 2
    if suffix:
        assert len(_read("plain-update-v2.bin")) < 4.2 * a.size  # float32 on the wire


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_key_files_still_load(preset: str, tmp_path: Path) -> None:
    keys = _keys()
    hospital_bytes = _read(f"{preset}-hospital-key.bin")
    server_bytes = _read(f"{preset}-server-key.bin")
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
    hospital = keys.hospital_from_bytes(_read(f"{preset}-hospital-key.bin"))
    server = keys.server_from_bytes(_read(f"{preset}-server-key.bin"))
    a, b = golden_vectors()
    msgs = [hospital.protect(v, num_examples=n) for v, n in zip((a, b), EXAMPLES, strict=True)]
    # keys written under the old tag ``ckks`` (also for BFV) now write messages tagged ``he``
    assert wire.unpack(_read(f"{preset}-server-key.bin")).header["scheme"] == "ckks"
    assert {wire.unpack(m).header["scheme"] for m in msgs} == {"he"}
    agg = hospital.unprotect(server.aggregate(msgs))
    assert agg.total_examples == sum(EXAMPLES)
    np.testing.assert_allclose(agg.mean, _expected_mean(), rtol=0, atol=1e-4)


def _expand_format1(data: bytes, words: int) -> bytes:
    """Format 1's ciphertext compaction (60-bit words in 7.5 bytes), undone."""
    if data[0] == 0:
        return data[1:]
    m = words * 7 + words // 2
    body = np.frombuffer(data, dtype=np.uint8, offset=len(data) - m)
    out = np.empty((words, 8), dtype=np.uint8)
    out[:, :7] = body[: words * 7].reshape(words, 7)
    out[0::2, 7] = body[words * 7 :] & 0x0F
    out[1::2, 7] = body[words * 7 :] >> 4
    return data[1 : len(data) - m] + out.tobytes()


def test_golden_keys_decrypt_their_format1_ciphertexts() -> None:
    """The key material is unchanged: each golden key decrypts the format-1 aggregate it
    wrote in 2026-12-01 (at the SEAL level) to the FedAvg of the golden updates."""
    keys = _keys()
    packed = keys.hospital_from_bytes(_read("packed-hospital-key.bin"))
    env = wire.unpack(_read("packed-aggregate.bin"))
    assert env.header["mode"] == "calibration"  # one 44-bit field per slot, step 2^-12
    ctx = packed.context
    t = ctx.plain_modulus
    vals = np.concatenate(
        [ctx.decrypt_format1(_expand_format1(bytes(s), 2 * 4096)) for s in env.sections[1:]]
    ).astype(np.int64)
    vals = np.where(vals > t // 2, vals - t, vals)[:1000]
    mean = vals / 2.0**12 / sum(EXAMPLES)
    np.testing.assert_allclose(mean, _expected_mean(), rtol=0, atol=2 * 2.0**-12 / 18)
    fast = keys.hospital_from_bytes(_read("fast-hospital-key.bin"))
    env = wire.unpack(_read("fast-aggregate.bin"))
    sums = np.concatenate(
        [ts.ckks_vector_from(fast._ctx, bytes(s)).decrypt() for s in env.sections]
    )
    np.testing.assert_allclose(sums / sum(EXAMPLES), _expected_mean(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_format1_messages_are_refused_naming_the_version(preset: str) -> None:
    keys = _keys()
    hospital = keys.hospital_from_bytes(_read(f"{preset}-hospital-key.bin"))
    server = keys.server_from_bytes(_read(f"{preset}-server-key.bin"))
    with pytest.raises(ProtocolError, match="format version 1"):
        hospital.unprotect(_read(f"{preset}-aggregate.bin"))
    with pytest.raises(ProtocolError, match="format version 1"):
        server.aggregate([_read(f"{preset}-update.bin")])


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_golden_v2_messages_decrypt(preset: str) -> None:
    """Aggregates written by the format-2 code decrypt, verified, to the golden FedAvg;
    the server still adds format-2 updates; binding and integrity still hold."""
    keys = _keys()
    hospital = keys.hospital_from_bytes(_read(f"{preset}-hospital-key.bin"))
    server = keys.server_from_bytes(_read(f"{preset}-server-key.bin"))
    blob = _read(f"{preset}-aggregate-v2.bin")
    header = wire.unpack(blob).header
    assert (header["format"], header["run"], header["round"]) == (2, RUN_ID, ROUND)
    agg = hospital.unprotect(blob, round=ROUND)
    assert (agg.total_examples, agg.num_updates) == (sum(EXAMPLES), 2)
    tol = error_bound(hospital.preset, num_hospitals=2, max_abs=1.0, total_examples=18)
    np.testing.assert_allclose(agg.mean, _expected_mean(), rtol=0, atol=tol)
    again = keys.hospital_from_bytes(_read(f"{preset}-hospital-key.bin"))
    assert again.unprotect(server.aggregate([_read(f"{preset}-update-v2.bin")])).num_updates == 1
    with pytest.raises(ReplayError, match=f"round {ROUND}"):
        again.unprotect(blob, round=ROUND + 1)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match=f"round {ROUND}"):
        keys.hospital_from_bytes(_read(f"{preset}-hospital-key.bin")).unprotect(bytes(bad))
