"""Check an uploaded protected update on disk without decrypting or loading it whole."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.base import Scheme, UploadCheck
from fedcrypt.protection.he.bfv import MODE_CALIBRATED, MODE_CALIBRATION
from fedcrypt.protection.he.params import ENCODING_BFV

FINGERPRINT_KEYS: tuple[str, ...] = ("fingerprint", "context_fingerprint", "key_fingerprint")

#: Largest example count one hospital's update may claim (``num_examples``).
MAX_EXAMPLES = 1 << 31
#: Largest number of model values ``P`` an update may state (``size``).
MAX_MODEL_SIZE = 1 << 31
#: Largest ``num_updates`` a message may state (a hospital's update says 1).
MAX_NUM_UPDATES = 1 << 20
#: Largest example capacity a packed update's grid may state (``max_examples``).
MAX_CAPACITY = 1 << 62
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class UpdateInfo:
    """What the wire header of a protected message says about it.

    Attributes
    ----------
    header : dict
        The parsed JSON header.
    section_lengths : tuple of int
        Length in bytes of every payload section, in order.
    num_examples : int
        Example count the hospital weighted its update with.
    num_updates : int
        How many updates the message contains (1 for a hospital's update).
    size : int or None
        Number of model values ``P`` if the header states it.
    fingerprint : str or None
        Key-context fingerprint if the header states one.
    grid : Grid or None
        The quantization grid of a packed (BFV) update; ``None`` for other encodings.
    """

    header: dict[str, Any]
    section_lengths: tuple[int, ...]
    num_examples: int
    num_updates: int
    size: int | None
    fingerprint: str | None
    grid: Grid | None = None

    @property
    def scheme(self) -> str:
        """The protection scheme named in the header."""
        return str(self.header["scheme"])


@dataclass(frozen=True)
class Grid:
    """The quantization grid of a packed (BFV) update: what every update of a round shares.

    Attributes
    ----------
    mode : str
        ``"calibration"`` (round 1: no global model yet) or ``"calibrated"`` (steps from
        the global model every hospital decrypted).
    table_sha256 : str
        Hex SHA-256 of the encrypted step table (section 0; empty when calibrating).
        The table is encrypted deterministically, so equal tables mean equal steps.
    max_examples : int
        The example capacity of the grid (0 when calibrating): the round's
        ``sum(num_examples)`` must not exceed it.
    """

    mode: str
    table_sha256: str
    max_examples: int

    def describe(self) -> str:
        """A few words for error messages."""
        if self.mode == MODE_CALIBRATION:
            return "the calibration grid"
        return f"step table {self.table_sha256[:12]}… (capacity {self.max_examples} examples)"


def _bounded_int(header: dict[str, Any], key: str, *, minimum: int, maximum: int) -> int:
    value = wire.header_int(header, key, minimum=minimum)
    if value > maximum:
        raise ProtocolError(
            f"malformed protected message: header field {key!r} is {value}, above the "
            f"limit of {maximum}"
        )
    return value


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ProtocolError(f"malformed protected message: truncated {what}")
    return data


def inspect_file(path: Path) -> UpdateInfo:
    """Walk a protected message's framing on disk (header parsed, sections skipped).

    Reads only the header; section payloads are skipped with ``seek``, so a large file
    is never loaded into memory.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the file is not a well-formed fedcrypt message (see
        :func:`fedcrypt.protection.wire.unpack` for the layout).
    """
    total = path.stat().st_size
    with open(path, "rb") as f:
        if total < 9 or f.read(4) != wire.MAGIC:
            raise ProtocolError("malformed protected message: bad magic (not a fedcrypt message)")
        version, hlen = struct.unpack(">BI", _read_exact(f, 5, "header"))
        if version != wire.VERSION:
            raise ProtocolError(f"unsupported protected message version {version}")
        if hlen > wire.MAX_HEADER_BYTES or 9 + hlen + 4 > total:
            raise ProtocolError("malformed protected message: truncated header")
        try:
            header = json.loads(_read_exact(f, hlen, "header").decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError("malformed protected message: header is not JSON") from exc
        if not isinstance(header, dict) or not isinstance(header.get("scheme"), str):
            raise ProtocolError("malformed protected message: header has no scheme")
        (count,) = struct.unpack(">I", _read_exact(f, 4, "section count"))
        if count > wire.MAX_SECTIONS:
            raise ProtocolError("malformed protected message: too many sections")
        packed = header.get("encoding") == ENCODING_BFV
        pos = 9 + hlen + 4
        lengths: list[int] = []
        first_sha: str | None = None
        for i in range(count):
            if pos + 8 > total:
                raise ProtocolError("malformed protected message: truncated section length")
            (slen,) = struct.unpack(">Q", _read_exact(f, 8, "section length"))
            pos += 8
            if pos + slen > total:
                raise ProtocolError("malformed protected message: truncated section")
            if packed and i == 0:
                first_sha = _hash_section(f, slen)
            lengths.append(slen)
            pos += slen
            f.seek(pos)
        if pos != total:
            raise ProtocolError("malformed protected message: trailing bytes")
    num_examples = _bounded_int(header, "num_examples", minimum=1, maximum=MAX_EXAMPLES)
    num_updates = (
        _bounded_int(header, "num_updates", minimum=1, maximum=MAX_NUM_UPDATES)
        if "num_updates" in header
        else 1
    )
    size = (
        _bounded_int(header, "size", minimum=1, maximum=MAX_MODEL_SIZE)
        if "size" in header
        else None
    )
    fingerprint: str | None = None
    for key in FINGERPRINT_KEYS:
        if isinstance(header.get(key), str):
            fingerprint = header[key]
            break
    return UpdateInfo(
        header=header,
        section_lengths=tuple(lengths),
        num_examples=num_examples,
        num_updates=num_updates,
        size=size,
        fingerprint=fingerprint,
        grid=_grid(header, first_sha) if packed else None,
    )


def _hash_section(f: BinaryIO, length: int) -> str:
    h = hashlib.sha256()
    left = length
    while left:
        chunk = f.read(min(left, _HASH_CHUNK))
        if not chunk:
            raise ProtocolError("malformed protected message: truncated section")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _grid(header: dict[str, Any], table_sha256: str | None) -> Grid:
    """The grid of a packed message (the fields :mod:`fedcrypt.protection.he.bfv` writes)."""
    mode = header.get("mode")
    if mode not in (MODE_CALIBRATION, MODE_CALIBRATED):
        raise ProtocolError("malformed packed update: its header names no quantization mode")
    if table_sha256 is None:
        raise ProtocolError("malformed packed update: no step-table section")
    if table_sha256 == hashlib.sha256(b"").hexdigest():
        # Format 2: every round's table holds the encrypted quantization plan (and, in a
        # calibrated round, the steps), so an empty one is malformed in either mode.
        raise ProtocolError("malformed packed update: its step table is empty")
    steps = header.get("steps")
    if not isinstance(steps, str) or not table_sha256.startswith(steps) or len(steps) < 16:
        raise ProtocolError("malformed packed update: the header's step-table hash is wrong")
    capacity = _bounded_int(header, "max_examples", minimum=0, maximum=MAX_CAPACITY)
    if (mode == MODE_CALIBRATION) != (capacity == 0):
        raise ProtocolError("malformed packed update: its example capacity does not match its mode")
    return Grid(mode=mode, table_sha256=table_sha256, max_examples=capacity)


def check_against_federation(
    info: UpdateInfo,
    *,
    scheme: Scheme,
    model_size: int | None,
    key_fingerprint: str | None,
) -> None:
    """Check that an update belongs to a federation (scheme, key context, model size).

    Parameters
    ----------
    info : UpdateInfo
        From :func:`inspect_file`.
    scheme : fedcrypt.protection.base.Scheme
        The federation's protection mode (its registry descriptor).
    model_size : int or None
        The federation's number of model values, if known.
    key_fingerprint : str or None
        The fingerprint of the federation's public key context (``he``).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        Naming what does not match.
    """
    if info.scheme not in scheme.read_schemes:
        raise ProtocolError(
            f"the update is protected with {info.scheme!r} but this federation uses {scheme.name!r}"
        )
    if info.num_updates != 1:
        raise ProtocolError(
            f"the file is an aggregate of {info.num_updates} updates, not one hospital's update"
        )
    if model_size is not None:
        if info.size is None:
            raise ProtocolError("the update's header does not state its model size")
        if info.size != model_size:
            raise ProtocolError(
                f"wrong model size: the update has {info.size} values, this federation's "
                f"model has {model_size}"
            )
    if scheme.check_upload is None:
        raise ProtocolError(f"protection {scheme.name!r} takes no single-message uploads")
    scheme.check_upload(
        info.header, info.section_lengths, UploadCheck(size=model_size, fingerprint=key_fingerprint)
    )


def expected_mode(round_number: int) -> str:
    """The quantization mode of a packed round: round 1 calibrates, later rounds are calibrated.

    Every hospital starts round ``r > 1`` from the decrypted aggregate of round
    ``r - 1``, from which :class:`~fedcrypt.protection.he.bfv.BFVHospital` calibrates
    its steps; only round 1 has no global model to calibrate on.
    """
    return MODE_CALIBRATION if round_number <= 1 else MODE_CALIBRATED


@dataclass(frozen=True)
class RoundPeer:
    """An update already accepted in the round (for :func:`check_round_grid`)."""

    upload_id: int
    hospital: str
    num_examples: int
    grid: Grid | None


def check_round_grid(
    info: UpdateInfo,
    *,
    round_number: int,
    peers: Sequence[RoundPeer],
    packed: bool | None = None,
) -> None:
    """Check a packed update against its round: mode, step table, example capacity.

    Parameters
    ----------
    info : UpdateInfo
        The arriving update.
    round_number : int
        Its round (see :func:`expected_mode`).
    peers : sequence of RoundPeer
        The round's other accepted (not excluded) updates.
    packed : bool, optional
        Whether the federation's HE preset is a packed (BFV) one, if known: its updates
        must then carry a grid, and other presets' updates must not.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If a packed update is in the wrong mode for the round, uses another step table
        or capacity than the round's accepted updates, or would push the round's example
        count past the grid's capacity (the aggregate would overflow).
    """
    grid = info.grid
    if packed is not None and packed != (grid is not None):
        raise ProtocolError(
            "the federation's HE preset packs quantized values (BFV); this update is not packed"
            if packed
            else "the update is packed (BFV), but the federation's HE preset is not"
        )
    if grid is None:
        if any(p.grid is not None for p in peers):
            raise ProtocolError("the round's updates are packed (BFV); this one is not")
        return
    want = expected_mode(round_number)
    if grid.mode != want:
        why = (
            "round 1 has no global model to calibrate on"
            if want == MODE_CALIBRATION
            else f"its hospitals calibrate on the decrypted aggregate of round {round_number - 1}"
        )
        raise ProtocolError(
            f"a {grid.mode}-mode packed update in round {round_number}, which is {want} ({why})"
        )
    for peer in peers:
        if peer.grid != grid:
            theirs = "an unpacked update" if peer.grid is None else peer.grid.describe()
            raise ProtocolError(
                f"the update uses {grid.describe()}, but the round's accepted update "
                f"{peer.upload_id} ({peer.hospital}) uses {theirs}: hospitals must quantize "
                "on the same global model"
            )
    if grid.mode == MODE_CALIBRATED:
        total = info.num_examples + sum(p.num_examples for p in peers)
        if total > grid.max_examples:
            raise ProtocolError(
                f"with this update the round would hold {total} examples, above the "
                f"{grid.max_examples} its quantization grid was calibrated for"
            )
