"""BFV integer batching through Microsoft SEAL (seal-python), with compact ciphertexts.

Used by the quantized presets: a fresh BFV ciphertext holds ``N`` integers modulo the
plaintext modulus ``t`` (SIMD batching, Smart–Vercauteren), sums of ciphertexts decrypt
*exactly* to slot-wise sums modulo ``t`` while the invariant noise budget lasts, and
symmetric (secret-key) encryption means only hospitals can encrypt or decrypt.

Wire form of a ciphertext: SEAL's own uncompressed serialization, whose coefficient
words (each below a data prime ``q < 2**60``) are stored in 7.5 bytes instead of 8 (the
four always-zero top bits of two words share one byte). SEAL validates every loaded
ciphertext against the context (``Ciphertext::load`` checks metadata and that every
coefficient is reduced modulo its prime).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import seal
from numpy.typing import NDArray

from fedcrypt.exceptions import (
    DecryptionError,
    InsecureParametersError,
    KeyMaterialError,
    ProtocolError,
)


def _params(
    poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int], plain_modulus_bits: int
) -> seal.EncryptionParameters:
    parms = seal.EncryptionParameters(seal.scheme_type.bfv)
    parms.set_poly_modulus_degree(int(poly_modulus_degree))
    parms.set_coeff_modulus(
        seal.CoeffModulus.Create(int(poly_modulus_degree), [int(b) for b in coeff_mod_bit_sizes])
    )
    parms.set_plain_modulus(
        seal.PlainModulus.Batching(int(poly_modulus_degree), int(plain_modulus_bits))
    )
    return parms


def _context(parms: seal.EncryptionParameters) -> seal.SEALContext:
    ctx = seal.SEALContext(parms, True, seal.sec_level_type.tc128)
    if not ctx.parameters_set():
        raise InsecureParametersError(
            f"SEAL refuses these BFV parameters: {ctx.parameter_error_message()}"
        )
    return ctx


class BFVContext:
    """A SEAL BFV context; holds the secret key on hospitals, parameters only on the server.

    Parameters
    ----------
    params : bytes
        Serialized ``seal.EncryptionParameters`` (BFV).
    secret_key : bytes, optional
        Serialized ``seal.SecretKey`` (hospitals only).

    Raises
    ------
    KeyMaterialError
        If the parameters or the key do not load.
    InsecureParametersError
        If SEAL finds the parameters below 128-bit security.
    """

    def __init__(self, params: bytes, *, secret_key: bytes | None = None) -> None:
        parms = seal.EncryptionParameters(seal.scheme_type.bfv)
        try:
            parms.load_bytes(bytes(params))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise KeyMaterialError(f"BFV parameters do not load: {exc}") from exc
        if parms.scheme() != seal.scheme_type.bfv:
            raise KeyMaterialError("key parameters are not BFV parameters")
        self._parms = parms
        self._params_bytes = bytes(params)
        self._ctx = _context(parms)
        self._encoder = seal.BatchEncoder(self._ctx)
        self._evaluator = seal.Evaluator(self._ctx)
        self._n = int(parms.poly_modulus_degree())
        self._t = int(parms.plain_modulus().value())
        data_level = self._ctx.first_context_data()
        self._data_primes = [int(m.value()) for m in data_level.parms().coeff_modulus()]
        self._words = 2 * self._n * len(self._data_primes)
        self._sk: seal.SecretKey | None = None
        self._sk_bytes = b""
        self._encryptor: seal.Encryptor | None = None
        self._decryptor: seal.Decryptor | None = None
        if secret_key is not None:
            try:
                sk = self._ctx.from_secret_str(bytes(secret_key))
            except (ValueError, RuntimeError, TypeError) as exc:
                raise KeyMaterialError(f"BFV secret key does not load: {exc}") from exc
            self._sk = sk
            self._sk_bytes = bytes(secret_key)
            self._encryptor = seal.Encryptor(self._ctx, sk)
            self._decryptor = seal.Decryptor(self._ctx, sk)

    @classmethod
    def generate(
        cls, poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int], plain_modulus_bits: int
    ) -> BFVContext:
        """Fresh parameters and secret key (SEAL's ``KeyGenerator``, ternary secret)."""
        parms = _params(poly_modulus_degree, coeff_mod_bit_sizes, plain_modulus_bits)
        ctx = _context(parms)
        sk = seal.KeyGenerator(ctx).secret_key()
        return cls(parms.to_bytes(), secret_key=sk.to_string())

    # -- key material -------------------------------------------------------------
    def is_private(self) -> bool:
        """Whether this context holds the secret key."""
        return self._sk is not None

    @property
    def params_bytes(self) -> bytes:
        """Serialized parameters (public)."""
        return self._params_bytes

    def secret_key_bytes(self) -> bytes:
        """Serialized secret key.

        Raises
        ------
        KeyMaterialError
            If this context is public.
        """
        if self._sk is None:
            raise KeyMaterialError("this BFV context holds no secret key")
        return self._sk_bytes

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
        return tuple(int(m.bit_count()) for m in self._parms.coeff_modulus())

    # -- ciphertexts ----------------------------------------------------------------
    def encrypt(self, slots: NDArray[np.int64]) -> bytes:
        """Encrypt ``N`` integers (reduced modulo ``t``; secret-key encryption), serialized.

        Raises
        ------
        KeyMaterialError
            If this context has no secret key.
        """
        return self.dump(self.encrypt_ciphertext(slots))

    def encrypt_ciphertext(self, slots: NDArray[np.int64]) -> seal.Ciphertext:
        """Like :meth:`encrypt` but return SEAL's ciphertext object (benchmarks)."""
        if self._encryptor is None:
            raise KeyMaterialError("encrypting needs the secret key (hospital key file)")
        vals = np.mod(np.asarray(slots, dtype=np.int64), self._t).astype(np.uint64)
        return self._encryptor.encrypt_symmetric(self._encoder.encode(vals))

    def dump(self, ct: seal.Ciphertext) -> bytes:
        """Serialize a ciphertext compactly (see the module docstring)."""
        raw = bytes(ct.to_string())
        return compact_words(raw, self._words)

    def load(self, data: bytes | memoryview) -> seal.Ciphertext:
        """Deserialize and validate a ciphertext.

        Raises
        ------
        ProtocolError
            If the bytes are not a valid ciphertext for these parameters.
        """
        try:
            raw = expand_words(bytes(data), self._words)
            ct = seal.Ciphertext()
            ct.load_bytes(self._ctx, raw)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ProtocolError(
                f"ciphertext does not deserialize under this key context: {exc}"
            ) from exc
        if ct.size() != 2 or ct.poly_modulus_degree() != self._n:
            raise ProtocolError("ciphertext has an unexpected shape for this key context")
        return ct

    def add_inplace(self, acc: seal.Ciphertext, other: seal.Ciphertext) -> None:
        """``acc += other`` (slot-wise modulo ``t``)."""
        self._evaluator.add_inplace(acc, other)

    def decrypt(self, ct: seal.Ciphertext) -> NDArray[np.uint64]:
        """Decrypt to ``N`` integers in ``[0, t)``.

        Raises
        ------
        KeyMaterialError
            If this context has no secret key.
        DecryptionError
            If the noise budget is exhausted (too many additions for these parameters).
        """
        if self._decryptor is None:
            raise KeyMaterialError("decrypting needs the secret key (hospital key file)")
        if self._decryptor.invariant_noise_budget(ct) <= 0:
            raise DecryptionError("ciphertext noise budget exhausted: it cannot be decrypted")
        return np.asarray(self._encoder.decode_uint64(self._decryptor.decrypt(ct)))

    def noise_budget(self, ct: seal.Ciphertext) -> int:
        """SEAL's invariant noise budget (bits) left in ``ct`` (hospitals only)."""
        if self._decryptor is None:
            raise KeyMaterialError("the noise budget needs the secret key")
        return int(self._decryptor.invariant_noise_budget(ct))


def _packed_len(words: int) -> int:
    return words * 7 + words // 2


def compact_words(raw: bytes, words: int) -> bytes:
    """Store the trailing ``words`` uint64 coefficients of a SEAL blob in 60 bits each.

    Falls back to the raw blob (marked by a leading ``0x00``) if its layout is not the
    expected one; compacted blobs start with ``0x01``.
    """
    n = words * 8
    if words % 2 or len(raw) < n + 8 or struct.unpack("<Q", raw[-n - 8 : -n])[0] != words:
        return b"\x00" + raw
    w = np.frombuffer(raw, dtype="<u8", count=words, offset=len(raw) - n)
    if int(w.max(initial=0)) >> 60:
        return b"\x00" + raw
    b = w.view(np.uint8).reshape(words, 8)
    low = b[:, :7]
    top = b[:, 7]
    nib = top[0::2] | (top[1::2] << 4)
    return b"\x01" + raw[:-n] + low.tobytes() + nib.tobytes()


def expand_words(data: bytes, words: int) -> bytes:
    """Inverse of :func:`compact_words`.

    Raises
    ------
    ValueError
        If ``data`` is too short or has an unknown marker.
    """
    if not data:
        raise ValueError("empty ciphertext")
    if data[0] == 0:
        return data[1:]
    if data[0] != 1:
        raise ValueError("unknown ciphertext encoding")
    m = _packed_len(words)
    if len(data) < 1 + m:
        raise ValueError("truncated ciphertext")
    prefix = data[1 : len(data) - m]
    body = np.frombuffer(data, dtype=np.uint8, offset=len(data) - m)
    low = body[: words * 7].reshape(words, 7)
    nib = body[words * 7 :]
    out = np.empty((words, 8), dtype=np.uint8)
    out[:, :7] = low
    out[0::2, 7] = nib & 0x0F
    out[1::2, 7] = nib >> 4
    return prefix + out.tobytes()
