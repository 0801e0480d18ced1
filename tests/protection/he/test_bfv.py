"""Packed BFV presets: FedAvg within the bound, per-tensor quantization, integrity, binding."""

from __future__ import annotations

import numpy as np
import pytest
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
from fedcrypt.protection.he.bfv import BFVAggregator, BFVHospital
from fedcrypt.protection.he.bounds import error_bound, value_bounds
from fedcrypt.protection.he.keys import generate_keys, hospital_from_bytes, server_from_bytes
from fedcrypt.protection.he.quantize import QuantPlan
from fedcrypt.protection.he.seal import BFVContext

PP = 3 * 8190 - 100  # three ciphertexts of 2 x 4093 values, the last one partial


@pytest.fixture(scope="module")
def packed_keys() -> tuple[bytes, bytes]:
    return generate_keys("packed")


@pytest.fixture()
def packed(packed_keys: tuple[bytes, bytes]) -> tuple[BFVHospital, BFVAggregator]:
    hospital, server = packed_keys
    h, s = hospital_from_bytes(hospital), server_from_bytes(server)
    assert isinstance(h, BFVHospital) and isinstance(s, BFVAggregator)
    return h, s


def _round(
    hospital: BFVHospital, server: BFVAggregator, updates: list[np.ndarray], counts: list[int]
) -> tuple[np.ndarray, np.ndarray, list[bytes], bytes]:
    blobs = [hospital.protect(u, num_examples=n) for u, n in zip(updates, counts, strict=True)]
    agg = server.aggregate(blobs)
    result = hospital.unprotect(agg)
    expected = sum(u * n for u, n in zip(updates, counts, strict=True)) / sum(counts)
    return result.mean, expected, blobs, agg


def test_implements_protocols(packed: tuple[BFVHospital, BFVAggregator]) -> None:
    hospital, server = packed
    assert isinstance(hospital, HospitalProtection)
    assert isinstance(server, ServerAggregator)
    assert hospital.scheme == server.scheme == "he"


def test_packed_fedavg_two_rounds_within_bound(
    packed: tuple[BFVHospital, BFVAggregator],
) -> None:
    """Both rounds of the packed protocol match the plaintext FedAvg within ``error_bound``.

    BFV decrypts sums exactly, so the only error is stochastic rounding: each hospital is
    off by less than one step δ per value and the mean by less than K δ / Σ n_i. Round 1
    (calibration) uses δ = 2^-12; round 2 calibrates δ_b = 2 m_b · 2M / (2^21 - 65) on
    round 1's mean (m_b <= max_abs): here about 1e-6.
    """
    hospital, server = packed
    rng = np.random.default_rng(7)
    counts = [120, 45, 333]
    first = [rng.normal(0, 0.2, PP) for _ in range(3)]
    mean1, exp1, blobs1, _ = _round(hospital, server, first, counts)
    assert wire.unpack(blobs1[0]).header["mode"] == "calibration"
    tol1 = error_bound(hospital.preset, num_hospitals=3, max_abs=1.0, total_examples=sum(counts))
    np.testing.assert_allclose(mean1, exp1, rtol=0, atol=tol1)
    second = [mean1 + rng.normal(0, 0.01, PP) for _ in range(3)]
    mean2, exp2, blobs2, agg = _round(hospital, server, second, counts)
    env = wire.unpack(blobs2[0])
    assert env.header["mode"] == "calibrated"
    assert env.header["format"] == 2
    assert hospital.last_clipped == 0
    max_abs = max(float(np.abs(u).max()) for u in second)
    tol2 = error_bound(
        hospital.preset, num_hospitals=3, max_abs=max_abs, total_examples=sum(counts)
    )
    assert tol2 < 1e-5
    np.testing.assert_allclose(mean2, exp2, rtol=0, atol=tol2)
    # seeded: c0 in 7.5 bytes per coefficient + 64-byte seed, 2 values per slot
    assert env.header["ciphertexts"] == 3
    assert len(blobs2[0]) / PP < 3.9  # + a float32 step per 64 values
    # download: Σ c0 and one seed set per hospital
    assert len(agg) - len(blobs2[0]) == 2 * 3 * 64


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 16, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 2),
    )
    model(torch.randn(16, 1, 8, 8))
    return model


