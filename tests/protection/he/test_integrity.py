"""Integrity inside the ciphertext: counts, check values, round and run binding, replays."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.exceptions import AggregationError, ConfigError, IntegrityError, ReplayError
from fedcrypt.protection import wire
from fedcrypt.protection.he import framing
from fedcrypt.protection.he.integrity import FloatCheck, ModularCheck, derive, split_mul
from fedcrypt.protection.he.keys import generate_keys, hospital_from_bytes, server_from_bytes
from fedcrypt.protection.he.seal import SEED_BYTES

SIZE = 12_000


@pytest.fixture(scope="module", params=["packed", "fast"])
def keys(request: pytest.FixtureRequest) -> tuple[bytes, bytes]:
    return generate_keys(request.param)


def _hospitals(keys: tuple[bytes, bytes], k: int = 3) -> list:  # type: ignore[type-arg]
    return [hospital_from_bytes(keys[0]) for _ in range(k)]


def _play(hospitals: list, server, round: int, run: str = "run-a") -> bytes:  # type: ignore[no-untyped-def, type-arg]
    rng = np.random.default_rng(round)
    blobs = []
    for i, h in enumerate(hospitals):
        h.set_round(run, round, hospital=f"h{i}", seed=1)
        blobs.append(h.protect(rng.normal(0, 0.1, SIZE), num_examples=10 + i))
    return server.aggregate(blobs)


def test_replayed_older_aggregate_is_refused(keys: tuple[bytes, bytes]) -> None:
    hospitals = _hospitals(keys)
    server = server_from_bytes(keys[1])
    agg1 = _play(hospitals, server, 1)
    for h in hospitals:
        h.unprotect(agg1)
    agg2 = _play(hospitals, server, 2)
    h0 = hospitals[0]
    assert h0.unprotect(agg2).num_updates == 3
    assert h0.unprotect(agg2) is h0.unprotect(agg2)  # decrypted once, then cached
    with pytest.raises(ReplayError, match=r"round 1\): an older aggregate was replayed") as info:
        h0.unprotect(agg1)
    assert info.value.round == 1
    # an exact round can be demanded
    with pytest.raises(ReplayError, match="expected round 3"):
        hospitals[1].unprotect(agg2, round=3)
    # editing the header's round does not help: the check values are bound to the round
    env = wire.unpack(agg1)
    forged = wire.pack(dict(env.header, round=2), env.sections)
    with pytest.raises(IntegrityError, match="round 2"):
        hospitals[2].unprotect(forged)


def test_other_run_and_future_round_are_refused(keys: tuple[bytes, bytes]) -> None:
    hospitals = _hospitals(keys)
    server = server_from_bytes(keys[1])
    agg = _play(hospitals, server, 5, run="run-b")
    h = hospitals[0]
    h.set_round("run-a", 5)
    with pytest.raises(ReplayError, match="run 'run-b'"):
        h.unprotect(agg)
    h.set_round("run-b", 4)
    with pytest.raises(ReplayError, match="claims round 5"):
        h.unprotect(agg)
    # a run id edited in the header fails the check values
    env = wire.unpack(agg)
    h.set_round("run-a", 5)
    with pytest.raises(IntegrityError):
        h.unprotect(wire.pack(dict(env.header, run="run-a"), env.sections))
    # an unbound hospital (e.g. `fedcrypt portal decrypt`) accepts any verified round
    assert hospital_from_bytes(keys[0]).unprotect(agg).num_updates == 3


def test_server_refuses_updates_of_different_rounds_naming_the_hospital(
    keys: tuple[bytes, bytes],
) -> None:
    a, b = _hospitals(keys, 2)
    server = server_from_bytes(keys[1])
    a.set_round("run", 1, hospital="north")
    b.set_round("run", 2, hospital="south")
    x = np.ones(100)
    with pytest.raises(AggregationError, match=r"hospital 'south'.*round 2"):
        server.aggregate([a.protect(x, num_examples=1), b.protect(x, num_examples=1)])


def test_counts_inside_the_ciphertexts_are_checked(keys: tuple[bytes, bytes]) -> None:
    """Rescaling the model by editing the header's example count is refused."""
    hospitals = _hospitals(keys)
    server = server_from_bytes(keys[1])
    agg = _play(hospitals, server, 1)
    env = wire.unpack(agg)
    forged = wire.pack(dict(env.header, num_examples=env.header["num_examples"] * 2), env.sections)
    with pytest.raises(IntegrityError, match="counts inside the ciphertexts"):
        hospital_from_bytes(keys[0]).unprotect(forged)


def _sections(blob: bytes) -> tuple[dict, list[bytes]]:  # type: ignore[type-arg]
    env = wire.unpack(blob)
    return env.header, [bytes(s) for s in env.sections]


