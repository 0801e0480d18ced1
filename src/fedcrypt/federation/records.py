"""Carry opaque protected bytes and metrics in Flower records."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Array, ArrayRecord

from fedcrypt.exceptions import ProtocolError

BLOB_KEY = "blob"


def blob_record(data: bytes) -> ArrayRecord:
    """Wrap ``data`` as a one-entry ``ArrayRecord`` (Flower chunks it on the wire)."""
    return ArrayRecord({BLOB_KEY: Array(dtype="bytes", shape=(len(data),), stype="raw", data=data)})


def blob_from(record: ArrayRecord | None) -> bytes:
    """Extract the bytes stored by :func:`blob_record`.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the record does not hold a blob.
    """
    if record is None or BLOB_KEY not in record:
        raise ProtocolError("message carries no protected payload")
    arr = record[BLOB_KEY]
    if arr.dtype != "bytes":
        raise ProtocolError("protected payload has the wrong type")
    return bytes(arr.data)


def weighted_metrics(records: Iterable[Mapping[str, Any]], *, weight_key: str) -> dict[str, float]:
    """Example-weighted mean of every scalar metric (NaN values are skipped).

    Parameters
    ----------
    records : iterable of mappings
        One per hospital.
    weight_key : str
        Key holding each record's example count.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        w = float(rec.get(weight_key, 0) or 0)
        for key, value in rec.items():
            if key == weight_key or isinstance(value, list):
                continue
            v = float(value)
            if math.isnan(v) or w <= 0:
                continue
            sums[key] = sums.get(key, 0.0) + w * v
            weights[key] = weights.get(key, 0.0) + w
    return {k: sums[k] / weights[k] for k in sums}


def plain_mean(records: Iterable[Mapping[str, Any]], key: str) -> float:
    """Unweighted mean of ``key`` over records (per-hospital costs: bytes, seconds)."""
    values = [float(r.get(key, 0.0)) for r in records]
    return sum(values) / len(values) if values else 0.0
