"""Tests for stochastic rounding, carry-safe field packing and calibrated steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcrypt.protection.flatten import Layout
from fedcrypt.protection.he.quantize import (
    BLOCK,
    SEG_FLOAT,
    SEG_INT,
    SEG_VAR,
    FieldPacking,
    QuantPlan,
    StepTable,
    calibrate,
    ceil_log2,
    dequantize,
    quantize,
    stochastic_round,
    uniform_steps,
)


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
    total = sum(fp.pack(v) for v in ints)
    assert total.shape == (fp.slots_for(3000),)
    assert int(np.abs(total).max()) < 2 ** (fields * bits - 1) * (1 + 2.0**-bits)
    np.testing.assert_array_equal(fp.unpack(total, size=3000), sum(ints))


def test_unpack_detects_overflow() -> None:
    fp = FieldPacking(2, 22)
    big = np.array([fp.bound + 1], dtype=np.int64) * (1 << 22)
    with pytest.raises(ValueError, match="range"):
        fp.unpack(big, size=1)


def _blocks(n: int) -> np.ndarray:
    return QuantPlan.flat(n).block_lengths


def test_calibrate_guarantees_field_bound() -> None:
    """A round with Σ n_i = 2^growth · M examples and |x| at the clip fits the field."""
    fp = FieldPacking(2, 22)
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 0.1, 10 * BLOCK + 5)
    m = 1000
    kw = dict(packing=fp, margin_bits=1, growth_bits=1, max_hospitals=64)
    cal = calibrate(ref, block_lengths=_blocks(ref.size), reference_examples=m, **kw)
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
    again = calibrate(ref.copy(), block_lengths=_blocks(ref.size), reference_examples=m, **kw)
    assert again.steps.to_bytes() == cal.steps.to_bytes()


def test_quantize_round_trip_precision() -> None:
    """About 2^-18 of the block's magnitude per hospital at 22-bit fields."""
    fp = FieldPacking(2, 22)
    rng = np.random.default_rng(4)
    ref = rng.normal(0, 0.05, 4096)
    cal = calibrate(
        ref,
        block_lengths=_blocks(ref.size),
        reference_examples=100,
        packing=fp,
        margin_bits=1,
        growth_bits=1,
        max_hospitals=64,
    )
    x = ref + rng.normal(0, 0.001, ref.size)
    q = quantize(x * 100, cal.steps, clip=100 * cal.clip_per_example, rng=rng)
    assert q.clipped == 0
    back = dequantize(q.ints, cal.steps) / 100
    steps = np.asarray(cal.steps.per_value(ref.size)) / 100
    assert np.all(np.abs(back - x) < steps)
    assert np.max(np.abs(back - x)) < 3e-6


def test_stochastic_rounding_keeps_non_negative_values_non_negative() -> None:
    a = np.random.default_rng(0).random(100_000) * 3
    a[:10] = 0.0
    assert np.all(stochastic_round(a, np.random.default_rng(1)) >= 0)


def test_plan_of_a_model_layout() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 70, 3), torch.nn.BatchNorm2d(70))
    layout = Layout.of(model.state_dict())
    plan = QuantPlan.of(layout)
    assert plan.kinds == (SEG_FLOAT, SEG_FLOAT, SEG_FLOAT, SEG_FLOAT, SEG_FLOAT, SEG_VAR, SEG_INT)
    assert plan.size == layout.size
    # blocks restart at every tensor: 630 = 9 x 64 + 54, then 70 = 64 + 6 per vector
    assert plan.block_lengths.tolist() == [64] * 9 + [54] + [64, 6] * 5
    assert plan.exact_index.tolist() == [layout.size - 1]
    var = layout.tensors[5]
    assert plan.variance_index.tolist() == list(range(var.offset, var.offset + var.numel))
    again, rest = QuantPlan.from_bytes(plan.to_bytes() + b"tail", size=layout.size)
    assert again == plan and rest == b"tail"
    with pytest.raises(ValueError):
        QuantPlan.from_bytes(plan.to_bytes(), size=layout.size + 1)
    with pytest.raises(ValueError):
        QuantPlan.from_bytes(b"junk", size=1)


def test_step_table_bytes_round_trip() -> None:
    plan = QuantPlan.flat(3 * BLOCK)
    t = StepTable(
        np.array([0.5, 1.0, 3.0e-7], dtype=np.float32).astype(np.float64), 0, plan.block_lengths
    )
    assert StepTable.from_bytes(t.to_bytes(), plan=plan).to_bytes() == t.to_bytes()
    with pytest.raises(ValueError):
        StepTable.from_bytes(t.to_bytes(), plan=QuantPlan.flat(10 * BLOCK))
    with pytest.raises(ValueError, match="positive"):
        StepTable.from_bytes(np.array([1, -1, 1], dtype="<f4").tobytes(), plan=plan)
    u = uniform_steps(12)
    assert u.to_bytes() == b""
    assert u.per_value(5) == 2.0**-12
