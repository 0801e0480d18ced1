"""Tests for packed CKKS protection: FedAvg correctness, rejection, server cannot decrypt."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from fedcrypt.exceptions import (
    AggregationError,
    ConfigError,
    DecryptionError,
    KeyMaterialError,
    ProtocolError,
)
from fedcrypt.protection import wire
from fedcrypt.protection.base import HospitalProtection, ServerAggregator
from fedcrypt.protection.he.bfv import BFVAggregator, BFVHospital
from fedcrypt.protection.he.bounds import error_bound
from fedcrypt.protection.he.ckks import CKKSAggregator, CKKSHospital
from fedcrypt.protection.he.keys import generate_keys, hospital_from_bytes, server_from_bytes
from fedcrypt.protection.he.params import PRESETS, HEPreset
from fedcrypt.protection.he.seal import BFVContext

P = 5000  # not a multiple of N/2 = 2048: exercises the partial last chunk


@pytest.fixture(scope="module")
def pair() -> tuple[CKKSHospital, CKKSAggregator]:
    hospital, server = generate_keys("fast")
    return hospital_from_bytes(hospital), server_from_bytes(server)


@pytest.fixture(scope="module")
def other_pair() -> tuple[CKKSHospital, CKKSAggregator]:
    hospital, server = generate_keys("fast")
    return hospital_from_bytes(hospital), server_from_bytes(server)


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
    assert result.total_examples == sum(counts)
    assert result.num_updates == 3
    np.testing.assert_allclose(result.mean, expected, rtol=0, atol=tol)


def test_update_is_packed(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, _ = pair
    blob = hospital.protect(np.ones(P), num_examples=1)
    env = wire.unpack(blob, expect_scheme="ckks")
    assert len(env.sections) == -(-P // 2048)  # N/2 values per ciphertext, never one per value
    assert env.header["fingerprint"] == hospital.fingerprint
    assert env.header["size"] == P
    assert env.header["num_examples"] == 1
    assert len(blob) / P < 40  # about 32 bytes per value at N=4096 with one 60-bit prime


def test_server_cannot_decrypt(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    """The server's context is public: not private, decrypting and encrypting raise."""
    hospital, server = pair
    server_ctx = server._ctx
    assert not server_ctx.is_private()
    assert not server_ctx.has_secret_key()
    blob = server.aggregate([hospital.protect(np.full(10, 0.25), num_examples=2)])
    section = bytes(wire.unpack(blob).sections[0])
    vec = ts.ckks_vector_from(server_ctx, section)
    with pytest.raises(ValueError, match="secret_key"):
        vec.decrypt()
    with pytest.raises(ValueError):
        ts.ckks_vector(server_ctx, [1.0])  # symmetric key: the server cannot even encrypt
    # the hospital, with the secret key, can
    np.testing.assert_allclose(hospital.unprotect(blob).mean, 0.25, atol=1e-5)


