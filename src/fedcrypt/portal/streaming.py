"""Receive a raw request body into the blob store chunk by chunk, never whole in memory."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile

from fedcrypt.portal.errors import BadRequestError, TooLargeError
from fedcrypt.portal.storage import BlobStore, PendingBlob, UploadTooLargeError, is_sha256

SHA256_HEADER = "X-Content-SHA256"
CHUNK = 1 << 20


def _too_large(limit: int) -> TooLargeError:
    return TooLargeError(
        f"the upload exceeds this portal's limit of {limit / (1 << 20):g} MiB (--max-upload-mb)"
    )


def parse_sha256(value: str | None) -> str:
    """Validate the client's ``X-Content-SHA256`` header.

    Raises
    ------
    fedcrypt.portal.errors.BadRequestError
        If it is missing or not 64 hex characters.
    """
    if not value:
        raise BadRequestError(f"missing {SHA256_HEADER} header (hex SHA-256 of the body)")
    value = value.strip().lower()
    if not is_sha256(value):
        raise BadRequestError(f"{SHA256_HEADER} must be 64 hex characters")
    return value


async def receive_body(request: Request, store: BlobStore, *, limit: int) -> PendingBlob:
    """Stream the request body into a temporary file of at most ``limit`` bytes.

    Raises
    ------
    fedcrypt.portal.errors.TooLargeError
        If ``Content-Length`` or the bytes actually received exceed ``limit``; the
        partial file is deleted.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    pending = store.begin(limit)
    try:
        async for chunk in request.stream():
            if chunk:
                pending.write(chunk)
    except UploadTooLargeError as exc:
        pending.discard()
        raise _too_large(limit) from exc
    except BaseException:
        pending.discard()
        raise
    return pending


async def receive_form_file(upload: UploadFile, store: BlobStore, *, limit: int) -> PendingBlob:
    """Copy a multipart form file (already spooled by the form parser) into the store."""
    pending = store.begin(limit)
    try:
        while chunk := await upload.read(CHUNK):
            pending.write(chunk)
    except UploadTooLargeError as exc:
        pending.discard()
        raise _too_large(limit) from exc
    except BaseException:
        pending.discard()
        raise
    return pending


async def receive_small_body(request: Request, *, limit: int) -> bytes:
    """Read a small body (a key file) into memory, refusing more than ``limit`` bytes.

    Used for the public ``server.key``, so that a secret key uploaded by mistake is
    refused without ever touching the portal's disk.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise _too_large(limit)
    return bytes(buf)
