"""Wire formats of ``secagg``: unsigned server requests, Ed25519-signed hospital replies.

Every message is a :mod:`fedcrypt.protection.wire` container with ``scheme = "secagg"``
and a header naming its ``kind`` (``request``, ``reply`` or ``aggregate``), ``stage``,
``round`` and ``session`` (SHA-256 of the round configuration). A reply additionally
names its ``sender`` and the SHA-256 of the request it answers, and carries an Ed25519
signature (last section) over SHA-256 of the canonical header and every other section.

The consistency stage's reply also carries a *detached* Ed25519 signature over
:func:`consistency_message` (session, round, survivor set), which the server forwards to
the other hospitals in the unmask request.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg.config import MAX_HOSPITAL_ID
from fedcrypt.protection.secagg.errors import ReplayError, SessionMismatchError, SignatureError
from fedcrypt.protection.secagg.primitives import DOMAIN, u64

SCHEME = "secagg"
STAGES = ("advertise", "share", "masked_input", "consistency", "unmask")
"""The five request/reply exchanges of one round, in order (Bonawitz et al. 2017, Fig. 4)."""
SIGNATURE_BYTES = 64


def consistency_message(session: str, round_: int, survivors: Sequence[int]) -> bytes:
    """What each hospital signs in the consistency stage: the survivor set ``U3``.

    ``DOMAIN || "consistency" || session (32 bytes) || round || |U3| || ids of U3``
    (each an 8-byte big-endian integer, ids sorted). The session digest already binds
    the round configuration (nonce, invited hospitals, threshold, parameters).

    Raises
    ------
    ValueError
        If ``session`` is not 64 hex digits.
    """
    ids = sorted(int(i) for i in survivors)
    return (
        DOMAIN
        + b"consistency\x00"
        + bytes.fromhex(session)
        + u64(round_)
        + u64(len(ids))
        + b"".join(u64(i) for i in ids)
    )


def verify_consistency(
    key: Ed25519PublicKey, signature: bytes | memoryview, message: bytes
) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``key``."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(bytes(signature), message)
    except InvalidSignature:
        return False
    return True


def digest(data: bytes | memoryview) -> str:
    """SHA-256 (hex) of a whole message: what a reply says it answers."""
    return hashlib.sha256(data).hexdigest()


def _signed_digest(header: Mapping[str, Any], sections: Sequence[bytes | memoryview]) -> bytes:
    hdr = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h = hashlib.sha256(DOMAIN + b"signature\x00")
    h.update(struct.pack(">I", len(hdr)))
    h.update(hdr)
    h.update(struct.pack(">I", len(sections)))
    for s in sections:
        h.update(struct.pack(">Q", len(s)))
        h.update(s)
    return h.digest()


def header_ids(header: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """Read a strictly increasing list of hospital ids from a header.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the field is missing, not a list of ints in ``[0, 2^64)``, or not strictly
        increasing.
    """
    value = header.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_HOSPITAL_ID for v in value
    ):
        raise ProtocolError(f"malformed secagg message: header field {key!r} is invalid")
    if any(a >= b for a, b in itertools.pairwise(value)):
        raise ProtocolError(f"malformed secagg message: {key!r} is not strictly increasing")
    return tuple(value)


def pack_request(
    stage: str,
    *,
    round_: int,
    session: str,
    extra: Mapping[str, Any] | None = None,
    sections: Sequence[bytes | memoryview] = (),
) -> bytes:
    """Build a server request for ``stage`` (unsigned: the server holds no secret)."""
    header = {"scheme": SCHEME, "kind": "request", "stage": stage, "round": round_}
    header["session"] = session
    header.update(extra or {})
    return wire.pack(header, sections)


def parse_request(data: bytes | memoryview, *, stage: str) -> wire.Envelope:
    """Parse a server request and check its kind and stage.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If malformed or for another stage (a :class:`ReplayError` if it is a request of
        another stage of this protocol).
    """
    env = wire.unpack(data, expect_scheme=SCHEME)
    if env.header.get("kind") == "request" and env.header.get("stage") in STAGES:
        if env.header.get("stage") != stage:
            raise ReplayError(
                f"expected a secagg {stage!r} request, got one for stage "
                f"{env.header.get('stage')!r}"
            )
    if env.header.get("kind") != "request" or env.header.get("stage") != stage:
        raise ProtocolError(
            f"expected a secagg {stage!r} request, got {env.header.get('kind')!r} "
            f"{env.header.get('stage')!r}"
        )
    wire.header_int(env.header, "round", minimum=1)
    if not isinstance(env.header.get("session"), str):
        raise ProtocolError("malformed secagg request: no session")
    return env


def pack_reply(
    stage: str,
    *,
    round_: int,
    session: str,
    sender: int,
    request: bytes | memoryview,
    signing_key: Ed25519PrivateKey,
    extra: Mapping[str, Any] | None = None,
    sections: Sequence[bytes | memoryview] = (),
) -> bytes:
    """Build and sign a hospital's reply to ``request``."""
    header: dict[str, Any] = {
        "scheme": SCHEME,
        "kind": "reply",
        "stage": stage,
        "round": round_,
        "session": session,
        "sender": sender,
        "request": digest(request),
    }
    header.update(extra or {})
    signature = signing_key.sign(_signed_digest(header, sections))
    return wire.pack(header, [*sections, signature])


