"""The per-tensor-kind error bounds hold on a real aggregation of a trained CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _he_cnn import COUNTS, Federation

from fedcrypt.protection.he.bounds import tensor_bounds, value_bounds
from fedcrypt.protection.he.keys import generate_keys, hospital_from_bytes, server_from_bytes
from fedcrypt.protection.he.quantize import QuantPlan


@pytest.fixture(scope="module")
def fed(shared_data: Path) -> Federation:
    if not (shared_data / "pneumoniamnist.npz").is_file():
        pytest.skip("pneumoniamnist.npz not in the shared data")
    return Federation.load(shared_data)


@pytest.fixture(scope="module")
def updates(fed: Federation) -> list[list[np.ndarray]]:
    """Two rounds of three hospitals' trained weights (round 2 from round 1's FedAvg)."""
    first = [fed.train(fed.initial, i, 1) for i in range(3)]
    g1 = sum(n * u for n, u in zip(COUNTS, first, strict=True)) / sum(COUNTS)
    return [first, [fed.train(g1, i, 2) for i in range(3)]]


@pytest.mark.parametrize("preset", ["packed", "compact", "fast"])
def test_bounds_hold_per_tensor_kind_on_a_trained_cnn(
    fed: Federation, updates: list[list[np.ndarray]], preset: str
) -> None:
    """Round 1 (calibration) and round 2 (calibrated on round 1's decrypted global model)
    of three hospitals training the CNN: every value of the decrypted FedAvg is within its
    bound, integer buffers are exact (packed presets), variances are never negative."""
    hb, sb = generate_keys(preset)
    hospitals = [hospital_from_bytes(hb, layout=fed.layout) for _ in range(3)]
    server = server_from_bytes(sb)
    plan = QuantPlan.of(fed.layout)
    reference = None
    for rnd, ups in enumerate(updates, start=1):
        for i, h in enumerate(hospitals):
            h.set_round("bounds", rnd, hospital=str(i), seed=0)
        blobs = [
            h.protect(u, num_examples=n) for h, u, n in zip(hospitals, ups, COUNTS, strict=True)
        ]
        assert sum(h.last_clipped for h in hospitals) == 0
        agg = server.aggregate(blobs)
        mean = [h.unprotect(agg) for h in hospitals][-1].mean
        exact = sum(n * u for n, u in zip(COUNTS, ups, strict=True)) / sum(COUNTS)
        kw: dict[str, object] = dict(
            num_hospitals=3, total_examples=sum(COUNTS), reference=reference
        )
        if preset == "fast":
            kw["max_abs"] = float(np.abs(np.stack(ups)).max())
        bounds = value_bounds(hospitals[0].preset, plan, **kw)  # type: ignore[arg-type]
        err = np.abs(mean - exact)
        assert np.all(err <= bounds), f"round {rnd}: {int((err > bounds).sum())} values outside"
        per = {b.name: b for b in tensor_bounds(hospitals[0].preset, fed.layout, **kw)}
        assert {b.kind for b in per.values()} == {"weight", "bias", "bn_mean", "bn_var", "integer"}
        for spec in fed.layout.tensors:
            part = slice(spec.offset, spec.offset + spec.numel)
            b = per[spec.name]
            if spec.kind == "bn_var":
                assert np.all(mean[part] >= 0) and b.non_negative
            if spec.kind == "integer" and preset != "fast":
                assert b.exact and b.bound == 0.0
                assert np.array_equal(mean[part], exact[part])
            if rnd == 2 and preset == "packed" and spec.kind != "integer":
                # about K 2^-17 of the block's magnitude: far below any tensor's scale
                assert b.bound <= 3e-5 * max(float(np.abs(exact[part]).max()), 1e-3)
        reference = mean