def test_aggregator_refuses_private_context(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, _ = pair
    with pytest.raises(KeyMaterialError, match="secret key"):
        CKKSAggregator(hospital._ctx, preset=hospital.preset, fingerprint=hospital.fingerprint)


def test_hospital_refuses_public_context(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    _, server = pair
    with pytest.raises(KeyMaterialError):
        CKKSHospital(server._ctx, preset=server.preset, fingerprint=server.fingerprint)


def test_rejects_update_from_another_context(
    pair: tuple[CKKSHospital, CKKSAggregator], other_pair: tuple[CKKSHospital, CKKSAggregator]
) -> None:
    hospital, server = pair
    other_hospital, _ = other_pair
    good = hospital.protect(np.ones(P), num_examples=1)
    foreign = other_hospital.protect(np.ones(P), num_examples=1)
    with pytest.raises(AggregationError, match="another key context"):
        server.aggregate([good, foreign])
    other_agg = other_pair[1].aggregate([foreign])
    with pytest.raises(DecryptionError, match="another key context"):
        hospital.unprotect(other_agg)


def test_rejects_truncated_and_corrupt(pair: tuple[CKKSHospital, CKKSAggregator]) -> None:
    hospital, server = pair
    blob = hospital.protect(np.ones(P), num_examples=3)
    with pytest.raises(ProtocolError):
        server.aggregate([blob[:-100]])
    with pytest.raises(ProtocolError):
        server.aggregate([b"not a message"])
    # a ciphertext section replaced by garbage of the same length does not deserialize
    env = wire.unpack(blob)
    sections = [bytes(s) for s in env.sections]
    sections[1] = bytes(len(sections[1]))
    with pytest.raises(ProtocolError, match="deserialize"):
        server.aggregate([wire.pack(env.header, sections)])
    # a ciphertext from other parameters does not load under this key
    nv = ts.context(
        ts.SCHEME_TYPE.CKKS,
        8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    nv.global_scale = 2.0**40
    sections[1] = ts.ckks_vector(nv, [1.0] * 2048).serialize()
    with pytest.raises(ProtocolError):
        server.aggregate([wire.pack(env.header, sections)])
    # header tampering
    bad = dict(env.header, size=P + 5000)
    with pytest.raises(ProtocolError):
        server.aggregate([wire.pack(bad, [bytes(s) for s in env.sections])])
    with pytest.raises(ProtocolError):
        server.aggregate([wire.pack(dict(env.header, slots=4096), list(env.sections))])
    with pytest.raises(ProtocolError):
        server.aggregate([wire.pack(dict(env.header, num_examples=0), list(env.sections))])
    with pytest.raises(ProtocolError, match="scheme"):
        server.aggregate([wire.pack(dict(env.header, scheme="plain"), list(env.sections))])
    with pytest.raises(ProtocolError):
        hospital.unprotect(blob[:50])


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


# -- bfv-packed (quantized) presets -------------------------------------------------------


@pytest.fixture(scope="module")
def packed_keys() -> tuple[bytes, bytes]:
    return generate_keys("packed")


@pytest.fixture()
def packed(packed_keys: tuple[bytes, bytes]) -> tuple[BFVHospital, BFVAggregator]:
    hospital, server = packed_keys
    return hospital_from_bytes(hospital), server_from_bytes(server)


PP = 3 * 8192 - 100  # three ciphertexts of 2 x 4096 values, the last one partial


def _round(
    hospital: BFVHospital, server: BFVAggregator, updates: list[np.ndarray], counts: list[int]
) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    blobs = [hospital.protect(u, num_examples=n) for u, n in zip(updates, counts, strict=True)]
    result = hospital.unprotect(server.aggregate(blobs))
    expected = sum(u * n for u, n in zip(updates, counts, strict=True)) / sum(counts)
    return result.mean, expected, blobs


def test_packed_fedavg_two_rounds_within_bound(
    packed: tuple[BFVHospital, BFVAggregator],
) -> None:
    """Both rounds of the packed protocol match the plaintext FedAvg within ``error_bound``.

    BFV decrypts sums exactly, so the only error is stochastic rounding: each hospital is
    off by less than one step δ per value and the mean by less than K δ / Σ n_i. Round
    1 (calibration) uses δ = 2^-12; round 2 calibrates δ_b = 2^(ceil(log2 m_b) + 1 +
    shift) on round 1's mean (m_b <= max_abs) with shift set by M = Σ n_i (see
    ``error_bound``): here about 3e-6.
    """
    hospital, server = packed
    rng = np.random.default_rng(7)
    counts = [120, 45, 333]
    first = [rng.normal(0, 0.2, PP) for _ in range(3)]
    mean1, exp1, blobs1 = _round(hospital, server, first, counts)
    assert wire.unpack(blobs1[0]).header["mode"] == "calibration"
    tol1 = error_bound(hospital.preset, num_hospitals=3, max_abs=1.0, total_examples=sum(counts))
    np.testing.assert_allclose(mean1, exp1, rtol=0, atol=tol1)
    second = [mean1 + rng.normal(0, 0.01, PP) for _ in range(3)]
    mean2, exp2, blobs2 = _round(hospital, server, second, counts)
    env = wire.unpack(blobs2[0])
    assert env.header["mode"] == "calibrated"
    assert hospital.last_clipped == 0
    max_abs = max(float(np.abs(u).max()) for u in second)
    tol2 = error_bound(
        hospital.preset, num_hospitals=3, max_abs=max_abs, total_examples=sum(counts)
    )
    assert tol2 < 1e-4
    np.testing.assert_allclose(mean2, exp2, rtol=0, atol=tol2)
    # 2 values per slot, 60-bit coefficients in 7.5 bytes: about 7.5 bytes per value
    assert len(env.sections) == 1 + 3
    assert len(blobs2[0]) / PP < 7.7


def test_packed_server_cannot_decrypt(packed: tuple[BFVHospital, BFVAggregator]) -> None:
    hospital, server = packed
    ctx = server._ctx
    assert isinstance(ctx, BFVContext)
    assert not ctx.is_private()
    blob = server.aggregate([hospital.protect(np.full(10, 0.5), num_examples=2)])
    ct = ctx.load(wire.unpack(blob).sections[1])
    with pytest.raises(KeyMaterialError):
        ctx.decrypt(ct)
    with pytest.raises(KeyMaterialError):
        ctx.encrypt(np.zeros(ctx.slots, dtype=np.int64))
    with pytest.raises(KeyMaterialError):
        BFVAggregator(hospital._ctx, preset=hospital.preset, fingerprint=hospital.fingerprint)
    with pytest.raises(KeyMaterialError):
        BFVHospital(ctx, preset=server.preset, fingerprint=server.fingerprint)
    np.testing.assert_allclose(hospital.unprotect(blob).mean, 0.5, atol=1e-3)


def test_packed_rejects_mixed_grids_and_tampering(
    packed_keys: tuple[bytes, bytes], packed: tuple[BFVHospital, BFVAggregator]
) -> None:
    hospital, server = packed
    other = hospital_from_bytes(packed_keys[0])
    x = np.random.default_rng(0).normal(0, 0.1, 5000)
    hospital.set_reference(x, total_examples=20)
    calibrated = hospital.protect(x, num_examples=10)
    calibration = other.protect(x, num_examples=10)
    with pytest.raises(AggregationError, match="different grids"):
        server.aggregate([calibrated, calibration])
    with pytest.raises(AggregationError, match="exceed"):
        server.aggregate([calibrated] * 5)  # 50 examples > 2 x 20
    with pytest.raises(ConfigError, match="capacity"):
        hospital.protect(x, num_examples=41)
    env = wire.unpack(server.aggregate([calibrated]))
    sections = [bytes(s) for s in env.sections]
    table = bytearray(sections[0])
    table[3] ^= 1
    with pytest.raises(DecryptionError, match="step table"):
        hospital.unprotect(wire.pack(env.header, [bytes(table), *sections[1:]]))
    garbage = wire.pack(env.header, [sections[0], bytes(len(sections[1]))])
    with pytest.raises(ProtocolError, match="deserialize"):
        server.aggregate([garbage])
    with pytest.raises(ProtocolError):
        server.aggregate([calibrated[:-10]])
    with pytest.raises(ProtocolError):
        server.aggregate([wire.pack(dict(env.header, fields=3), sections)])


def test_packed_aggregate_is_self_describing(
    packed_keys: tuple[bytes, bytes], packed: tuple[BFVHospital, BFVAggregator]
) -> None:
    """A restarted hospital (no reference) decodes a calibrated aggregate on its own."""
    hospital, server = packed
    x = np.random.default_rng(1).normal(0, 0.1, 3000)
    hospital.set_reference(x, total_examples=5)
    agg = server.aggregate([hospital.protect(x, num_examples=5)])
    fresh = hospital_from_bytes(packed_keys[0])
    np.testing.assert_allclose(fresh.unprotect(agg).mean, x, atol=1e-5)
    # and is calibrated by it for the next round
    assert wire.unpack(fresh.protect(x, num_examples=5)).header["mode"] == "calibrated"


def test_packed_rejects_other_key(packed: tuple[BFVHospital, BFVAggregator]) -> None:
    hospital, server = packed
    other_h, other_s = (
        hospital_from_bytes(b) if i == 0 else server_from_bytes(b)
        for i, b in enumerate(generate_keys("packed"))
    )
    foreign = other_h.protect(np.ones(100), num_examples=1)
    with pytest.raises(AggregationError, match="another key context"):
        server.aggregate([foreign])
    with pytest.raises(DecryptionError, match="another key context"):
        hospital.unprotect(other_s.aggregate([foreign]))


def test_noise_budget_lasts_for_max_hospitals(
    packed: tuple[BFVHospital, BFVAggregator],
) -> None:
    """max_hospitals fresh ciphertexts still decrypt with noise budget to spare."""
    hospital, _ = packed
    ctx = hospital._ctx
    assert isinstance(ctx, BFVContext)
    vals = np.arange(ctx.slots, dtype=np.int64) - ctx.slots // 2
    blob = ctx.encrypt(vals)
    acc = ctx.load(blob)
    for _ in range(hospital.preset.max_hospitals - 1):
        ctx.add_inplace(acc, ctx.load(blob))
    assert ctx.noise_budget(acc) >= 2
    got = ctx.decrypt(acc).astype(np.int64)
    t = ctx.plain_modulus
    got = np.where(got > t // 2, got - t, got)
    np.testing.assert_array_equal(got, vals * hospital.preset.max_hospitals)