def test_blocks_never_span_tensors(packed_keys: tuple[bytes, bytes]) -> None:
    """The measured failure: tiny running variances next to a counter of 330 in one block.

    With the layout, the variances have blocks of their own, the counter travels
    exactly, and every variance keeps its relative precision (it came back as 0 from
    0.00075 when they shared a block).
    """
    model = _bn_model()
    state = model.state_dict()
    state["1.running_var"] = torch.linspace(0.00075, 0.04, 8)
    state["1.num_batches_tracked"] = torch.tensor(330)
    layout = Layout.of(state)
    hospitals = [hospital_from_bytes(packed_keys[0], layout=layout) for _ in range(3)]
    server = server_from_bytes(packed_keys[1])
    base = flatten(state)
    rng = np.random.default_rng(0)
    counts = [300, 500, 700]
    spec = {t.name: t for t in layout.tensors}
    var = spec["1.running_var"]
    nbt = spec["1.num_batches_tracked"]
    vs = slice(var.offset, var.offset + var.numel)
    reference = None
    for rnd in range(2):  # calibration, then calibrated on round 1's mean
        ups = []
        for i in range(3):
            u = base * (1 + rng.normal(0, 0.01, base.size))  # within 2x of the global model
            u[vs] = base[vs] * (1 + rng.normal(0, 0.05, var.numel))
            u[nbt.offset] = 330 + 10 * rnd + i
            ups.append(u)
        for i, h in enumerate(hospitals):
            h.set_round("blocks", rnd, hospital=str(i), seed=5)
        agg = server.aggregate(
            [h.protect(u, num_examples=n) for h, u, n in zip(hospitals, ups, counts, strict=True)]
        )
        assert all(h.last_clipped == 0 for h in hospitals)
        results = [h.unprotect(agg) for h in hospitals]
        exact = sum(n * u for n, u in zip(counts, ups, strict=True)) / sum(counts)
        mean = results[0].mean
        assert all(np.array_equal(r.mean, mean) for r in results)
        assert mean[nbt.offset] == exact[nbt.offset]  # exact, as plain FedAvg
        assert np.all(mean[vs] >= 0)
        bounds = value_bounds(
            hospitals[0].preset,
            QuantPlan.of(layout),
            num_hospitals=3,
            total_examples=sum(counts),
            reference=reference,
        )
        assert np.all(np.abs(mean - exact) <= bounds)
        # every variance keeps its relative precision (the smallest is 53x below the
        # largest): the bounds above are 7e-4 (round 1) and 5e-4 (round 2) of it
        np.testing.assert_allclose(mean[vs], exact[vs], rtol=1e-3)
        reference = mean
    # without the layout (one flat tensor), the counter shares the variances' block
    flat = [hospital_from_bytes(packed_keys[0]) for _ in range(3)]
    for _ in range(2):
        agg = server.aggregate(
            [h.protect(u, num_examples=n) for h, u, n in zip(flat, ups, counts, strict=True)]
        )
        results = [h.unprotect(agg) for h in flat]
        mean = results[0].mean
    assert (
        np.abs(mean[vs] / exact[vs] - 1).max() > 100 * np.abs(reference[vs] / exact[vs] - 1).max()
    )


def test_variances_never_come_back_negative(packed_keys: tuple[bytes, bytes]) -> None:
    """Stochastic rounding of y >= 0 is >= 0, so zero variances stay exactly >= 0."""
    model = _bn_model()
    state = model.state_dict()
    state["1.running_var"] = torch.tensor([0.0, 1e-12, 1e-9, 1e-6, 1e-3, 0.1, 10.0, 0.0])
    layout = Layout.of(state)
    h = hospital_from_bytes(packed_keys[0], layout=layout)
    s = server_from_bytes(packed_keys[1])
    x = flatten(state)
    spec = {t.name: t for t in layout.tensors}["1.running_var"]
    for _ in range(3):
        mean = h.unprotect(s.aggregate([h.protect(x, num_examples=7)] * 3)).mean
        assert np.all(mean[spec.offset : spec.offset + spec.numel] >= 0)


