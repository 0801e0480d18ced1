"""Parameter validation, the overflow bound and quantization round trips."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedcrypt.exceptions import ConfigError, DecryptionError
from fedcrypt.protection.secagg import RoundConfig, SecAggParams, secure_threshold
from fedcrypt.protection.secagg.masking import EXTRA, dequantize, quantize


def test_default_scale_is_largest_safe_power_of_two() -> None:
    p = SecAggParams()
    # 4 * s * 50 * 65536 + 25 <= 2^31 - 1  ->  s = 2^7
    assert p.resolved_scale == 128.0
    assert p.to_json()["scale"] == 128.0


def test_explicit_scale_that_could_overflow_is_refused() -> None:
    SecAggParams(scale=128.0)
    with pytest.raises(ConfigError, match="overflow"):
        SecAggParams(scale=256.0)
    with pytest.raises(ConfigError):
        SecAggParams(bits=32, clip=1e6, max_hospitals=50, max_examples=65_536, scale=1.0)


def test_64_bit_allows_a_much_finer_scale() -> None:
    assert SecAggParams(bits=64).resolved_scale == 2.0**39


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 16},
        {"clip": 0.0},
        {"clip": float("inf")},
        {"max_hospitals": 1},
        {"max_examples": 0},
        {"neighbours": 3},
        {"neighbours": 0},
        {"max_hospitals": 2**16, "max_examples": 2**16},  # count cannot fit 32 bits
        {"scale": -1.0},
    ],
)
def test_bad_params_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SecAggParams(**kwargs)  # type: ignore[arg-type]


def test_round_config_threshold_rules() -> None:
    p = SecAggParams()  # colluders = 1: 2t > g + 1
    assert RoundConfig(round=1, hospital_ids=(5, 1, 3), vector_size=4, params=p).t == 3
    assert RoundConfig(round=1, hospital_ids=tuple(range(5)), vector_size=4, params=p).t == 4
    with pytest.raises(ConfigError):  # not a majority
        RoundConfig(round=1, hospital_ids=tuple(range(6)), vector_size=4, params=p, threshold=3)
    with pytest.raises(ConfigError):
        RoundConfig(round=1, hospital_ids=tuple(range(5)), vector_size=4, params=p, threshold=6)
    with pytest.raises(ConfigError):
        RoundConfig(round=0, hospital_ids=(1, 2, 3), vector_size=4, params=p)
    with pytest.raises(ConfigError):
        RoundConfig(round=1, hospital_ids=(1, 1, 3), vector_size=4, params=p)
    with pytest.raises(ConfigError):
        RoundConfig(round=1, hospital_ids=tuple(range(51)), vector_size=4, params=p)
    k = SecAggParams(neighbours=4)
    cfg = RoundConfig(round=1, hospital_ids=tuple(range(20)), vector_size=4, params=k)
    assert (cfg.group_size, cfg.t) == (5, 4)
    # SecAgg+: every hospital must agree on one survivor set, so a majority beyond the
    # colluders of all 20 invited hospitals signs it
    assert cfg.signatures_needed == 11
    full = RoundConfig(round=1, hospital_ids=tuple(range(20)), vector_size=4, params=p)
    assert (full.t, full.signatures_needed, full.colluders_tolerated) == (11, 11, 1)


@pytest.mark.parametrize(
    ("n", "colluders", "expected"),
    [(2, 1, 2), (3, 1, 3), (4, 1, 3), (5, 1, 4), (10, 1, 6), (50, 1, 26), (5, 0, 3), (10, 3, 7)],
)
def test_default_threshold_is_the_smallest_with_2t_above_g_plus_colluders(
    n: int, colluders: int, expected: int
) -> None:
    assert secure_threshold(n, colluders) == expected
    assert 2 * expected > n + colluders or expected == n
    assert expected == n or 2 * (expected - 1) <= n + colluders  # smallest
    params = SecAggParams(colluders=colluders)
    cfg = RoundConfig(round=1, hospital_ids=tuple(range(n)), vector_size=4, params=params)
    assert cfg.t == expected
    assert cfg.colluders_tolerated >= colluders


def test_threshold_insecure_against_an_active_server_alone_is_refused() -> None:
    p = SecAggParams(colluders=0)
    with pytest.raises(ConfigError, match=r"insecure.*active server alone.*2t > 6"):
        RoundConfig(round=1, hospital_ids=tuple(range(6)), vector_size=4, params=p, threshold=3)
    k = SecAggParams(neighbours=4, colluders=0)  # share groups of 5
    with pytest.raises(ConfigError, match="insecure"):
        RoundConfig(round=1, hospital_ids=tuple(range(20)), vector_size=4, params=k, threshold=2)


def test_weaker_threshold_names_what_it_tolerates_and_how_to_accept_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """t = 3 of 5 resists an active server alone, not one colluding hospital too."""
    with pytest.raises(ConfigError, match=r"tolerates only 0 .* colluders=1 .* t >= 4"):
        RoundConfig(
            round=1, hospital_ids=tuple(range(5)), vector_size=4, params=SecAggParams(), threshold=3
        )
    with caplog.at_level(logging.WARNING):
        weak = SecAggParams(colluders=0)
    assert "colluders=0" in caplog.text and "active server alone" in caplog.text
    cfg = RoundConfig(round=1, hospital_ids=tuple(range(5)), vector_size=4, params=weak)
    assert (cfg.t, cfg.colluders_tolerated) == (3, 0)
    stronger = RoundConfig(
        round=1, hospital_ids=tuple(range(5)), vector_size=4, params=SecAggParams(), threshold=5
    )
    assert stronger.colluders_tolerated == 4


@pytest.mark.parametrize("colluders", [-1, 50, True, 1.5])
def test_bad_colluders_are_config_errors(colluders: object) -> None:
    with pytest.raises(ConfigError, match="colluders"):
        SecAggParams(colluders=colluders)  # type: ignore[arg-type]


def test_colluders_beyond_the_round_cannot_be_met() -> None:
    with pytest.raises(ConfigError, match="tolerates only"):
        RoundConfig(
            round=1, hospital_ids=(1, 2, 3), vector_size=4, params=SecAggParams(colluders=3)
        )


def test_round_config_json_round_trip_and_session() -> None:
    cfg = RoundConfig(
        round=3, hospital_ids=(2, 9, 4), vector_size=10, params=SecAggParams(neighbours=2)
    )
    again = RoundConfig.from_json(cfg.to_json())
    assert again.to_json() == cfg.to_json() and again.session == cfg.session
    other = RoundConfig(round=4, hospital_ids=(2, 9, 4), vector_size=10, params=cfg.params)
    assert other.session != cfg.session
    with pytest.raises(ConfigError):
        RoundConfig.from_json({"round": 1})


def test_worst_case_sums_do_not_wrap() -> None:
    """max_hospitals updates at +-clip with max_examples each decode exactly."""
    p = SecAggParams(max_hospitals=7, max_examples=1000, clip=2.0)
    dtype = np.dtype("<u4")
    for sign in (1.0, -1.0):
        x = np.full(3, sign * 5.0)  # clipped to +-2
        total = np.zeros(3 + EXTRA, dtype=dtype)
        for _ in range(7):
            np.add(total, quantize(x.copy(), 1000, p), out=total)
        mean, count = dequantize(total, p)
        assert count == 7000
        np.testing.assert_allclose(mean, sign * 2.0, rtol=0, atol=1e-12)


def test_quantization_error_is_within_the_bound() -> None:
    p = SecAggParams()
    gen = np.random.default_rng(3)
    xs = [gen.uniform(-4, 4, 1000) for _ in range(5)]
    ns = [1, 7, 100, 3, 50]
    total = np.zeros(1000 + EXTRA, dtype=np.dtype("<u4"))
    for x, n in zip(xs, ns, strict=True):
        np.add(total, quantize(x.copy(), n, p), out=total)
    mean, count = dequantize(total, p)
    exact = sum(n * x for x, n in zip(xs, ns, strict=True)) / sum(ns)
    assert count == sum(ns)
    assert np.abs(mean - exact).max() <= p.error_bound(5, count)


def test_too_many_examples_is_refused() -> None:
    p = SecAggParams(max_examples=10)
    with pytest.raises(ConfigError, match="max_examples"):
        quantize(np.zeros(3), 11, p)


def test_nonzero_check_element_means_wrong_key() -> None:
    p = SecAggParams()
    total = quantize(np.zeros(3), 2, p)
    total[-1] = 1
    with pytest.raises(DecryptionError):
        dequantize(total, p)
