"""Tests for stochastic rounding, carry-safe field packing and calibrated steps."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.protection.he.quantize import (
    BLOCK,
    FieldPacking,
    StepTable,
    calibrate,
    ceil_log2,
    dequantize,
    quantize,
    stochastic_round,
    uniform_steps,
)
from fedcrypt.protection.he.seal import compact_words, expand_words


def test_ceil_log2_exact() -> None:
    x = np.array([1.0, 2.0, 3.0, 0.5, 0.75, 1024.0, 1025.0, 2.0**-30])
    assert ceil_log2(x).tolist() == [0, 1, 2, -1, 0, 10, 11, -30]


def test_stochastic_round_is_unbiased_and_bounded() -> None:
    rng = np.random.default_rng(1)
    a = np.full(200_000, 0.3)
    r = stochastic_round(a, rng)
    assert set(np.unique(r)) <= {0, 1}
    assert abs(r.mean() - 0.3) < 0.005
    b = np.random.default_rng(2).normal(0, 100, 1000)
    rb = stochastic_round(b, rng)
    assert np.all(np.abs(rb - b) < 1)
    assert rb.dtype == np.int64


@pytest.mark.parametrize(("fields", "bits"), [(1, 44), (2, 22), (3, 14)])
def test_packing_sums_without_carries(fields: int, bits: int) -> None:
    """Worst-case field sums (±bound) survive packing, adding as integers and unpacking."""
    fp = FieldPacking(fields, bits)
    rng = np.random.default_rng(0)
    k = 8
    per = fp.bound // k
    ints = [rng.integers(-per, per + 1, 3000) for _ in range(k)]
    ints[0][:4] = [per, -per, per, -per]
    total = sum(fp.pack(v, 256) for v in ints)
    assert int(np.abs(total).max()) < 2 ** (fields * bits - 1) * (1 + 2.0**-bits)
    np.testing.assert_array_equal(fp.unpack(total, size=3000), sum(ints))


def test_unpack_detects_overflow() -> None:
    fp = FieldPacking(2, 22)
    big = np.array([[fp.bound + 1]], dtype=np.int64) * (1 << 22)
    with pytest.raises(ValueError, match="range"):
        fp.unpack(big, size=1)


def test_calibrate_guarantees_field_bound() -> None:
    """A round with Σ n_i = 2^growth · M examples and |x| at the clip fits the field."""
    fp = FieldPacking(2, 22)
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 0.1, 10 * BLOCK)
    m = 1000
    cal = calibrate(
        ref, reference_examples=m, packing=fp, margin_bits=1, growth_bits=1, max_hospitals=64
    )
    assert cal.max_examples == 2 * m
    counts = [500, 700, 800]  # sums to 2000 = max_examples
    total = np.zeros(ref.size, dtype=np.int64)
    for n in counts:
        x = np.sign(ref) * 10.0  # far beyond the clip: every value clipped
        q = quantize(x * n, cal.steps, clip=n * cal.clip_per_example, rng=rng)
        assert q.clipped == ref.size
        total += q.ints
    assert int(np.abs(total).max()) <= fp.bound
    # the same reference gives the same table (every hospital agrees)
    again = calibrate(
        ref.copy(), reference_examples=m, packing=fp, margin_bits=1, growth_bits=1, max_hospitals=64
    )
    assert again.steps.to_bytes() == cal.steps.to_bytes()


def test_quantize_round_trip_precision() -> None:
    fp = FieldPacking(2, 22)
    rng = np.random.default_rng(4)
    ref = rng.normal(0, 0.05, 4096)
    cal = calibrate(
        ref, reference_examples=100, packing=fp, margin_bits=1, growth_bits=1, max_hospitals=64
    )
    x = ref + rng.normal(0, 0.001, ref.size)
    q = quantize(x * 100, cal.steps, clip=100 * cal.clip_per_example, rng=rng)
    assert q.clipped == 0
    back = dequantize(q.ints, cal.steps) / 100
    steps = np.ldexp(1.0, cal.steps.per_value(ref.size)) / 100  # type: ignore[arg-type]
    assert np.all(np.abs(back - x) < steps)
    assert np.max(np.abs(back - x)) < 1e-5


def test_step_table_bytes_round_trip() -> None:
    t = StepTable(np.array([-3, 0, 5], dtype=np.int8))
    assert StepTable.from_bytes(t.to_bytes(), size=3 * BLOCK).to_bytes() == t.to_bytes()
    with pytest.raises(ValueError):
        StepTable.from_bytes(t.to_bytes(), size=10 * BLOCK)
    u = uniform_steps(12)
    assert u.to_bytes() == b""
    assert u.per_value(5) == -12


def test_compact_words_round_trip() -> None:
    rng = np.random.default_rng(5)
    words = 64
    data = rng.integers(0, 2**60, words, dtype=np.uint64)
    prefix = b"hdr" + np.uint64(words).tobytes()
    raw = prefix + data.tobytes()
    packed = compact_words(raw, words)
    assert len(packed) == 1 + len(prefix) + words * 7.5
    assert expand_words(packed, words) == raw
    # layouts it does not recognise travel raw
    assert expand_words(compact_words(b"short", words), words) == b"short"
    with pytest.raises(ValueError):
        expand_words(packed[:20], words)