def test_dropping_a_hospital_from_some_ciphertexts_is_refused(keys: tuple[bytes, bytes]) -> None:
    """The server sums 3 updates in ciphertext 0 but only 2 in ciphertext 1 (and fixes
    the header): ciphertext 1's counts disagree."""
    hospitals = _hospitals(keys)
    server = server_from_bytes(keys[1])
    rng = np.random.default_rng(0)
    ups = []
    for i, h in enumerate(hospitals):
        h.set_round("r", 1, hospital=str(i))
        ups.append(h.protect(rng.normal(0, 0.1, SIZE), num_examples=10))
    full = server.aggregate(ups)
    two = server.aggregate(ups[:2])
    hf, sf = _sections(full)
    _, s2 = _sections(two)
    poly = len(sf[-2]) // hf["ciphertexts"]
    c0 = sf[-2][:poly] + s2[-2][poly : 2 * poly] + sf[-2][2 * poly :]
    mixed = wire.pack(hf, [*sf[:-2], c0, sf[-1]])
    with pytest.raises(IntegrityError):
        hospital_from_bytes(keys[0]).unprotect(mixed)


def test_swapped_ciphertexts_are_refused(keys: tuple[bytes, bytes]) -> None:
    hospitals = _hospitals(keys, 1)
    server = server_from_bytes(keys[1])
    agg = _play(hospitals, server, 1)
    h, s = _sections(agg)
    c = h["ciphertexts"]
    assert c >= 2
    poly = len(s[-2]) // c
    c0 = s[-2][poly : 2 * poly] + s[-2][:poly] + s[-2][2 * poly :]
    seeds = s[-1][SEED_BYTES : 2 * SEED_BYTES] + s[-1][:SEED_BYTES] + s[-1][2 * SEED_BYTES :]
    with pytest.raises(IntegrityError, match="check value"):
        hospital_from_bytes(keys[0]).unprotect(wire.pack(h, [*s[:-2], c0, seeds]))


def test_a_flipped_byte_anywhere_in_the_ciphertexts_is_refused(keys: tuple[bytes, bytes]) -> None:
    hospitals = _hospitals(keys)
    server = server_from_bytes(keys[1])
    agg = _play(hospitals, server, 7)
    h, s = _sections(agg)
    rng = np.random.default_rng(11)
    for section in (-2, -1):  # c0 and the seeds
        for pos in rng.choice(len(s[section]), 8, replace=False).tolist():
            bad = list(s)
            b = bytearray(bad[section])
            b[pos] ^= 1 << int(rng.integers(0, 8))
            bad[section] = bytes(b)
            with pytest.raises(IntegrityError, match="round 7"):
                hospital_from_bytes(keys[0]).unprotect(wire.pack(h, bad))


def test_bad_bindings_are_refused(keys: tuple[bytes, bytes]) -> None:
    h = hospital_from_bytes(keys[0])
    for run, rnd in (("x" * 200, 1), ("ok", -1), ("tab\there", 1), ("ok", True)):
        with pytest.raises(ConfigError):
            h.set_round(run, rnd)  # type: ignore[arg-type]


def test_split_mul_is_exact() -> None:
    rng = np.random.default_rng(0)
    for t in (35184372088777, (1 << 59) + 55):
        a = rng.integers(0, t, (4, 4095), dtype=np.uint64)
        b = rng.integers(0, t, 4095, dtype=np.uint64)
        expected = [sum(int(x) * int(y) for x, y in zip(row, b, strict=True)) % t for row in a]
        assert split_mul(a, b, t) == expected


def test_check_values_are_linear_and_keyed() -> None:
    t = 35184372088777
    key = derive(b"secret", "test", "fp", "run", 1)
    assert key != derive(b"secret", "test", "fp", "run", 2)
    check = ModularCheck(key, plain_modulus=t, slots=64, ciphertexts=3)
    rng = np.random.default_rng(0)
    a = rng.integers(0, t, (3, 64), dtype=np.uint64)
    b = rng.integers(0, t, (3, 64), dtype=np.uint64)
    s = (a + b) % np.uint64(t)
    assert [(x + y) % t for x, y in zip(check.tags(a), check.tags(b), strict=True)] == check.tags(s)
    c = a.copy()
    c[:, -1] = 7  # the check slot itself does not enter
    assert check.tags(c) == check.tags(a)
    fc = FloatCheck(key, slots=64, ciphertexts=3)
    assert np.isclose(np.linalg.norm(fc.weights), 1.0)
    assert np.all((2**8 <= np.abs(fc.kappa)) & (np.abs(fc.kappa) < 2**9))
    x, y = rng.normal(size=(3, 63)), rng.normal(size=(3, 63))
    np.testing.assert_allclose(fc.tags(x) + fc.tags(y), fc.tags(x + y, updates=2))


def test_common_header_fields_are_bounded() -> None:
    from fedcrypt.exceptions import ProtocolError

    base = {
        "format": 2,
        "fingerprint": "f",
        "run": "r",
        "round": 1,
        "size": 10,
        "num_examples": 1,
        "num_updates": 1,
        "ciphertexts": 1,
    }
    assert framing.read_common(base, max_ciphertexts=1).round == 1
    for bad in ({"ciphertexts": 5}, {"run": 3}, {"round": -1}, {"hospital": 7}, {"format": 3}):
        with pytest.raises(ProtocolError):
            framing.read_common({**base, **bad}, max_ciphertexts=1)


def test_replay_errors_are_integrity_errors() -> None:
    assert issubclass(ReplayError, IntegrityError)
    err = ReplayError("x", round=3, hospital="h")
    assert (err.round, err.hospital) == (3, "h")