@dataclass(frozen=True)
class Reply:
    """A verified hospital reply.

    Attributes
    ----------
    sender : int
        The hospital that signed it.
    header : dict
        Its header.
    sections : list of bytes-like
        Its payload sections (signature removed).
    request : str
        SHA-256 (hex) of the request it answers.
    """

    sender: int
    header: dict[str, Any]
    sections: Sequence[bytes | memoryview]
    request: str


def open_reply(
    data: bytes | memoryview,
    *,
    registry: Mapping[int, Ed25519PublicKey],
    stage: str,
    round_: int,
    session: str,
    sender: int | None = None,
) -> Reply:
    """Parse and verify a signed hospital reply.

    Checks, in order: well-formed; signed by the registered key of its ``sender``;
    for ``round_`` and ``stage`` (else :class:`ReplayError`); for ``session`` (else
    :class:`SessionMismatchError`); from the expected ``sender`` if given.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        Malformed, or from another sender than expected.
    SignatureError
        Unregistered sender or bad signature (e.g. signed by an unregistered key).
    ReplayError
        Validly signed but for another round or stage.
    SessionMismatchError
        Validly signed, this round and stage, but another session (run/configuration).
    """
    env = wire.unpack(data, expect_scheme=SCHEME)
    hdr = env.header
    if hdr.get("kind") != "reply" or not env.sections:
        raise ProtocolError("malformed secagg reply")
    who = wire.header_int(hdr, "sender")
    key = registry.get(who)
    if key is None:
        raise SignatureError(f"secagg reply from unregistered hospital {who}")
    *payload, signature = env.sections
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"secagg reply from hospital {who} has a malformed signature")
    try:
        key.verify(bytes(signature), _signed_digest(hdr, payload))
    except InvalidSignature as exc:
        raise SignatureError(f"secagg reply from hospital {who} has a bad signature") from exc
    got_round = wire.header_int(hdr, "round", minimum=1)
    if got_round != round_:
        raise ReplayError(
            f"secagg reply from hospital {who} is for round {got_round}, this is round {round_}"
        )
    if hdr.get("stage") != stage:
        raise ReplayError(
            f"secagg reply from hospital {who} is for stage {hdr.get('stage')!r}, "
            f"expected {stage!r}"
        )
    if hdr.get("session") != session:
        raise SessionMismatchError(
            f"secagg reply from hospital {who} is for another session (round configuration)"
        )
    if sender is not None and who != sender:
        raise ProtocolError(f"secagg reply signed by hospital {who} arrived as hospital {sender}")
    req = hdr.get("request")
    if not isinstance(req, str):
        raise ProtocolError(f"malformed secagg reply from hospital {who}: no request digest")
    return Reply(sender=who, header=hdr, sections=payload, request=req)
