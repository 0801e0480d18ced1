"""Format-2 HE messages: where values sit in the ciphertexts, and the fields both presets share.

Slot layout of every ciphertext (``S`` slots; see :mod:`~fedcrypt.protection.he.integrity`)::

    slots 0 .. S-4   the value stream: first the exact values (integer buffers, BFV),
                     then the data slots (packed quantized values, or CKKS reals)
    slot  S-3        count   (n_i; the aggregate: Σ n_i)
    slot  S-2        updates (1;   the aggregate: K)
    slot  S-1        check   (keyed, linear in the other slots)

A message is a :mod:`~fedcrypt.protection.wire` envelope whose header carries
``format: 2``, the key fingerprint, the run id and round (``run``, ``round``), the
counts, and ``ciphertexts`` (``C``); its last two sections are the ``c0`` polynomials
(``C`` × :attr:`~fedcrypt.protection.he.seal.WordFormat.poly_bytes`) and the seeds of
``c1`` (``K × C × 64`` bytes, one set per hospital summed in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import AggregationError, DecryptionError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.he.integrity import FORMAT, MAX_RUN_ID, RESERVED
from fedcrypt.protection.he.seal import SEED_BYTES, Sealed, WordFormat


@dataclass(frozen=True)
class SlotLayout:
    """How a message's values fill its ciphertexts.

    Attributes
    ----------
    slots : int
        Slots per ciphertext ``S``.
    exact : int
        Exact values at the start of the stream.
    data : int
        Data slots after them.
    """

    slots: int
    exact: int
    data: int

    @property
    def usable(self) -> int:
        """Stream slots per ciphertext, ``S - 3``."""
        return self.slots - RESERVED

    @property
    def ciphertexts(self) -> int:
        """``C``: ciphertexts the stream needs (at least one)."""
        return max(1, -(-(self.exact + self.data) // self.usable))

    def place(
        self, exact: NDArray[Any], data: NDArray[Any], *, count: float, updates: float
    ) -> NDArray[Any]:
        """The ``(C, S)`` grid: the stream, then count and updates; check slots 0."""
        c = self.ciphertexts
        stream = np.zeros(c * self.usable, dtype=data.dtype)
        stream[: self.exact] = exact
        stream[self.exact : self.exact + self.data] = data
        grid = np.empty((c, self.slots), dtype=data.dtype)
        grid[:, : self.usable] = stream.reshape(c, self.usable)
        grid[:, -3] = count
        grid[:, -2] = updates
        grid[:, -1] = 0
        return grid

    def split(self, grid: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        """The exact values and data slots of a ``(C, S)`` grid."""
        stream = np.ascontiguousarray(grid[:, : self.usable]).reshape(-1)
        return stream[: self.exact], stream[self.exact : self.exact + self.data]


def header_str(header: dict[str, Any], key: str, *, limit: int = 256) -> str:
    """A string header field.

    Raises
    ------
    ProtocolError
        If it is missing, not a string or too long.
    """
    value = header.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"malformed HE message: header field {key!r} is invalid")
    return value


def require_format(header: dict[str, Any]) -> None:
    """Refuse messages of another format version, naming it.

    Raises
    ------
    ProtocolError
        For format 1 (written before integrity slots, round binding and seeded
        ciphertexts; no longer accepted) or an unknown version.
    """
    version = header.get("format", 1)
    if version == FORMAT:
        return
    if version == 1:
        raise ProtocolError(
            "this HE message uses format version 1 (fedcrypt before 2026-12: full "
            "ciphertexts, no integrity check, no round binding), which is no longer "
            f"accepted; re-protect the update with this version (format {FORMAT})"
        )
    raise ProtocolError(
        f"unsupported HE message format version {version!r} (this fedcrypt reads {FORMAT})"
    )


@dataclass(frozen=True)
class Common:
    """The header fields every format-2 HE message has."""

    fingerprint: str
    run: str
    round: int
    size: int
    num_examples: int
    num_updates: int
    ciphertexts: int
    hospital: str | None


def read_common(header: dict[str, Any], *, max_ciphertexts: int) -> Common:
    """Read and bound the shared header fields.

    Raises
    ------
    ProtocolError
        If a field is missing or out of range.
    """
    require_format(header)
    hospital = header.get("hospital")
    if hospital is not None and (not isinstance(hospital, str) or len(hospital) > 128):
        raise ProtocolError("malformed HE message: header field 'hospital' is invalid")
    c = wire.header_int(header, "ciphertexts", minimum=1)
    if c > max_ciphertexts:
        raise ProtocolError(f"malformed HE message: {c} ciphertexts for its size")
    return Common(
        fingerprint=header_str(header, "fingerprint"),
        run=header_str(header, "run", limit=MAX_RUN_ID),
        round=wire.header_int(header, "round"),
        size=wire.header_int(header, "size", minimum=1),
        num_examples=wire.header_int(header, "num_examples", minimum=1),
        num_updates=wire.header_int(header, "num_updates", minimum=1),
        ciphertexts=c,
        hospital=hospital,
    )


def check_payload(
    c0: bytes | memoryview, seeds: bytes | memoryview, common: Common, *, poly_bytes: int
) -> None:
    """Check the sizes of the ``c0`` and seed sections (``poly_bytes`` per polynomial).

    Raises
    ------
    ProtocolError
        If they do not match ``C`` and ``K``.
    """
    if len(c0) != common.ciphertexts * poly_bytes:
        raise ProtocolError(
            f"malformed HE message: {len(c0)} bytes of ciphertext for {common.ciphertexts} "
            "ciphertexts"
        )
    if len(seeds) != common.num_updates * common.ciphertexts * SEED_BYTES:
        raise ProtocolError("malformed HE message: the seeds do not match the update count")


def sealed_of(
    c0: bytes | memoryview, seeds: bytes | memoryview, common: Common, fmt: WordFormat
) -> Sealed:
    """The message's ciphertexts (raises ``ValueError`` for an out-of-range coefficient)."""
    words = fmt.unpack(c0, common.ciphertexts)
    s = np.frombuffer(seeds, dtype=np.uint8).reshape(
        common.num_updates, common.ciphertexts, SEED_BYTES
    )
    return Sealed(words, s)


