"""The plain baseline computes exact FedAvg and validates its input."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.exceptions import AggregationError, ProtocolError
from fedcrypt.protection.base import HospitalProtection, ServerAggregator
from fedcrypt.protection.plain import PlainAggregator, PlainHospital


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
    expected = sum(n * u for u, n in zip(updates, counts, strict=True)) / sum(counts)
    np.testing.assert_allclose(result.mean, expected, rtol=0, atol=1e-12)
    assert (result.total_examples, result.num_updates) == (100, 3)


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
