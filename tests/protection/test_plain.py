"""The plain baseline: FedAvg summed in float64, float32 on the wire, validated input."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.exceptions import AggregationError, ProtocolError, ReplayError
from fedcrypt.protection import wire
from fedcrypt.protection.base import HospitalProtection, ServerAggregator, UploadCheck
from fedcrypt.protection.plain import PlainAggregator, PlainHospital, check_upload


def test_fedavg_is_the_example_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=50) for _ in range(3)]
    counts = [10, 30, 60]
    hospital, server = PlainHospital(), PlainAggregator()
    assert isinstance(hospital, HospitalProtection) and isinstance(server, ServerAggregator)
    agg = server.aggregate(
        [hospital.protect(u, num_examples=n) for u, n in zip(updates, counts, strict=True)]
    )
    result = hospital.unprotect(agg)
    # float32 weights in (lossless for a float32 model), float64 sum, one float32 rounding
    sent = [u.astype(np.float32).astype(np.float64) for u in updates]
    expected = sum(n * u for u, n in zip(sent, counts, strict=True)) / sum(counts)
    np.testing.assert_allclose(result.mean, expected.astype(np.float32), rtol=0, atol=0)
    assert (result.total_examples, result.num_updates) == (100, 3)


def test_float32_on_the_wire() -> None:
    """4 bytes per value up and down (Flower sends float32), plus a small header."""
    x = np.random.default_rng(1).normal(size=100_000).astype(np.float32)
    blob = PlainHospital().protect(x.astype(np.float64), num_examples=5)
    assert len(blob) < 4.01 * x.size
    env = wire.unpack(blob)
    assert (env.header["format"], env.header["dtype"]) == (2, "float32")
    np.testing.assert_array_equal(PlainHospital().unprotect(blob).mean, x)  # lossless
    agg = PlainAggregator().aggregate([blob] * 3)
    assert len(agg) < 4.01 * x.size
    check_upload(env.header, [len(env.sections[0])], UploadCheck())
    with pytest.raises(ProtocolError):
        check_upload(env.header, [8 * x.size], UploadCheck())
    with pytest.raises(ValueError, match="float32"):
        PlainHospital().protect(np.array([1e39]), num_examples=1)


def test_rounds_are_labelled_and_checked() -> None:
    h = PlainHospital()
    h.set_round("run", 2)
    agg = PlainAggregator().aggregate([h.protect(np.ones(4), num_examples=1)])
    assert wire.unpack(agg).header["round"] == 2
    assert h.unprotect(agg, round=2).num_updates == 1
    with pytest.raises(ReplayError, match="round 2"):
        h.unprotect(agg, round=3)
    other = PlainHospital()
    other.set_round("run", 3)
    with pytest.raises(AggregationError, match="rounds"):
        PlainAggregator().aggregate(
            [h.protect(np.ones(4), num_examples=1), other.protect(np.ones(4), num_examples=1)]
        )


@pytest.mark.parametrize(
    ("update", "n", "match"),
    [
        (np.zeros((2, 2)), 1, "1-D"),
        (np.array([1.0, np.nan]), 1, "NaN"),
        (np.array([1, 2]), 1, "floating"),
        (np.ones(3), 0, ">= 1"),
        (np.ones(3), True, "int"),
    ],
)
def test_bad_updates_are_refused(update: np.ndarray, n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlainHospital().protect(update, num_examples=n)


def test_mismatched_sizes_and_empty_rounds_are_refused() -> None:
    h = PlainHospital()
    with pytest.raises(AggregationError, match="sizes differ"):
        PlainAggregator().aggregate(
            [h.protect(np.ones(3), num_examples=1), h.protect(np.ones(4), num_examples=1)]
        )
    with pytest.raises(AggregationError, match="no updates"):
        PlainAggregator().aggregate([])


def test_payload_size_must_match_header() -> None:
    blob = PlainHospital().protect(np.ones(3), num_examples=1)
    with pytest.raises(ProtocolError):
        PlainHospital().unprotect(blob[:-8])
    env = wire.unpack(blob)
    with pytest.raises(ProtocolError, match="non-finite"):
        PlainHospital().unprotect(wire.pack(env.header, [np.full(3, np.inf, ">f4").tobytes()]))
