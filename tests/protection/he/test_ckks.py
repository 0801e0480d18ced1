"""Float CKKS presets: FedAvg within the bound, seeded size, integrity, server cannot decrypt."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import torch

from fedcrypt.exceptions import (
    AggregationError,
    ConfigError,
    DecryptionError,
    IntegrityError,
    KeyMaterialError,
    ProtocolError,
)
from fedcrypt.protection import wire
from fedcrypt.protection.base import HospitalProtection, ServerAggregator
from fedcrypt.protection.flatten import Layout, flatten
from fedcrypt.protection.he.bounds import error_bound
from fedcrypt.protection.he.ckks import CKKSAggregator, CKKSHospital
from fedcrypt.protection.he.keys import generate_keys, hospital_from_bytes, server_from_bytes
from fedcrypt.protection.he.params import PRESETS, HEPreset

P = 5000  # not a multiple of N/2 - 3 = 2045: exercises the partial last ciphertext


@pytest.fixture(scope="module")
def fast_keys() -> tuple[bytes, bytes]:
    return generate_keys("fast")


@pytest.fixture()
def pair(fast_keys: tuple[bytes, bytes]) -> tuple[CKKSHospital, CKKSAggregator]:
    h, s = hospital_from_bytes(fast_keys[0]), server_from_bytes(fast_keys[1])
    assert isinstance(h, CKKSHospital) and isinstance(s, CKKSAggregator)
    return h, s


def _updates(seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.5, P) for _ in range(3)], [120, 45, 333]


def test_implements_protocols(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, server = pair
    assert isinstance(hospital, HospitalProtection)
    assert isinstance(server, ServerAggregator)
    assert hospital.scheme == server.scheme == "he"
    assert hospital.fingerprint == server.fingerprint


def test_fedavg_matches_plaintext_within_derived_bound(
    pair: tuple[CKKSHospital, CKKSAggregator],
) -> None:
    """decrypt(aggregate of 3 protected updates) equals the plaintext FedAvg.

    Tolerance (see ``error_bound``): each hospital encodes ``n_i x_i`` at scale
    Δ = 2^26 with N = 4096. Rounding the encoded polynomial costs at most N/2 per slot
    and hospital; fresh symmetric-encryption noise (N coefficients bounded by 21) costs
    at most 21·sqrt(2·K·N·ln(2/p)) over the K = 3 summed ciphertexts with probability
    1 - p, p = 2^-64 (Hoeffding). The sum is off by at most that divided by Δ, the mean
    by that divided by Σn_i = 498, plus double-precision FFT error ~2^-40 · max|x|:
    about 1.4e-6 here.
    """
    hospital, server = pair
    updates, counts = _updates()
    blobs = [hospital.protect(u, num_examples=n) for u, n in zip(updates, counts, strict=True)]
    result = hospital.unprotect(server.aggregate(blobs))
    expected = sum(u * n for u, n in zip(updates, counts, strict=True)) / sum(counts)
    tol = error_bound(
        hospital.preset,
        num_hospitals=3,
        max_abs=max(float(np.abs(u).max()) for u in updates),
        total_examples=sum(counts),
    )
    assert tol < 1e-5
    assert result.mean.shape == (P,)
    assert result.mean.dtype == np.float64
    assert (result.total_examples, result.num_updates) == (sum(counts), 3)
    np.testing.assert_allclose(result.mean, expected, rtol=0, atol=tol)


def test_update_is_seeded_and_packed(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, server = pair
    blob = hospital.protect(np.ones(P), num_examples=1)
    env = wire.unpack(blob, expect_scheme="he")
    h = env.header
    assert (h["format"], h["ciphertexts"], h["size"], h["num_examples"]) == (2, 3, P, 1)
    assert h["fingerprint"] == hospital.fingerprint
    # c0 in 7.5 bytes per coefficient plus a 64-byte seed: ~15 bytes per value (TenSEAL's
    # unseeded ckks_vector: ~32)
    assert len(blob) / P < 19
    agg = server.aggregate([blob, blob])
    assert len(agg) - len(blob) == 3 * 64  # the aggregate adds one seed per ciphertext


def test_server_cannot_decrypt(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    """The server's context is public: it can neither decrypt nor encrypt."""
    hospital, server = pair
    server_ctx = server._ctx
    assert not server_ctx.is_private()
    assert not server_ctx.has_secret_key()
    with pytest.raises(ValueError):
        ts.ckks_vector(server_ctx, [1.0])  # symmetric key: the server cannot even encrypt
    with pytest.raises(KeyMaterialError):
        CKKSHospital(server_ctx, preset=server.preset, fingerprint=server.fingerprint)
    blob = server.aggregate([hospital.protect(np.full(10, 0.25), num_examples=2)])
    np.testing.assert_allclose(hospital.unprotect(blob).mean, 0.25, atol=1e-5)


