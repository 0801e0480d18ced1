"""The low-level SEAL layer: BFV and CKKS with seeded symmetric ciphertexts (``tenseal.sealapi``).

One SEAL binding serves every preset: TenSEAL's ``tenseal.sealapi`` (Microsoft SEAL 4).
Its ``Encryptor.encrypt_symmetric(plain)`` returns SEAL's *seeded* ciphertext: a fresh
symmetric ciphertext is ``(c0, c1) = (Δm + e - a·s, a)`` with ``a`` uniformly random, and
SEAL can replace ``a`` by the 64-byte seed of the PRNG (Blake2xb) it was drawn from. Only
``c0`` and the seed travel: half the bytes of a full ciphertext (Microsoft SEAL manual,
"Serializable<Ciphertext>"; Chen, Laine, Player, "Simple Encrypted Arithmetic Library -
SEAL v2.1" for the scheme).

Wire form of one polynomial (:class:`WordFormat`): its ``L`` RNS limbs of ``N``
coefficients, each coefficient ``w < q_l`` stored as ``w · MIX mod 2**W`` in ``W`` bits
(``W = 60`` in 7.5 bytes for 60-bit primes, else whole bytes). ``MIX`` is a fixed odd
constant, so this is a bijection; it spreads a change of any stored bit over the high
bits of the coefficient, so that a flipped byte anywhere in a ciphertext changes its
decryption (and fails the integrity check of :mod:`fedcrypt.protection.he.integrity`)
instead of hiding in the noise. It is error detection, not secrecy.

The server adds ``c0`` polynomials coefficient-wise modulo each ``q_l`` in NumPy (no
SEAL object, no secret) and keeps every hospital's seed; a hospital rebuilds
``Σ c1 = Σ a_i`` by letting SEAL expand each seed (``Ciphertext.load``) and adding.

SEAL's objects here save and load through file paths only; this module gives them an
anonymous in-memory file (Linux ``memfd_create``; a private temporary file elsewhere), so
neither ciphertexts nor secret keys touch a file system.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi
import zstandard
from numpy.typing import NDArray

from fedcrypt.exceptions import DecryptionError, InsecureParametersError, KeyMaterialError

#: Odd 64-bit constant (2^64 / golden ratio) multiplying every stored coefficient.
MIX = 0x9E3779B97F4A7C15
#: Bytes of SEAL's PRNG seed (``prng_seed_byte_count``).
SEED_BYTES = 64

_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, -, size
_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
_MAX_PAYLOAD = 1 << 30


# -- SEAL's serialization frame --------------------------------------------------------------
def seal_payload(blob: bytes) -> tuple[bytes, bytes]:
    """Split a SEAL-serialized object into its 16-byte header and its uncompressed payload.

    Raises
    ------
    ValueError
        If ``blob`` is not a SEAL serialization or does not decompress.
    """
    if len(blob) < _HEADER.size:
        raise ValueError("too short for a SEAL object")
    magic, hsize, _, _, compr, _, size = _HEADER.unpack_from(blob)
    if magic != _MAGIC or hsize != _HEADER.size or size != len(blob):
        raise ValueError("not a SEAL object (bad header)")
    body = blob[_HEADER.size :]
    if compr == _COMPR_NONE:
        return blob[: _HEADER.size], body
    try:
        if compr == _COMPR_ZSTD:
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=_MAX_PAYLOAD)
        elif compr == _COMPR_ZLIB:
            raw = zlib.decompress(body)
        else:
            raise ValueError(f"unknown SEAL compression mode {compr}")
    except (zstandard.ZstdError, zlib.error) as exc:
        raise ValueError(f"SEAL object does not decompress: {exc}") from exc
    return blob[: _HEADER.size], raw


def seal_frame(header: bytes, payload: bytes) -> bytes:
    """An uncompressed SEAL serialization of ``payload`` under ``header``'s version."""
    magic, hsize, major, minor, _, _, _ = _HEADER.unpack_from(header)
    return _HEADER.pack(magic, hsize, major, minor, _COMPR_NONE, 0, hsize + len(payload)) + payload