def test_seeded_rounding_is_reproducible(packed_keys: tuple[bytes, bytes]) -> None:
    """Same seed, run, round and hospital: identical quantized integers (and aggregate);
    another hospital label or no seed: different rounding noise."""
    x = np.random.default_rng(4).normal(0, 0.1, 5000)

    def encoded(label: str, seed: int | None) -> np.ndarray:
        h = hospital_from_bytes(packed_keys[0])
        h.set_reference(x, total_examples=20)
        h.set_round("run", 2, hospital=label, seed=seed)
        return h.encode(x * 10, num_examples=10).slots

    assert np.array_equal(encoded("a", 1), encoded("a", 1))
    assert not np.array_equal(encoded("a", 1), encoded("b", 1))
    assert not np.array_equal(encoded("a", None), encoded("a", None))
    with pytest.raises(ConfigError, match="hospital label"):
        hospital_from_bytes(packed_keys[0]).set_round("run", 1, seed=3)


def test_server_cannot_decrypt(packed: tuple[BFVHospital, BFVAggregator]) -> None:
    hospital, server = packed
    ctx = server._ctx
    assert isinstance(ctx, BFVContext)
    assert not ctx.is_private()
    blob = server.aggregate([hospital.protect(np.full(10, 0.5), num_examples=2)])
    env = wire.unpack(blob)
    from fedcrypt.protection.he import framing

    common = framing.read_common(env.header, max_ciphertexts=2)
    sealed = framing.sealed_of(env.sections[1], env.sections[2], common, ctx.word_format)
    with pytest.raises(KeyMaterialError):
        ctx.decrypt(sealed)
    with pytest.raises(KeyMaterialError):
        ctx.encrypt(np.zeros((1, ctx.slots), dtype=np.int64))
    with pytest.raises(KeyMaterialError):
        BFVAggregator(hospital._ctx, preset=hospital.preset, fingerprint=hospital.fingerprint)
    with pytest.raises(KeyMaterialError):
        BFVHospital(ctx, preset=server.preset, fingerprint=server.fingerprint)
    np.testing.assert_allclose(hospital.unprotect(blob).mean, 0.5, atol=1e-3)


def test_rejects_mixed_grids_and_tampering(
    packed_keys: tuple[bytes, bytes], packed: tuple[BFVHospital, BFVAggregator]
) -> None:
    hospital, server = packed
    other = hospital_from_bytes(packed_keys[0])
    x = np.random.default_rng(0).normal(0, 0.1, 5000)
    hospital.set_reference(x, total_examples=20)
    calibrated = hospital.protect(x, num_examples=10)
    calibration = other.protect(x, num_examples=10)
    with pytest.raises(AggregationError, match="different grid"):
        server.aggregate([calibrated, calibration])
    with pytest.raises(AggregationError, match="exceed"):
        server.aggregate([calibrated] * 5)  # 50 examples > 2 x 20
    with pytest.raises(ConfigError, match="capacity"):
        hospital.protect(x, num_examples=41)
    env = wire.unpack(server.aggregate([calibrated]))
    sections = [bytes(s) for s in env.sections]
    table = bytearray(sections[0])
    table[3] ^= 1
    with pytest.raises(IntegrityError, match="step table"):
        hospital.unprotect(wire.pack(env.header, [bytes(table), *sections[1:]]))
    with pytest.raises(ProtocolError):
        server.aggregate([calibrated[:-10]])
    with pytest.raises(ProtocolError):
        server.aggregate([wire.pack(dict(env.header, fields=3), sections)])
    with pytest.raises(ProtocolError, match="seeds"):
        server.aggregate([wire.pack(dict(env.header, num_updates=2), sections)])


