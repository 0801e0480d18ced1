"""Content-addressed blob storage on disk: stream in, hash, fsync, rename into place."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class UploadTooLargeError(Exception):
    """The incoming blob exceeds the configured limit."""


def is_sha256(value: str) -> bool:
    """Whether ``value`` is 64 lowercase hex characters."""
    return bool(_SHA_RE.match(value))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PendingBlob:
    """A blob being written to ``tmp/``: hashed and size-checked as chunks arrive.

    Use :meth:`BlobStore.begin` to create one, :meth:`write` for every chunk, then
    :meth:`BlobStore.commit` to move it into place or :meth:`discard` to drop it.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = open(path, "xb")

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``.

        Raises
        ------
        UploadTooLargeError
            If the blob grows beyond the limit.
        """
        if self._file is None:
            raise RuntimeError("blob already finished")
        self.size += len(chunk)
        if self.size > self.limit:
            raise UploadTooLargeError(f"upload exceeds the limit of {self.limit} bytes")
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        """Flush and fsync the file; return its hex SHA-256."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return self._hash.hexdigest()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of what was written so far."""
        return self._hash.hexdigest()

    def discard(self) -> None:
        """Close and delete the temporary file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BlobStore:
    """Blobs under ``root/blobs/<sha[:2]>/<sha>``; partial uploads under ``root/tmp``.

    A blob's name is its SHA-256, so a file in ``blobs/`` is always complete: it is
    written to ``tmp/``, fsynced and renamed with :func:`os.replace`, which is atomic.

    Parameters
    ----------
    root : pathlib.Path
        The portal's data directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def clear_tmp(self) -> int:
        """Delete partial uploads left by a crash; return how many were removed."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_file():
                p.unlink()
                n += 1
        return n

    def begin(self, limit: int) -> PendingBlob:
        """Start a new blob of at most ``limit`` bytes."""
        return PendingBlob(self.tmp / f"upload-{secrets.token_hex(12)}.part", limit)

    def path(self, sha256: str) -> Path:
        """Where the blob with this hash lives.

        Raises
        ------
        ValueError
            If ``sha256`` is not a hex digest (never builds a path from other input).
        """
        if not is_sha256(sha256):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return self.blobs / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return self.path(sha256).is_file()

    def commit(self, pending: PendingBlob) -> str:
        """Fsync ``pending`` and move it into place; return its SHA-256.

        If an identical blob is already stored the new copy is dropped.
        """
        digest = pending.finish()
        dest = self.path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file():
            pending.discard()
        else:
            os.replace(pending.path, dest)
            _fsync_dir(dest.parent)
        return digest

    def put_bytes(self, data: bytes) -> str:
        """Store a small in-memory blob; return its SHA-256."""
        pending = self.begin(len(data))
        try:
            pending.write(data)
            return self.commit(pending)
        except BaseException:
            pending.discard()
            raise

    def read_bytes(self, sha256: str) -> bytes:
        """Read a whole blob into memory."""
        return self.path(sha256).read_bytes()

    def list_blobs(self) -> list[str]:
        """The hashes of every stored blob (files named otherwise are ignored)."""
        return sorted(p.name for p in self.blobs.glob("??/*") if p.is_file() and is_sha256(p.name))

    def delete(self, sha256: str) -> None:
        """Remove a blob (no error if it is already gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()