def test_aggregator_refuses_private_context(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, _ = pair
    with pytest.raises(KeyMaterialError, match="secret key"):
        CKKSAggregator(hospital._ctx, preset=hospital.preset, fingerprint=hospital.fingerprint)


def test_rejects_update_from_another_context(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, server = pair
    oh, os_ = (
        hospital_from_bytes(b) if i == 0 else server_from_bytes(b)
        for i, b in enumerate(generate_keys("fast"))
    )
    good = hospital.protect(np.ones(P), num_examples=1)
    foreign = oh.protect(np.ones(P), num_examples=1)
    with pytest.raises(AggregationError, match="another key context"):
        server.aggregate([good, foreign])
    with pytest.raises(DecryptionError, match="another key context"):
        hospital.unprotect(os_.aggregate([foreign]))


def test_rejects_truncated_and_malformed(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, server = pair
    blob = hospital.protect(np.ones(P), num_examples=3)
    with pytest.raises(ProtocolError):
        server.aggregate([blob[:-100]])
    with pytest.raises(ProtocolError):
        server.aggregate([b"not a message"])
    env = wire.unpack(blob)
    sections = [bytes(s) for s in env.sections]
    # garbage of the right length: a constant polynomial, an all-zero seed
    zeroed = wire.pack(env.header, [bytes(len(s)) for s in sections])
    with pytest.raises(ProtocolError, match="constant polynomial"):
        server.aggregate([zeroed])
    with pytest.raises(ProtocolError, match="all zeros"):
        server.aggregate([wire.pack(env.header, [sections[0], bytes(len(sections[1]))])])
    # a ciphertext whose coefficients are not reduced modulo the prime
    fmt = server._format
    unreduced = fmt.pack(np.full((3, fmt.words), fmt.moduli[0], dtype=np.uint64))
    with pytest.raises(
        ProtocolError, match="update 0: ciphertext 0 has a coefficient out of range"
    ):
        server.aggregate([wire.pack(env.header, [unreduced, sections[1]])])
    for bad in (
        dict(env.header, size=P + 5000),
        dict(env.header, slots=4096),
        dict(env.header, num_examples=0),
        dict(env.header, scale_bits=30),
        dict(env.header, ciphertexts=2),
        dict(env.header, format=7),
    ):
        with pytest.raises(ProtocolError):
            server.aggregate([wire.pack(bad, sections)])
    with pytest.raises(ProtocolError, match="scheme"):
        server.aggregate([wire.pack(dict(env.header, scheme="plain"), sections)])
    with pytest.raises(ProtocolError):
        hospital.unprotect(blob[:50])


def test_flipped_byte_and_edited_counts_fail_the_integrity_check(
    pair: tuple[CKKSHospital, CKKSAggregator],
) -> None:
    """A flipped byte anywhere in a ciphertext, or an edited example count, is an
    IntegrityError naming the round (it used to decrypt silently to garbage)."""
    hospital, server = pair
    hospital.set_round("run-1", 4)
    updates, counts = _updates(1)
    agg = server.aggregate(
        [hospital.protect(u, num_examples=n) for u, n in zip(updates, counts, strict=True)]
    )
    env = wire.unpack(agg)
    c0 = bytes(env.sections[0])
    positions = np.random.default_rng(0).choice(len(c0), 12, replace=False).tolist()
    for pos in [*positions, 0, len(c0) - 1]:
        bad = bytearray(c0)
        bad[pos] ^= 0x01
        fresh = hospital_from_bytes_fast(hospital)
        with pytest.raises((IntegrityError, ProtocolError)) as info:
            fresh.unprotect(wire.pack(env.header, [bytes(bad), env.sections[1]]))
        if isinstance(info.value, IntegrityError):
            assert "round 4" in str(info.value)
    seeds = bytearray(env.sections[1])
    seeds[5] ^= 0x80
    with pytest.raises(IntegrityError, match="round 4"):
        hospital_from_bytes_fast(hospital).unprotect(wire.pack(env.header, [c0, bytes(seeds)]))
    for field, value in (("num_examples", 1000), ("num_updates", 2)):
        edited = dict(env.header, **{field: value})
        sections = [
            c0,
            bytes(env.sections[1])[: 64 * 3 * value] if field == "num_updates" else env.sections[1],
        ]
        with pytest.raises(IntegrityError):
            hospital_from_bytes_fast(hospital).unprotect(wire.pack(edited, sections))


def hospital_from_bytes_fast(h: CKKSHospital) -> CKKSHospital:
    """A fresh hospital on the same key (no cached result, no replay state)."""
    return CKKSHospital(h._ctx, preset=h.preset, fingerprint=h.fingerprint)


def test_rejects_mismatched_sizes_and_empty(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, server = pair
    with pytest.raises(AggregationError, match="no updates"):
        server.aggregate([])
    a = hospital.protect(np.ones(100), num_examples=1)
    b = hospital.protect(np.ones(101), num_examples=1)
    with pytest.raises(AggregationError, match="sizes differ"):
        server.aggregate([a, b])


def test_max_hospitals_and_capacity(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, server = pair
    preset = hospital.preset
    blob = hospital.protect(np.ones(4), num_examples=1)
    with pytest.raises(AggregationError, match="limit"):
        server.aggregate([blob] * (preset.max_hospitals + 1))
    too_big = np.full(4, preset.max_weighted_abs / 10)
    with pytest.raises(ConfigError, match="capacity"):
        hospital.protect(too_big, num_examples=11)


def test_protect_validates_input(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, _ = pair
    with pytest.raises(ValueError, match="num_examples"):
        hospital.protect(np.ones(3), num_examples=0)
    with pytest.raises(ValueError, match="NaN"):
        hospital.protect(np.array([1.0, np.nan]), num_examples=1)
    with pytest.raises(ValueError, match="1-D"):
        hospital.protect(np.ones((2, 2)), num_examples=1)


def test_aggregates_compose(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    """An aggregate of aggregates carries the summed counts (hierarchical aggregation)."""
    hospital, server = pair
    a = server.aggregate([hospital.protect(np.full(7, 1.0), num_examples=1)] * 2)
    b = server.aggregate([a, hospital.protect(np.full(7, 4.0), num_examples=2)])
    r = hospital.unprotect(b)
    assert (r.total_examples, r.num_updates) == (4, 3)
    np.testing.assert_allclose(r.mean, 2.5, atol=1e-5)


def test_variances_are_clamped_at_zero(fast_keys: tuple[bytes, bytes]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = model.state_dict()
    state["1.running_var"] = torch.zeros(4)
    layout = Layout.of(state)
    h = hospital_from_bytes(fast_keys[0], layout=layout)
    s = server_from_bytes(fast_keys[1])
    spec = {t.name: t for t in layout.tensors}["1.running_var"]
    for _ in range(3):
        mean = h.unprotect(s.aggregate([h.protect(flatten(state), num_examples=1)] * 3)).mean
        assert np.all(mean[spec.offset : spec.offset + spec.numel] >= 0)
        h = hospital_from_bytes(fast_keys[0], layout=layout)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_error_bound_is_monotone(name: str) -> None:
    preset: HEPreset = PRESETS[name]
    one = error_bound(preset, num_hospitals=1, max_abs=1.0)
    ten = error_bound(preset, num_hospitals=10, max_abs=1.0, total_examples=10)
    assert 0 < one
    assert error_bound(preset, num_hospitals=3, max_abs=1.0, total_examples=10) <= ten
    assert error_bound(preset, num_hospitals=10, max_abs=1.0, total_examples=10_000) <= error_bound(
        preset, num_hospitals=10, max_abs=1.0, total_examples=10, reference_examples=10_000
    )
    with pytest.raises(ValueError):
        error_bound(preset, num_hospitals=0, max_abs=1.0)