def test_aggregate_is_self_describing(
    packed_keys: tuple[bytes, bytes], packed: tuple[BFVHospital, BFVAggregator]
) -> None:
    """A restarted hospital (no reference) decodes a calibrated aggregate on its own."""
    hospital, server = packed
    x = np.random.default_rng(1).normal(0, 0.1, 3000)
    hospital.set_reference(x, total_examples=5)
    agg = server.aggregate([hospital.protect(x, num_examples=5)])
    fresh = hospital_from_bytes(packed_keys[0])
    np.testing.assert_allclose(fresh.unprotect(agg).mean, x, atol=1e-5)
    assert wire.unpack(fresh.protect(x, num_examples=5)).header["mode"] == "calibrated"


def test_rejects_other_key(packed: tuple[BFVHospital, BFVAggregator]) -> None:
    hospital, server = packed
    h_bytes, s_bytes = generate_keys("packed")
    other_h, other_s = hospital_from_bytes(h_bytes), server_from_bytes(s_bytes)
    foreign = other_h.protect(np.ones(100), num_examples=1)
    with pytest.raises(AggregationError, match="another key context"):
        server.aggregate([foreign])
    with pytest.raises(DecryptionError, match="another key context"):
        hospital.unprotect(other_s.aggregate([foreign]))


def test_integer_buffers_beyond_their_range_are_refused(packed_keys: tuple[bytes, bytes]) -> None:
    state = _bn_model().state_dict()
    state["1.num_batches_tracked"] = torch.tensor(2**40)
    h = hospital_from_bytes(packed_keys[0], layout=Layout.of(state))
    with pytest.raises(ConfigError, match="exact range"):
        h.protect(flatten(state), num_examples=1000)
    with pytest.raises(ValueError, match="layout"):
        h.protect(np.ones(10), num_examples=1)


def test_a_small_round_does_not_shrink_the_grid(packed: tuple[BFVHospital, BFVAggregator]) -> None:
    """1 of 3 hospitals in round 2, all 3 again in round 3: the grid still fits (issue #12).

    Round 3's grid is calibrated for max(Σn of round 2, round 2's own capacity / 2^growth),
    which every hospital derives from the aggregate it decrypted.
    """
    hospital, server = packed
    rng = np.random.default_rng(3)
    counts = [100, 90, 95]
    x = [rng.normal(0, 0.2, 5000) for _ in counts]
    hospital.set_round("r", 1)
    mean1, _, _, _ = _round(hospital, server, x, counts)
    hospital.set_round("r", 2)
    mean2, _, _, agg2 = _round(hospital, server, [mean1 + 0.01], [counts[0]])
    assert wire.unpack(agg2).header["max_examples"] >= 2 * sum(counts)
    assert hospital.reference_examples == sum(counts)  # not 100: the capacity carries over
    hospital.set_round("r", 3)
    upd = [mean2 + rng.normal(0, 0.01, 5000) for _ in counts]
    mean3, exp3, _, _ = _round(hospital, server, upd, counts)
    bound = error_bound(hospital.preset, num_hospitals=3, max_abs=1.0, total_examples=285)
    np.testing.assert_allclose(mean3, exp3, rtol=0, atol=max(bound, 1e-4))


def test_the_grid_capacity_is_authenticated(packed: tuple[BFVHospital, BFVAggregator]) -> None:
    hospital, server = packed
    x = np.random.default_rng(4).normal(0, 0.1, 3000)
    hospital.set_round("r", 1)
    _round(hospital, server, [x, x], [10, 10])
    hospital.set_round("r", 2)
    agg = server.aggregate([hospital.protect(x, num_examples=10)] * 2)
    env = wire.unpack(agg)
    header = {**env.header, "max_examples": env.header["max_examples"] * 8}
    with pytest.raises(IntegrityError):
        hospital.unprotect(wire.pack(header, env.sections))
