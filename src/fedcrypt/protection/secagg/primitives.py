"""Key derivation, PRG, share encryption and commitments for ``secagg`` (via ``cryptography``)."""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection.secagg.errors import ShareAuthenticationError

DOMAIN = b"fedcrypt/secagg/v1/"
KEY_BYTES = 32
NONCE_BYTES = 12
_CTR_NONCE = bytes(16)  # every PRG key is used for exactly one keystream


def u64(value: int) -> bytes:
    """Big-endian 8-byte encoding (hospital ids, rounds, sizes) for KDF info strings."""
    return struct.pack(">Q", value)


def hkdf(secret: bytes, *, info: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` to a 32-byte key, domain-separated by ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=DOMAIN + info).derive(
        secret
    )


def agree(private: X25519PrivateKey, peer: X25519PublicKey, *, info: bytes, salt: bytes) -> bytes:
    """X25519 Diffie-Hellman followed by HKDF-SHA256 to a 32-byte key.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the peer key is a low-order point (``cryptography`` rejects the all-zero
        shared secret).
    """
    try:
        shared = private.exchange(peer)
    except ValueError as exc:
        raise ProtocolError("a peer advertised an invalid (low-order) X25519 key") from exc
    return hkdf(shared, info=info, salt=salt)


class Prg:
    """AES-256-CTR keystream expander into reusable buffers (one key, one keystream).

    Parameters
    ----------
    nbytes : int
        Keystream length per call, in bytes.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._zeros = bytes(nbytes)
        self._buf = bytearray(nbytes + 16)

    @property
    def buffer(self) -> bytearray:
        """The internal output buffer (holds the last keystream)."""
        return self._buf

    def expand(self, key: bytes) -> memoryview:
        """Return ``nbytes`` of AES-256-CTR keystream under ``key`` (nonce 0).

        The returned view aliases an internal buffer: it is overwritten by the next call.
        """
        enc = Cipher(algorithms.AES(key), modes.CTR(_CTR_NONCE)).encryptor()
        n = enc.update_into(self._zeros, self._buf)
        enc.finalize()
        return memoryview(self._buf)[:n]


def seal(key: bytes, plaintext: bytes, *, aad: bytes, nonce: bytes) -> bytes:
    """AES-256-GCM encrypt; returns ``nonce || ciphertext || tag``."""
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes | memoryview, *, aad: bytes) -> bytes:
    """Inverse of :func:`seal`.

    Raises
    ------
    ShareAuthenticationError
        If the blob is too short or fails authentication (wrong key, associated data or
        any flipped bit).
    """
    data = bytes(blob)
    if len(data) < NONCE_BYTES + 16:
        raise ShareAuthenticationError("encrypted share is truncated")
    try:
        return AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise ShareAuthenticationError("encrypted share fails authentication") from exc


def commit(secret: bytes, *, session: bytes, owner: int) -> bytes:
    """Hash commitment SHA-256(domain || session || owner || secret) to a 32-byte random seed."""
    return hashlib.sha256(DOMAIN + b"commit\x00" + session + u64(owner) + secret).digest()
