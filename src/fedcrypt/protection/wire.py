"""A small, non-pickling container for protected messages.

Layout (all integers big-endian)::

    b"FCRY" | version: u8 | header_len: u32 | header: UTF-8 JSON object
            | n_sections: u32 | (section_len: u64 | section bytes) * n_sections

The header carries scheme metadata (scheme name, context fingerprint, counts); the
sections carry opaque payloads (serialized ciphertexts, masked vectors). Parsing checks
every length against the buffer and raises :class:`~fedcrypt.exceptions.ProtocolError`
for anything malformed: nothing received from the network is unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedcrypt.exceptions import ProtocolError

MAGIC = b"FCRY"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_SECTIONS = 1 << 24


@dataclass(frozen=True)
class Envelope:
    """A parsed protected message.

    Attributes
    ----------
    header : dict
        JSON-compatible metadata; always has a ``"scheme"`` key.
    sections : list of bytes or memoryview
        Opaque payloads, in order.
    """

    header: dict[str, Any]
    sections: Sequence[bytes | memoryview] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        """The protection scheme named in the header."""
        return str(self.header["scheme"])


def pack(header: dict[str, Any], sections: Iterable[bytes | memoryview]) -> bytes:
    """Serialize a header and sections into one message.

    Raises
    ------
    ValueError
        If the header has no ``"scheme"`` or is too large.
    """
    if "scheme" not in header:
        raise ValueError("header must name a 'scheme'")
    hdr = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    if len(hdr) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(hdr)} bytes, limit {MAX_HEADER_BYTES}")
    secs = list(sections)
    parts: list[bytes | memoryview] = [
        MAGIC,
        struct.pack(">BI", VERSION, len(hdr)),
        hdr,
        struct.pack(">I", len(secs)),
    ]
    for s in secs:
        parts.append(struct.pack(">Q", len(s)))
        parts.append(s)
    return b"".join(parts)


def unpack(
    data: bytes | bytearray | memoryview,
    *,
    expect_scheme: str | tuple[str, ...] | None = None,
) -> Envelope:
    """Parse a message produced by :func:`pack`; sections are zero-copy views.

    Parameters
    ----------
    data : bytes-like
        The received message.
    expect_scheme : str or tuple of str, optional
        If given, the header's scheme must equal it (or one of them: a scheme's current
        tag and its older ones).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the message is truncated, has trailing bytes, a bad magic/version, an invalid
        header, or the wrong scheme.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    n = len(buf)
    if n < 9 or bytes(buf[:4]) != MAGIC:
        raise ProtocolError("malformed protected message: bad magic (not a fedcrypt message)")
    version, hlen = struct.unpack(">BI", buf[4:9])
    if version != VERSION:
        raise ProtocolError(f"unsupported protected message version {version}")
    if hlen > MAX_HEADER_BYTES or 9 + hlen + 4 > n:
        raise ProtocolError("malformed protected message: truncated header")
    try:
        header = json.loads(bytes(buf[9 : 9 + hlen]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed protected message: header is not JSON") from exc
    if not isinstance(header, dict) or not isinstance(header.get("scheme"), str):
        raise ProtocolError("malformed protected message: header has no scheme")
    if expect_scheme is not None:
        accepted = (expect_scheme,) if isinstance(expect_scheme, str) else expect_scheme
        if header["scheme"] not in accepted:
            raise ProtocolError(
                f"protected message uses scheme {header['scheme']!r}, expected {accepted[0]!r}"
            )
    pos = 9 + hlen
    (count,) = struct.unpack(">I", buf[pos : pos + 4])
    pos += 4
    if count > MAX_SECTIONS:
        raise ProtocolError("malformed protected message: too many sections")
    sections: list[memoryview] = []
    for _ in range(count):
        if pos + 8 > n:
            raise ProtocolError("malformed protected message: truncated section length")
        (slen,) = struct.unpack(">Q", buf[pos : pos + 8])
        pos += 8
        if pos + slen > n:
            raise ProtocolError("malformed protected message: truncated section")
        sections.append(buf[pos : pos + slen])
        pos += slen
    if pos != n:
        raise ProtocolError("malformed protected message: trailing bytes")
    return Envelope(header=header, sections=sections)


def header_int(header: dict[str, Any], key: str, *, minimum: int = 0) -> int:
    """Read a non-negative integer field from a parsed header.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the field is missing, not an int, or below ``minimum``.
    """
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProtocolError(f"malformed protected message: header field {key!r} is invalid")
    return value
