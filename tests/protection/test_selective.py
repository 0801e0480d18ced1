"""Tests for layer selection and the selective (part-encrypted) wrapper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcrypt.exceptions import AggregationError, ConfigError, ProtocolError
from fedcrypt.protection import he, wire
from fedcrypt.protection.base import HospitalProtection, ServerAggregator
from fedcrypt.protection.flatten import Layout, flatten
from fedcrypt.protection.he.keys import generate_keys, hospital_from_bytes, server_from_bytes
from fedcrypt.protection.selective import (
    SelectiveAggregator,
    SelectiveHospital,
    parameterized_modules,
    select_layers,
    selected_layout,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 8),
        torch.nn.Linear(8, 2),
    )


@pytest.fixture(scope="module")
def layout() -> Layout:
    return Layout.of(_model().state_dict())


def _span(layout: Layout, *names: str) -> set[int]:
    out: set[int] = set()
    for t in layout.tensors:
        if t.name in names:
            out.update(range(t.offset, t.offset + t.numel))
    return out


def test_parameterized_modules(layout: Layout) -> None:
    assert parameterized_modules(layout) == ["0", "1", "4", "5"]


def test_select_all_last_and_regex(layout: Layout) -> None:
    assert select_layers(layout, "all").all()
    last = select_layers(layout, "last")
    assert set(np.flatnonzero(last)) == _span(layout, "5.weight", "5.bias")
    two = select_layers(layout, "last:2")
    assert set(np.flatnonzero(two)) == _span(layout, "4.weight", "4.bias", "5.weight", "5.bias")
    bn = select_layers(layout, "last:3")  # includes the BatchNorm's buffers
    assert _span(layout, "1.running_mean", "1.num_batches_tracked") <= set(np.flatnonzero(bn))
    rx = select_layers(layout, r"^0\.")
    assert set(np.flatnonzero(rx)) == _span(layout, "0.weight", "0.bias")
    assert last.dtype == np.bool_ and last.shape == (layout.size,)


@pytest.mark.parametrize("spec", ["last:0", "last:9", "nomatch$", "("])
def test_bad_specs(layout: Layout, spec: str) -> None:
    with pytest.raises(ConfigError):
        select_layers(layout, spec)


@pytest.fixture(scope="module")
def keys_fast() -> tuple[bytes, bytes]:
    return generate_keys("fast")


def test_selective_fedavg(layout: Layout, keys_fast: tuple[bytes, bytes]) -> None:
    """Encrypted and plaintext parts reassemble into the plaintext FedAvg."""
    mask = select_layers(layout, "last:2")
    hospital = SelectiveHospital(hospital_from_bytes(keys_fast[0]), mask)
    server = SelectiveAggregator(server_from_bytes(keys_fast[1]), mask_size=layout.size)
    assert isinstance(hospital, HospitalProtection)
    assert isinstance(server, ServerAggregator)
    base = flatten(_model().state_dict())
    rng = np.random.default_rng(0)
    updates = [base + rng.normal(0, 0.01, base.size) for _ in range(3)]
    counts = [5, 10, 20]
    blobs = [hospital.protect(u, num_examples=n) for u, n in zip(updates, counts, strict=True)]
    env = wire.unpack(blobs[0])
    assert env.header["fraction_encrypted"] == pytest.approx(mask.mean())
    assert hospital.fraction_encrypted == pytest.approx(mask.mean())
    result = hospital.unprotect(server.aggregate(blobs))
    expected = sum(u * n for u, n in zip(updates, counts, strict=True)) / sum(counts)
    np.testing.assert_allclose(result.mean, expected, atol=1e-6)
    assert (result.total_examples, result.num_updates) == (35, 3)
    # the clear part travels as float32 values (4 bytes each), as plain sends them
    assert env.header["clear"] == "float32"
    assert len(env.sections[1]) == 4 * int((~mask).sum())


def test_older_float64_clear_parts_are_still_read(
    layout: Layout, keys_fast: tuple[bytes, bytes]
) -> None:
    """A message of before the ``clear`` field: weighted float64 sums, still added and read."""
    mask = select_layers(layout, "last")
    hospital = SelectiveHospital(hospital_from_bytes(keys_fast[0]), mask)
    server = SelectiveAggregator(server_from_bytes(keys_fast[1]), mask_size=layout.size)
    base = flatten(_model().state_dict())
    env = wire.unpack(hospital.protect(base, num_examples=4))
    old_header = {k: v for k, v in env.header.items() if k != "clear"}
    clear = np.frombuffer(env.sections[1], dtype=">f4").astype(np.float64) * 4
    old = wire.pack(old_header, [bytes(env.sections[0]), clear.astype(">f8").tobytes()])
    result = hospital.unprotect(server.aggregate([old, hospital.protect(base, num_examples=4)]))
    # the clear part: exact up to float32 rounding; the encrypted part: within CKKS noise
    np.testing.assert_allclose(result.mean[~mask], base[~mask], rtol=1e-6, atol=0)
    np.testing.assert_allclose(result.mean[mask], base[mask], atol=1e-4)
    with pytest.raises(ProtocolError, match="plaintext format"):
        server.aggregate([wire.pack({**env.header, "clear": "int8"}, list(env.sections))])


def test_selective_with_packed_inner(layout: Layout, tmp_path: Path) -> None:
    """Through the registry factory: the inner scheme gets the selected tensors' layout
    (BatchNorm's counter travels exactly), and round binding reaches it."""
    h_bytes, s_bytes = generate_keys("packed")
    key = tmp_path / "hospital.key"
    key.write_bytes(h_bytes)
    key.chmod(0o600)
    hospital = he.hospital(key_file=key, encrypt_layers="last:3", layout=layout)
    assert isinstance(hospital, SelectiveHospital)
    server = SelectiveAggregator(server_from_bytes(s_bytes))
    model = _model()
    model(torch.randn(4, 1, 8, 8))
    x = flatten(model.state_dict())
    nbt = next(t for t in layout.tensors if t.name == "1.num_batches_tracked")
    for rnd in (1, 2):  # calibration round, then calibrated
        hospital.set_round("sel", rnd)
        result = hospital.unprotect(
            server.aggregate([hospital.protect(x, num_examples=4)] * 2), round=rnd
        )
        np.testing.assert_allclose(result.mean, x, atol=1e-4)
        assert result.mean[nbt.offset] == x[nbt.offset]
        assert hospital.last_clipped == 0


def test_selective_rejects_mismatch(layout: Layout, keys_fast: tuple[bytes, bytes]) -> None:
    inner_h = hospital_from_bytes(keys_fast[0])
    a = SelectiveHospital(inner_h, select_layers(layout, "last"))
    b = SelectiveHospital(inner_h, select_layers(layout, "last:2"))
    server = SelectiveAggregator(server_from_bytes(keys_fast[1]))
    x = flatten(_model().state_dict())
    ua, ub = a.protect(x, num_examples=1), b.protect(x, num_examples=1)
    with pytest.raises(AggregationError, match="selections"):
        server.aggregate([ua, ub])
    with pytest.raises(ProtocolError, match="selection"):
        b.unprotect(server.aggregate([ua]))
    with pytest.raises(ProtocolError):
        server.aggregate([ua[:-8]])
    with pytest.raises(AggregationError):
        SelectiveAggregator(server_from_bytes(keys_fast[1]), mask_size=3).aggregate([ua])
    with pytest.raises(ValueError):
        a.protect(x[:-1], num_examples=1)
    with pytest.raises(ConfigError):
        SelectiveHospital(inner_h, np.zeros(layout.size, dtype=bool))


def test_selected_layout_packs_the_chosen_tensors(layout: Layout) -> None:
    mask = select_layers(layout, "last:2")
    sub = selected_layout(layout, mask)
    assert sub.names() == ["4.weight", "4.bias", "5.weight", "5.bias"]
    assert sub.size == int(mask.sum())
    partial = mask.copy()
    partial[np.flatnonzero(mask)[0]] = False
    with pytest.raises(ConfigError, match="part of tensor"):
        selected_layout(layout, partial)
