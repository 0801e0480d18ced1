"""Check an uploaded protected update on disk without decrypting or loading it whole."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.base import UploadCheck
from fedcrypt.protection.registry import get_scheme

FINGERPRINT_KEYS: tuple[str, ...] = ("fingerprint", "context_fingerprint", "key_fingerprint")


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
    """

    header: dict[str, Any]
    section_lengths: tuple[int, ...]
    num_examples: int
    num_updates: int
    size: int | None
    fingerprint: str | None

    @property
    def scheme(self) -> str:
        """The protection scheme named in the header."""
        return str(self.header["scheme"])


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
        pos = 9 + hlen + 4
        lengths: list[int] = []
        for _ in range(count):
            if pos + 8 > total:
                raise ProtocolError("malformed protected message: truncated section length")
            (slen,) = struct.unpack(">Q", _read_exact(f, 8, "section length"))
            pos += 8
            if pos + slen > total:
                raise ProtocolError("malformed protected message: truncated section")
            lengths.append(slen)
            pos += slen
            f.seek(pos)
        if pos != total:
            raise ProtocolError("malformed protected message: trailing bytes")
    num_examples = wire.header_int(header, "num_examples", minimum=1)
    num_updates = (
        wire.header_int(header, "num_updates", minimum=1) if "num_updates" in header else 1
    )
    size_raw = header.get("size")
    size = size_raw if isinstance(size_raw, int) and not isinstance(size_raw, bool) else None
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
    )


def check_against_federation(
    info: UpdateInfo,
    *,
    protection: str,
    model_size: int | None,
    key_fingerprint: str | None,
) -> None:
    """Check that an update belongs to a federation (scheme, key context, model size).

    Parameters
    ----------
    info : UpdateInfo
        From :func:`inspect_file`.
    protection : str
        The federation's protection mode (``"plain"`` or ``"he"``).
    model_size : int or None
        The federation's number of model values, if known.
    key_fingerprint : str or None
        The fingerprint of the federation's public key context (``he``).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        Naming what does not match.
    """
    scheme = get_scheme(protection)
    if info.scheme != scheme.wire_scheme:
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