class _Scratch:
    """An anonymous in-memory file that SEAL's path-based ``save``/``load`` can use.

    Each ``save``/``load`` holds a lock, so contexts shared between threads stay correct.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dir: str | None = None
        try:
            self._fd = os.memfd_create("fedcrypt-seal", getattr(os, "MFD_CLOEXEC", 0))
            self.path = f"/proc/self/fd/{self._fd}"
            if not os.path.exists(self.path):  # no procfs
                os.close(self._fd)
                raise OSError("no /proc/self/fd")
        except (AttributeError, OSError):
            self._dir = tempfile.mkdtemp(prefix="fedcrypt-seal-")
            self.path = os.path.join(self._dir, "object")
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def save(self, obj: Any) -> bytes:
        """``obj.save(path)`` and return the bytes written."""
        with self._lock:
            obj.save(self.path)
            data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
            os.ftruncate(self._fd, 0)
            return data

    def load(self, obj: Any, data: bytes, *args: Any) -> None:
        """``obj.load(*args, path)`` from ``data``; the bytes are wiped afterwards."""
        with self._lock:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            try:
                obj.load(*args, self.path)
            finally:
                os.ftruncate(self._fd, 0)

    def close(self) -> None:
        """Release the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):  # pragma: no cover - interpreter shutdown
            pass


