"""The ``plain`` baseline: updates travel unprotected, as float32, as Flower sends them.

Format 2 (current)::

    header  {"scheme": "plain", "format": 2, "dtype": "float32", "size": P,
             "num_examples": n, "num_updates": k, ["run", "round", "hospital"]}
    section the example-weighted mean of the message's k updates, big-endian float32

A hospital's update is its own weights ``x_i`` (4 bytes per value, lossless for a float32
model; integer buffers up to 2^24 are exact). The server accumulates ``Σ n_i x_i`` in
float64 and sends the mean ``Σ n_i x_i / Σ n_i`` rounded once to float32: hospitals load
it into float32 tensors, so float64 digits would be dropped on load anyway, and the
download costs 4 bytes per value like the upload.

Format 1 (no ``format`` field): the weighted sum ``Σ n_i x_i`` as big-endian float64;
still read, and added by the server, so that older messages keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import AggregationError, ProtocolError, ReplayError
from fedcrypt.protection import wire
from fedcrypt.protection.base import AggregateResult, UploadCheck, check_update

SCHEME = "plain"
FORMAT = 2


def _read(blob: bytes) -> tuple[NDArray[np.float64], int, int, dict[str, Any]]:
    """The message's example-weighted mean (float64), ``n``, ``k`` and header."""
    env = wire.unpack(blob, expect_scheme=SCHEME)
    h = env.header
    size = wire.header_int(h, "size", minimum=1)
    n = wire.header_int(h, "num_examples", minimum=1)
    k = wire.header_int(h, "num_updates", minimum=1)
    version = h.get("format", 1)
    if version == 1:
        if len(env.sections) != 1 or len(env.sections[0]) != 8 * size:
            raise ProtocolError("malformed plain update: payload does not match its size")
        return np.frombuffer(env.sections[0], dtype=">f8") / n, n, k, h
    if version != FORMAT or h.get("dtype") != "float32":
        raise ProtocolError(f"unsupported plain message format {version!r}")
    if len(env.sections) != 1 or len(env.sections[0]) != 4 * size:
        raise ProtocolError("malformed plain update: payload does not match its size")
    vec = np.frombuffer(env.sections[0], dtype=">f4").astype(np.float64)
    if not np.all(np.isfinite(vec)):
        raise ProtocolError("malformed plain update: non-finite values")
    return vec, n, k, h


def _write(mean: NDArray[np.floating], num_examples: int, num_updates: int, **extra: Any) -> bytes:
    header: dict[str, Any] = {
        "scheme": SCHEME,
        "format": FORMAT,
        "dtype": "float32",
        "size": int(mean.size),
        "num_examples": int(num_examples),
        "num_updates": int(num_updates),
        **{k: v for k, v in extra.items() if v is not None},
    }
    return wire.pack(header, [np.asarray(mean).astype(">f4").tobytes()])


class PlainHospital:
    """Hospital side of ``plain``: sends its update as float32 and its example count."""

    scheme = SCHEME

    def __init__(self) -> None:
        self._run: str | None = None
        self._round: int | None = None
        self._hospital: str | None = None
        self.last_clipped = 0

    def set_round(
        self, run_id: str, round: int, *, hospital: str | None = None, seed: int | None = None
    ) -> None:
        """Label the next updates with the run and round (not authenticated: no key)."""
        self._run, self._round, self._hospital = run_id, int(round), hospital

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """See :meth:`fedcrypt.protection.base.HospitalProtection.protect` (float32 on the wire).

        Raises
        ------
        ValueError
            If ``update`` is invalid or does not fit in float32.
        """
        vec = check_update(update, num_examples)
        if vec.size and float(np.max(np.abs(vec))) > float(np.finfo(np.float32).max):
            raise ValueError("update values exceed the float32 range")
        return _write(
            vec, num_examples, 1, run=self._run, round=self._round, hospital=self._hospital
        )

    def unprotect(self, aggregate: bytes, *, round: int | None = None) -> AggregateResult:
        """See :meth:`fedcrypt.protection.base.HospitalProtection.unprotect`.

        Raises
        ------
        fedcrypt.exceptions.ReplayError
            If ``round`` is given and the aggregate names another round, or it names
            another run than :meth:`set_round`'s.
        """
        mean, n, k, h = _read(aggregate)
        claimed = h.get("round")
        if round is not None and claimed is not None and claimed != round:
            raise ReplayError(
                f"the aggregate is from round {claimed}, expected {round}", round=claimed
            )
        if self._run is not None and h.get("run") not in (None, self._run):
            raise ReplayError(f"the aggregate belongs to run {h.get('run')!r}", round=claimed)
        return AggregateResult(
            mean=np.array(mean, dtype=np.float64), total_examples=n, num_updates=k
        )


class PlainAggregator:
    """Server side of ``plain``: the example-weighted mean, summed in float64."""

    scheme = SCHEME

    def aggregate(self, updates: Sequence[bytes]) -> bytes:
        """See :meth:`fedcrypt.protection.base.ServerAggregator.aggregate`."""
        if not updates:
            raise AggregationError("no updates to aggregate")
        total: NDArray[np.float64] | None = None
        n_total = 0
        k_total = 0
        rounds = set()
        for blob in updates:
            mean, n, k, h = _read(blob)
            rounds.add((h.get("run"), h.get("round")))
            if total is None:
                total = mean * float(n)
            elif mean.shape != total.shape:
                raise AggregationError(
                    f"update sizes differ: {mean.size} values vs {total.size} values"
                )
            else:
                total += mean * float(n)
            n_total += n
            k_total += k
        assert total is not None
        if len(rounds) > 1:
            raise AggregationError("updates of different runs or rounds cannot be added")
        run, round_ = rounds.pop()
        return _write(total / n_total, n_total, k_total, run=run, round=round_)


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
    """Check a ``plain`` upload's framing: one payload of ``size`` float32 (format 1: float64).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the payload does not match the size its header states.
    """
    size = header.get("size")
    if not isinstance(size, int) or len(section_lengths) != 1:
        raise ProtocolError("malformed plain update: expected one payload section")
    width = 8 if header.get("format", 1) == 1 else 4
    if section_lengths[0] != width * size:
        raise ProtocolError("malformed plain update: payload does not match its size")
