"""A hospital's persisted ``secagg`` progress: round joined, survivor set signed, shares revealed.

The file lets a hospital refuse, across process restarts, a round number it already
joined (or an older one), a second survivor set to sign and a second set of shares to
reveal in one session. It holds no secret (counters and digests only) but decides what
the hospital agrees to, so it is written with mode 0600, atomically (temporary file in
the same folder, ``fsync``, ``os.replace``), before the reply it protects leaves the
hospital. Format: a :mod:`fedcrypt.protection.wire` envelope with no sections::

    {"scheme": "secagg", "kind": "hospital-state", "format": 1, "hospital": id,
     "last_round": r, "session": hex, "signed": hex or "", "revealed": bool,
     "last_unprotected": r}
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg.errors import StateFileError

SCHEME = "secagg"
KIND = "hospital-state"
FORMAT = 1
MAX_STATE_BYTES = 4096


@dataclass(frozen=True)
class Progress:
    """What one hospital has agreed to, as persisted.

    Attributes
    ----------
    hospital : int
        The hospital's id.
    last_round : int
        The last round it joined (sent its stage-0 keys for); rounds not newer are
        refused (default: 0, none).
    session : str
        The session digest of ``last_round`` (default: "").
    signed : str
        SHA-256 (hex) of the consistency message it signed in ``session``, or "" if none.
    revealed : bool
        Whether it revealed its shares (unmask stage) in ``session``.
    last_unprotected : int
        The newest round whose aggregate it unprotected.
    """

    hospital: int
    last_round: int = 0
    session: str = ""
    signed: str = ""
    revealed: bool = False
    last_unprotected: int = 0

    def joined(self, round_: int, session: str) -> Progress:
        """The progress after joining round ``round_`` of ``session``."""
        return replace(self, last_round=round_, session=session, signed="", revealed=False)

    def to_bytes(self) -> bytes:
        """The state-file bytes."""
        return wire.pack({"scheme": SCHEME, "kind": KIND, "format": FORMAT, **asdict(self)}, [])

    @classmethod
    def from_bytes(cls, data: bytes, *, hospital_id: int) -> Progress:
        """Parse state-file bytes of hospital ``hospital_id``.

        Raises
        ------
        StateFileError
            If the bytes are not a secagg state file, are corrupt, or belong to another
            hospital.
        """
        try:
            env = wire.unpack(data, expect_scheme=SCHEME)
        except ProtocolError as exc:
            raise StateFileError(f"not a secagg hospital state file ({exc})") from exc
        h: dict[str, Any] = env.header
        if h.get("kind") != KIND or h.get("format") != FORMAT or env.sections:
            raise StateFileError("not a secagg hospital state file (wrong kind or format)")
        try:
            prog = cls(
                hospital=_int(h, "hospital"),
                last_round=_int(h, "last_round"),
                session=_hex(h, "session"),
                signed=_hex(h, "signed"),
                revealed=_bool(h, "revealed"),
                last_unprotected=_int(h, "last_unprotected"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"corrupt secagg hospital state file: {exc}") from exc
        if prog.hospital != hospital_id:
            raise StateFileError(
                f"secagg state file belongs to hospital {prog.hospital}, not {hospital_id}"
            )
        return prog


def _int(h: dict[str, Any], key: str) -> int:
    v = h[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"field {key!r} is not a non-negative int")
    return v


def _hex(h: dict[str, Any], key: str) -> str:
    v = h[key]
    if not isinstance(v, str) or (v and (len(v) != 64 or v.strip("0123456789abcdef"))):
        raise ValueError(f"field {key!r} is not a SHA-256 hex digest")
    return v


def _bool(h: dict[str, Any], key: str) -> bool:
    v = h[key]
    if not isinstance(v, bool):
        raise ValueError(f"field {key!r} is not a boolean")
    return v


def load_progress(path: Path, *, hospital_id: int) -> Progress:
    """Read hospital ``hospital_id``'s state file; a missing file is a fresh start.

    Raises
    ------
    StateFileError
        If the file exists but cannot be read, is too large, corrupt, or belongs to
        another hospital (never silently reset: that would re-enable replays).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return Progress(hospital=hospital_id)
    except OSError as exc:
        raise StateFileError(f"cannot read secagg state file {path}: {exc.strerror}") from exc
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(f"secagg state file {path} is larger than {MAX_STATE_BYTES} bytes")
    return Progress.from_bytes(data, hospital_id=hospital_id)


def save_progress(path: Path, progress: Progress) -> None:
    """Write ``progress`` to ``path`` atomically with mode 0600 (and ``fsync`` it).

    Raises
    ------
    StateFileError
        If the file cannot be written (the caller must then not send its reply).
    """
    target = Path(path)
    fd = -1
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(progress.to_bytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = ""
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StateFileError(f"cannot write secagg state file {target}: {exc.strerror}") from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