def who(index: int, common: Common) -> str:
    """``update 3`` or ``update 3 (hospital 'h2')`` for server errors."""
    return f"update {index}" + (f" (hospital {common.hospital!r})" if common.hospital else "")


def check_key(common: Common, fingerprint: str) -> None:
    """A hospital's check that an aggregate is under its own key context.

    Raises
    ------
    DecryptionError
        If ``common.fingerprint`` is not ``fingerprint``.
    """
    if common.fingerprint != fingerprint:
        raise DecryptionError(
            "aggregate was encrypted under another key context "
            f"(fingerprint {common.fingerprint[:16]}…, this hospital's key is "
            f"{fingerprint[:16]}…)"
        )


def check_updates(commons: Sequence[Common], fingerprint: str) -> None:
    """The server's check that updates can be added: its key context, one size, one
    run and round (:func:`check_same_round`).

    Raises
    ------
    AggregationError
        Naming the first update under another key context or of another size or round.
    """
    first = commons[0]
    for i, c in enumerate(commons):
        if c.fingerprint != fingerprint:
            raise AggregationError(
                f"{who(i, c)} was encrypted under another key context "
                f"(fingerprint {c.fingerprint[:16]}…, server key {fingerprint[:16]}…)"
            )
        if c.size != first.size:
            raise AggregationError(f"update sizes differ: {c.size} values vs {first.size} values")
    check_same_round(commons)


def check_same_round(commons: Sequence[Common]) -> None:
    """All updates of one aggregate belong to one run and round.

    Raises
    ------
    AggregationError
        Naming the first update that differs.
    """
    first = commons[0]
    for i, c in enumerate(commons):
        if (c.run, c.round) != (first.run, first.round):
            raise AggregationError(
                f"{who(i, c)} is for run {c.run!r} round {c.round}, {who(0, first)} for run "
                f"{first.run!r} round {first.round}: updates of different rounds cannot be "
                "added"
            )


def add_ciphertexts(
    blobs: Sequence[tuple[bytes | memoryview, bytes | memoryview, Common]], fmt: WordFormat
) -> tuple[bytes, bytes]:
    """The server's sum: ``Σ c0`` modulo each prime, and every update's seeds in order.

    Raises
    ------
    ProtocolError
        If an update's ciphertext has a coefficient out of range, is a constant
        polynomial or has an all-zero seed (garbage, not a ciphertext), naming it.
    """
    acc: NDArray[np.uint64] | None = None
    for i, (c0, seeds, common) in enumerate(blobs):
        try:
            words = fmt.unpack(c0, common.ciphertexts)
        except ValueError as exc:
            raise ProtocolError(f"malformed HE message: {who(i, common)}: {exc}") from exc
        # c0 = Δm + e - a·s is uniformly random modulo q, and seeds are random bytes: a
        # constant polynomial or an all-zero seed is garbage, not a ciphertext
        constant = np.flatnonzero(words.min(axis=1) == words.max(axis=1))
        zero_seed = np.flatnonzero(
            ~np.frombuffer(seeds, dtype=np.uint8).reshape(-1, SEED_BYTES).any(axis=1)
        )
        if constant.size or zero_seed.size:
            raise ProtocolError(
                f"malformed HE message: {who(i, common)}: "
                + (
                    f"ciphertext {int(constant[0])} is a constant polynomial"
                    if constant.size
                    else "a seed is all zeros"
                )
                + ", not a ciphertext"
            )
        if acc is None:
            acc = words
        else:
            fmt.add(acc, words)
    assert acc is not None
    seeds = b"".join(bytes(s) for _, s, _ in blobs)
    return fmt.pack(acc), seeds
