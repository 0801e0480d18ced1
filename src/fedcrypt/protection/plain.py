"""The ``plain`` baseline: weighted updates travel unprotected (float64)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import AggregationError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.base import AggregateResult, UploadCheck, check_update

SCHEME = "plain"


def _read(blob: bytes) -> tuple[NDArray[np.float64], int, int]:
    env = wire.unpack(blob, expect_scheme=SCHEME)
    size = wire.header_int(env.header, "size", minimum=1)
    n = wire.header_int(env.header, "num_examples", minimum=1)
    k = wire.header_int(env.header, "num_updates", minimum=1)
    if len(env.sections) != 1 or len(env.sections[0]) != 8 * size:
        raise ProtocolError("malformed plain update: payload does not match its size")
    vec = np.frombuffer(env.sections[0], dtype=">f8").astype(np.float64)
    return vec, n, k


def _write(vec: NDArray[np.float64], num_examples: int, num_updates: int) -> bytes:
    header = {
        "scheme": SCHEME,
        "size": int(vec.size),
        "num_examples": int(num_examples),
        "num_updates": int(num_updates),
    }
    return wire.pack(header, [vec.astype(">f8").tobytes()])


class PlainHospital:
    """Hospital side of ``plain``: sends ``n_i * update`` as float64."""

    scheme = SCHEME

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """See :meth:`fedcrypt.protection.base.HospitalProtection.protect`."""
        vec = check_update(update, num_examples)
        return _write(vec * float(num_examples), num_examples, 1)

    def unprotect(self, aggregate: bytes) -> AggregateResult:
        """See :meth:`fedcrypt.protection.base.HospitalProtection.unprotect`."""
        vec, n, k = _read(aggregate)
        return AggregateResult(mean=vec / n, total_examples=n, num_updates=k)


class PlainAggregator:
    """Server side of ``plain``: adds the weighted updates."""

    scheme = SCHEME

    def aggregate(self, updates: Sequence[bytes]) -> bytes:
        """See :meth:`fedcrypt.protection.base.ServerAggregator.aggregate`."""
        if not updates:
            raise AggregationError("no updates to aggregate")
        total: NDArray[np.float64] | None = None
        n_total = 0
        k_total = 0
        for blob in updates:
            vec, n, k = _read(blob)
            if total is None:
                total = vec.copy()
            elif vec.shape != total.shape:
                raise AggregationError(
                    f"update sizes differ: {vec.size} values vs {total.size} values"
                )
            else:
                total += vec
            n_total += n
            k_total += k
        assert total is not None
        return _write(total, n_total, k_total)


def hospital(
    *, key_file: Path | None = None, encrypt_layers: str = "all", layout: object = None
) -> PlainHospital:
    """The hospital half of ``plain`` (key files and layer selection do not apply)."""
    return PlainHospital()


def server(*, key_file: Path | None = None, encrypt_layers: str = "all") -> PlainAggregator:
    """The server half of ``plain``."""
    return PlainAggregator()


def check_upload(
    header: dict[str, Any], section_lengths: Sequence[int], expected: UploadCheck
) -> None:
    """Check a ``plain`` upload's framing: one float64 section of ``size`` values.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the payload does not match the size its header states.
    """
    size = header.get("size")
    if not isinstance(size, int) or len(section_lengths) != 1:
        raise ProtocolError("malformed plain update: expected one payload section")
    if section_lengths[0] != 8 * size:
        raise ProtocolError("malformed plain update: payload does not match its size")