# -- the wire form of a polynomial ----------------------------------------------------------
@dataclass(frozen=True)
class WordFormat:
    """How the coefficients of one ciphertext polynomial travel (public; server side too).

    Attributes
    ----------
    poly_modulus_degree : int
        ``N``, coefficients per limb.
    moduli : tuple of int
        The data primes ``q_l`` of a fresh ciphertext, one RNS limb each.
    """

    poly_modulus_degree: int
    moduli: tuple[int, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        """Stored bits per coefficient of each limb: 60 for 60-bit primes, else whole bytes."""
        return tuple(
            60 if q.bit_length() == 60 else 8 * -(-q.bit_length() // 8) for q in self.moduli
        )

    @property
    def words(self) -> int:
        """Coefficients per polynomial, ``L N``."""
        return len(self.moduli) * self.poly_modulus_degree

    @property
    def poly_bytes(self) -> int:
        """Stored bytes of one polynomial."""
        return sum(self.poly_modulus_degree * w // 8 for w in self.widths)

    def pack(self, words: NDArray[np.uint64]) -> bytes:
        """Store polynomials, shape ``(C, L N)`` uint64 with limb ``l`` at ``[l N, (l+1) N)``.

        Returns ``C * poly_bytes`` bytes.
        """
        n = self.poly_modulus_degree
        count = words.shape[0]
        parts: list[NDArray[Any]] = []
        for limb, width in enumerate(self.widths):
            w = np.ascontiguousarray(words[:, limb * n : (limb + 1) * n])
            mask = np.uint64((1 << width) - 1)
            mixed = (w * np.uint64(MIX & int(mask))) & mask
            b = mixed.view(np.uint8).reshape(count, n, 8)
            if width == 60:
                top = b[:, :, 7]
                nib = top[:, 0::2] | (top[:, 1::2] << 4)
                parts.append(b[:, :, :7].reshape(count, -1))
                parts.append(nib)
            else:
                parts.append(b[:, :, : width // 8].reshape(count, -1))
        return np.concatenate(parts, axis=1).tobytes() if count else b""

    def unpack(self, data: bytes | memoryview, count: int) -> NDArray[np.uint64]:
        """Inverse of :meth:`pack`: ``count`` polynomials, shape ``(count, L N)`` uint64.

        Raises
        ------
        ValueError
            If ``data`` has the wrong length, or a coefficient is not below its prime
            (corrupted data), naming the polynomial.
        """
        n = self.poly_modulus_degree
        if len(data) != count * self.poly_bytes:
            raise ValueError(f"{len(data)} bytes for {count} polynomials of {self.poly_bytes}")
        raw = np.frombuffer(data, dtype=np.uint8).reshape(count, self.poly_bytes)
        out = np.empty((count, self.words), dtype=np.uint64)
        pos = 0
        for limb, (q, width) in enumerate(zip(self.moduli, self.widths, strict=True)):
            b = np.zeros((count, n, 8), dtype=np.uint8)
            if width == 60:
                b[:, :, :7] = raw[:, pos : pos + 7 * n].reshape(count, n, 7)
                pos += 7 * n
                nib = raw[:, pos : pos + n // 2]
                pos += n // 2
                b[:, 0::2, 7] = nib & 0x0F
                b[:, 1::2, 7] = nib >> 4
            else:
                k = width // 8
                b[:, :, :k] = raw[:, pos : pos + k * n].reshape(count, n, k)
                pos += k * n
            mask = (1 << width) - 1
            inverse = np.uint64(pow(MIX & mask, -1, 1 << width))
            w = (b.view(np.uint64).reshape(count, n) * inverse) & np.uint64(mask)
            bad = np.nonzero((w >= np.uint64(q)).any(axis=1))[0]
            if bad.size:
                raise ValueError(f"ciphertext {int(bad[0])} has a coefficient out of range")
            out[:, limb * n : (limb + 1) * n] = w
        return out

    def add(self, acc: NDArray[np.uint64], other: NDArray[np.uint64]) -> None:
        """``acc += other`` modulo each limb's prime, in place (both ``(C, L N)``, reduced)."""
        n = self.poly_modulus_degree
        for limb, q in enumerate(self.moduli):
            a = acc[:, limb * n : (limb + 1) * n]
            a += other[:, limb * n : (limb + 1) * n]
            a -= np.uint64(q) * (a >= np.uint64(q))


@dataclass(frozen=True)
class Sealed:
    """Seeded ciphertexts: the ``c0`` polynomials and, per contributor, the seeds of ``c1``.

    Attributes
    ----------
    c0 : numpy.ndarray
        uint64, shape ``(C, L N)``: the (summed) first polynomials, reduced.
    seeds : numpy.ndarray
        uint8, shape ``(K, C, 64)``: seed ``[k, j]`` regenerates contributor ``k``'s
        ``c1`` of ciphertext ``j``.
    """

    c0: NDArray[np.uint64]
    seeds: NDArray[np.uint8]


# -- SEAL contexts -----------------------------------------------------------------------------
def _parse_params(raw: bytes) -> tuple[int, int, list[int], int]:
    """Scheme, ``N``, coefficient primes and plaintext modulus of an EncryptionParameters payload.

    The payload (SEAL 4, any minor version) is: scheme (u8), N (u64), count (u64), count
    serialized ``Modulus`` objects, and the plaintext ``Modulus``; a ``Modulus`` is a
    SEAL frame around its u64 value.
    """

    def modulus(pos: int) -> tuple[int, int]:
        _, body = seal_payload(raw[pos : pos + 16 + 8])
        return struct.unpack("<Q", body)[0], pos + 16 + 8

    scheme = raw[0]
    n, count = struct.unpack_from("<QQ", raw, 1)
    if count > 64:
        raise ValueError("too many coefficient primes")
    pos = 17
    primes = []
    for _ in range(count):
        q, pos = modulus(pos)
        primes.append(q)
    t, pos = modulus(pos)
    if pos != len(raw):
        raise ValueError("trailing bytes after the parameters")
    return scheme, n, primes, t


def _make_params(scheme: Any, n: int, primes: Sequence[int], t: int | None) -> Any:
    parms = sealapi.EncryptionParameters(scheme)
    parms.set_poly_modulus_degree(int(n))
    parms.set_coeff_modulus([sealapi.Modulus(int(q)) for q in primes])
    if t is not None:
        parms.set_plain_modulus(sealapi.Modulus(int(t)))
    return parms


def _context(parms: Any) -> Any:
    ctx = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise InsecureParametersError(
            f"SEAL refuses these parameters: {ctx.parameters_error_message()}"
        )
    return ctx


def _data_moduli(ctx: Any) -> tuple[int, ...]:
    return tuple(int(m.value()) for m in ctx.first_context_data().parms().coeff_modulus())


class _Seeded:
    """What BFV and CKKS share: seeded encryption, the wire form, seed expansion, decryption."""

    def __init__(self, ctx: Any, secret_key: Any | None, n: int) -> None:
        self._ctx = ctx
        self._n = n
        if not hasattr(self, "_scratch"):
            self._scratch = _Scratch()
        self.word_format = WordFormat(n, _data_moduli(ctx))
        self._sk = secret_key
        self._secret_material = b""
        self._encryptor: Any = None
        self._decryptor: Any = None
        self._evaluator = sealapi.Evaluator(ctx)
        if secret_key is not None:
            self._encryptor = sealapi.Encryptor(ctx, secret_key)
            self._decryptor = sealapi.Decryptor(ctx, secret_key)
            self._secret_material = self._canonical_secret(secret_key)
            self._learn_template()

    # -- key material -------------------------------------------------------------------
    def _canonical_secret(self, sk: Any) -> bytes:
        """``parms_id || coefficients`` of the secret key: stable across SEAL versions."""
        _, raw = seal_payload(self._scratch.save(sk))
        coeffs = struct.unpack_from("<Q", raw, 32)[0]
        return raw[:32] + raw[len(raw) - 8 * coeffs :]

    def is_private(self) -> bool:
        """Whether this context holds the secret key."""
        return self._sk is not None

    def secret_material(self) -> bytes:
        """Canonical secret-key bytes (parms id and coefficients), the input of key derivation.

        Raises
        ------
        KeyMaterialError
            If this context is public.
        """
        if self._sk is None:
            raise KeyMaterialError("this context holds no secret key")
        return self._secret_material

    def _require_secret(self, what: str) -> None:
        if self._sk is None:
            raise KeyMaterialError(f"{what} needs the secret key (hospital key file)")

    # -- the seeded-ciphertext template -------------------------------------------------------
    def _learn_template(self) -> None:
        """Read SEAL's layout of a seeded ciphertext from one encryption of zero.

        Payload: metadata (parms id, NTT flag, size, N, L, scale, correction factor), the
        first polynomial as a framed array (count, then ``L N`` words), the PRNG info as a
        frame (type byte, 64-byte seed).
        """
        zero = self._encode_rows(np.zeros((1, self._n), dtype=np.float64))[0]
        header, raw = seal_payload(self._scratch.save(self._encryptor.encrypt_symmetric(zero)))
        words = self.word_format.words
        tail = 16 + 1 + SEED_BYTES
        start = len(raw) - tail - 8 * words
        if start < 24 or struct.unpack_from("<Q", raw, start - 8)[0] != words:
            raise RuntimeError("unexpected SEAL seeded-ciphertext layout")
        self._header = header
        self._prefix = raw[:start]
        self._tail_head = raw[start + 8 * words : len(raw) - SEED_BYTES]
        self._start = start
        self._zero = bytes(8 * words)

    def _extract(self, serializable: Any) -> tuple[bytes, bytes]:
        """The ``c0`` words (little-endian bytes) and the seed of a seeded ciphertext."""
        _, raw = seal_payload(self._scratch.save(serializable))
        end = self._start + 8 * self.word_format.words
        if (
            raw[: self._start] != self._prefix
            or raw[end : len(raw) - SEED_BYTES] != self._tail_head
        ):
            raise RuntimeError("SEAL wrote a seeded ciphertext with another layout")
        return raw[self._start : end], raw[len(raw) - SEED_BYTES :]

    def _load(self, c0: bytes, seed: bytes) -> Any:
        """A SEAL ciphertext ``(c0, a)`` with ``a`` expanded from ``seed``."""
        ct = sealapi.Ciphertext()
        blob = seal_frame(self._header, self._prefix + c0 + self._tail_head + seed)
        self._scratch.load(ct, blob, self._ctx)
        return ct

    def _encode_rows(self, rows: NDArray[Any]) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _seal_rows(self, plains: Sequence[Any]) -> Sealed:
        self._require_secret("encrypting")
        c0 = np.empty((len(plains), self.word_format.words), dtype=np.uint64)
        seeds = np.empty((1, len(plains), SEED_BYTES), dtype=np.uint8)
        for j, pt in enumerate(plains):
            words, seed = self._extract(self._encryptor.encrypt_symmetric(pt))
            c0[j] = np.frombuffer(words, dtype="<u8")
            seeds[0, j] = np.frombuffer(seed, dtype=np.uint8)
        return Sealed(c0, seeds)

    def _open(self, sealed: Sealed, j: int) -> Any:
        """Ciphertext ``j`` of ``sealed`` as a SEAL ciphertext ``(Σ c0, Σ a_k)``."""
        seeds = sealed.seeds
        acc = self._load(sealed.c0[j].astype("<u8").tobytes(), seeds[0, j].tobytes())
        for k in range(1, seeds.shape[0]):
            self._evaluator.add_inplace(acc, self._load(self._zero, seeds[k, j].tobytes()))
        return acc

    def _decrypt_plain(self, ct: Any) -> Any:
        pt = sealapi.Plaintext()
        try:
            self._decryptor.decrypt(ct, pt)
        except (ValueError, RuntimeError) as exc:
            raise DecryptionError(f"ciphertext does not decrypt: {exc}") from exc
        return pt

    def noise_budget(self, sealed: Sealed, j: int) -> int:
        """SEAL's invariant noise budget (bits) of ciphertext ``j`` (BFV; hospitals only)."""
        self._require_secret("the noise budget")
        return int(self._decryptor.invariant_noise_budget(self._open(sealed, j)))

    def close(self) -> None:
        """Release the scratch file."""
        self._scratch.close()


class BFVContext(_Seeded):
    """A SEAL BFV context: the secret key on hospitals, parameters only on the server.

    Parameters
    ----------
    params : bytes
        Serialized ``EncryptionParameters`` (BFV), as stored in key files (SEAL 4, any
        minor version: files written with ``seal-python`` keep loading).
    secret_key : bytes, optional
        Serialized ``SecretKey`` (hospitals only).

    Raises
    ------
    KeyMaterialError
        If the parameters or the key do not load.
    InsecureParametersError
        If SEAL finds the parameters below 128-bit security.
    """

    def __init__(self, params: bytes, *, secret_key: bytes | None = None) -> None:
        try:
            _, raw = seal_payload(bytes(params))
            scheme, n, primes, t = _parse_params(raw)
        except (ValueError, struct.error) as exc:
            raise KeyMaterialError(f"BFV parameters do not load: {exc}") from exc
        if scheme != int(sealapi.SCHEME_TYPE.BFV.value):
            raise KeyMaterialError("key parameters are not BFV parameters")
        try:
            parms = _make_params(sealapi.SCHEME_TYPE.BFV, n, primes, t)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise KeyMaterialError(f"BFV parameters do not load: {exc}") from exc
        ctx = _context(parms)
        self._params_bytes = bytes(params)
        self._primes = tuple(primes)
        self._t = int(t)
        sk = None
        if secret_key is not None:
            sk = self._load_secret(ctx, bytes(secret_key))
        self._encoder = sealapi.BatchEncoder(ctx)
        self._n = int(n)
        self._scratch = _Scratch()
        self._ctx = ctx
        self._plain_template()
        super().__init__(ctx, sk, int(n))

    @staticmethod
    def _load_secret(ctx: Any, data: bytes) -> Any:
        """Load a secret key written by any SEAL 4 binding (coefficients spliced into a
        frame of this library's own version)."""
        scratch = _Scratch()
        try:
            _, raw = seal_payload(data)
            fresh_header, fresh = seal_payload(scratch.save(sealapi.KeyGenerator(ctx).secret_key()))
            coeffs = struct.unpack_from("<Q", fresh, 32)[0]
            body = len(fresh) - 8 * coeffs
            if raw[:32] != fresh[:32] or len(raw) != len(fresh):
                raise ValueError("the secret key belongs to other parameters")
            sk = sealapi.SecretKey()
            scratch.load(sk, seal_frame(fresh_header, fresh[:body] + raw[body:]), ctx)
            return sk
        except (ValueError, RuntimeError, TypeError, struct.error) as exc:
            raise KeyMaterialError(f"BFV secret key does not load: {exc}") from exc
        finally:
            scratch.close()

    @classmethod
    def generate(
        cls, poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int], plain_modulus_bits: int
    ) -> BFVContext:
        """Fresh parameters and secret key (SEAL's ``KeyGenerator``, ternary secret)."""
        n = int(poly_modulus_degree)
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(n)
        parms.set_coeff_modulus(
            sealapi.CoeffModulus.Create(n, [int(b) for b in coeff_mod_bit_sizes])
        )
        parms.set_plain_modulus(sealapi.PlainModulus.Batching(n, int(plain_modulus_bits)))
        ctx = _context(parms)
        scratch = _Scratch()
        try:
            params = scratch.save(parms)
            secret = scratch.save(sealapi.KeyGenerator(ctx).secret_key())
        finally:
            scratch.close()
        return cls(params, secret_key=secret)

    @property
    def params_bytes(self) -> bytes:
        """Serialized parameters (public)."""
        return self._params_bytes

    def secret_key_bytes(self) -> bytes:
        """The serialized secret key (SEAL format, for the hospital key file).

        Raises
        ------
        KeyMaterialError
            If this context is public.
        """
        self._require_secret("exporting the secret key")
        return self._scratch.save(self._sk)

    def public(self) -> BFVContext:
        """The same parameters without the secret key."""
        return BFVContext(self._params_bytes)

    @property
    def slots(self) -> int:
        """``N``: integers per ciphertext."""
        return self._n

    @property
    def plain_modulus(self) -> int:
        """``t``, the (prime) plaintext modulus."""
        return self._t

    @property
    def coeff_mod_bit_sizes(self) -> tuple[int, ...]:
        """Bit sizes of all primes (data primes, then the special prime)."""
        return tuple(q.bit_length() for q in self._primes)

    def encrypt(self, rows: NDArray[np.int64] | NDArray[np.uint64]) -> Sealed:
        """Encrypt rows of ``N`` integers (modulo ``t``), one seeded ciphertext each.

        Parameters
        ----------
        rows : numpy.ndarray
            Shape ``(C, N)``: int64 (any sign, reduced here) or uint64 (already in
            ``[0, t)``).

        Raises
        ------
        KeyMaterialError
            If this context has no secret key.
        """
        self._require_secret("encrypting")
        return self._seal_rows(self._encode_rows(np.asarray(rows)))

    def _plain_template(self) -> None:
        """Learn SEAL's layout of a plaintext of ``N`` coefficients (one zero plaintext)."""
        pt = sealapi.Plaintext()
        self._encoder.encode([0] * self._n, pt)
        header, raw = seal_payload(self._scratch.save(pt))
        start = len(raw) - 8 * self._n
        if start < 56 or struct.unpack_from("<Q", raw, 32)[0] != self._n:
            raise RuntimeError("unexpected SEAL plaintext layout")
        self._pt_header, self._pt_prefix = header, raw[:start]

    def _encode_rows(self, rows: NDArray[Any]) -> list[Any]:
        """Plaintexts whose ``N`` polynomial coefficients are the rows, modulo ``t``.

        Coefficient encoding, not SIMD batching: ciphertexts are only ever added, and
        sums of ciphertexts decrypt to coefficient-wise sums modulo ``t`` either way; it
        spares the number-theoretic transform and lets NumPy write the plaintexts.
        Unsigned rows must already be reduced (checked); signed rows are reduced here.
        """
        if rows.dtype == np.uint64:
            if rows.size and int(rows.max()) >= self._t:
                raise ValueError("slot values must be reduced modulo the plaintext modulus")
            vals = rows.astype("<u8", copy=False)
        else:
            vals = np.mod(rows.astype(np.int64), self._t).astype("<u8")
        plains = []
        for row in vals:
            pt = sealapi.Plaintext()
            self._scratch.load(
                pt, seal_frame(self._pt_header, self._pt_prefix + row.tobytes()), self._ctx
            )
            plains.append(pt)
        return plains

    def _coefficients(self, pt: Any) -> NDArray[np.uint64]:
        """The ``N`` coefficients of a decrypted plaintext (zero-padded)."""
        _, raw = seal_payload(self._scratch.save(pt))
        count = struct.unpack_from("<Q", raw, 32)[0]
        out = np.zeros(self._n, dtype=np.uint64)
        if count:
            out[:count] = np.frombuffer(raw, dtype="<u8", count=count, offset=len(raw) - 8 * count)
        return out

    def decrypt(self, sealed: Sealed) -> NDArray[np.uint64]:
        """Decrypt every ciphertext to its ``N`` slot values in ``[0, t)``.

        Returns
        -------
        numpy.ndarray
            uint64, shape ``(C, N)``.

        Raises
        ------
        KeyMaterialError
            If this context has no secret key.
        DecryptionError
            If SEAL refuses a ciphertext.
        """
        self._require_secret("decrypting")
        out = np.empty((sealed.c0.shape[0], self._n), dtype=np.uint64)
        for j in range(sealed.c0.shape[0]):
            out[j] = self._coefficients(self._decrypt_plain(self._open(sealed, j)))
        return out

    def decrypt_format1(self, blob: bytes) -> NDArray[np.uint64]:
        """Decrypt one full SEAL ciphertext of format-1 messages (batch-encoded slots).

        Format-1 messages (before seeded ciphertexts) carried full ``(c0, c1)``
        ciphertexts serialized by ``seal-python``; they are no longer accepted as messages,
        but their key files are, and this proves a key still decrypts what it encrypted.

        Raises
        ------
        DecryptionError
            If the blob is not a ciphertext of these parameters.
        """
        self._require_secret("decrypting")
        try:
            _, raw = seal_payload(bytes(blob))
            full = self._load(self._zero, bytes(SEED_BYTES))
            _, tmpl = seal_payload(self._scratch.save(full))
            body = len(tmpl) - 16 * self.word_format.words
            if len(raw) != len(tmpl) or raw[:32] != tmpl[:32]:
                raise ValueError("not a ciphertext of these parameters")
            ct = sealapi.Ciphertext()
            self._scratch.load(ct, seal_frame(self._header, tmpl[:body] + raw[body:]), self._ctx)
        except (ValueError, RuntimeError) as exc:
            raise DecryptionError(f"format-1 ciphertext does not load: {exc}") from exc
        return np.asarray(self._encoder.decode_uint64(self._decrypt_plain(ct)), dtype=np.uint64)


class CKKSContext(_Seeded):
    """A SEAL CKKS context taken from a TenSEAL context (key files store TenSEAL contexts).

    Parameters
    ----------
    context : tenseal.Context
        Private (hospital) or public (server) CKKS context.
    scale_bits : int
        ``log2`` of the encoding scale Δ.

    Raises
    ------
    KeyMaterialError
        If the context is not a CKKS context.
    """

    def __init__(self, context: Any, *, scale_bits: int) -> None:
        try:
            ctx = context.seal_context().data
            parms = ctx.first_context_data().parms()
            if int(parms.scheme().value) != int(sealapi.SCHEME_TYPE.CKKS.value):
                raise KeyMaterialError("the key context is not a CKKS context")
            sk = context.secret_key().data if context.is_private() else None
        except (AttributeError, ValueError, RuntimeError) as exc:
            raise KeyMaterialError(f"the CKKS key context does not load: {exc}") from exc
        self._scale = float(2**scale_bits)
        self._encoder = sealapi.CKKSEncoder(ctx)
        super().__init__(ctx, sk, int(parms.poly_modulus_degree()))

    @property
    def slots(self) -> int:
        """``N/2`` real values per ciphertext."""
        return self._n // 2

    def encrypt(self, rows: NDArray[np.float64]) -> Sealed:
        """Encode rows of ``N/2`` reals at scale Δ and encrypt each as a seeded ciphertext.

        Raises
        ------
        KeyMaterialError
            If this context has no secret key.
        """
        self._require_secret("encrypting")
        return self._seal_rows(self._encode_rows(np.asarray(rows)))

    def _encode_rows(self, rows: NDArray[Any]) -> list[Any]:
        plains = []
        for row in rows[:, : self.slots].astype(np.float64).tolist():
            pt = sealapi.Plaintext()
            self._encoder.encode(row, self._scale, pt)
            plains.append(pt)
        return plains

    def decrypt(self, sealed: Sealed) -> NDArray[np.float64]:
        """Decrypt and decode every ciphertext: float64, shape ``(C, N/2)``.

        Raises
        ------
        KeyMaterialError
            If this context has no secret key.
        DecryptionError
            If SEAL refuses a ciphertext.
        """
        self._require_secret("decrypting")
        out = np.empty((sealed.c0.shape[0], self.slots), dtype=np.float64)
        for j in range(sealed.c0.shape[0]):
            out[j] = self._encoder.decode_double(self._decrypt_plain(self._open(sealed, j)))
        return out


def public_word_format(context: Any) -> WordFormat:
    """The :class:`WordFormat` of a TenSEAL context's fresh ciphertexts (server side)."""
    ctx = context.seal_context().data
    parms = ctx.first_context_data().parms()
    return WordFormat(int(parms.poly_modulus_degree()), _data_moduli(ctx))
