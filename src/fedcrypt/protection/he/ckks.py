"""Float CKKS (TenSEAL ``ckks_vector``, ``N/2`` float slots per ciphertext) for mode ``he``.

Single-key (threshold-free): every hospital holds the same secret key, the server a
context without it and only adds ciphertexts (Cheon et al. 2017, "Homomorphic
Encryption for Arithmetic of Approximate Numbers"). The quantized, packed BFV presets
are :mod:`fedcrypt.protection.he.bfv`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
from numpy.typing import NDArray

from fedcrypt.exceptions import (
    AggregationError,
    ConfigError,
    DecryptionError,
    KeyMaterialError,
    ProtocolError,
)
from fedcrypt.protection import wire
from fedcrypt.protection.base import AggregateResult, check_update
from fedcrypt.protection.he.params import ENCODING_CKKS as ENCODING_FLOAT
from fedcrypt.protection.he.params import MODE, WIRE_SCHEME, HEPreset

logger = logging.getLogger(__name__)


SCHEME = WIRE_SCHEME


def context_for(preset: HEPreset) -> ts.Context:
    """Create a fresh private CKKS context (symmetric encryption) for ``preset``.

    Symmetric encryption: only secret-key holders (hospitals) can encrypt or decrypt;
    the server's copy holds the parameters alone. Encryption is about twice as fast as
    public-key encryption and its noise is smaller.
    """
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=preset.poly_modulus_degree,
        coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.global_scale = float(2**preset.scale_bits)
    return ctx


def public_bytes(ctx: ts.Context) -> bytes:
    """Serialize the server's view of ``ctx``: parameters only, never the secret key."""
    return bytes(
        ctx.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def _header_str(header: dict[str, Any], key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"malformed ckks message: header field {key!r} is invalid")
    return value


@dataclass(frozen=True)
class _Parsed:
    """A parsed ckks message (sections are zero-copy views)."""

    fingerprint: str
    size: int
    num_examples: int
    num_updates: int
    chunks: Sequence[bytes | memoryview]


def _parse(blob: bytes, preset: HEPreset) -> _Parsed:
    env = wire.unpack(blob, expect_scheme=SCHEME)
    h = env.header
    encoding = _header_str(h, "encoding")
    if encoding != ENCODING_FLOAT:
        raise ProtocolError(f"unsupported ckks encoding {encoding!r}")
    fingerprint = _header_str(h, "fingerprint")
    size = wire.header_int(h, "size", minimum=1)
    slots = wire.header_int(h, "slots", minimum=1)
    n = wire.header_int(h, "num_examples", minimum=1)
    k = wire.header_int(h, "num_updates", minimum=1)
    if slots != preset.slots:
        raise ProtocolError(
            f"malformed ckks message: {slots} slots per ciphertext, this key has {preset.slots}"
        )
    if len(env.sections) != -(-size // slots):
        raise ProtocolError(
            f"malformed ckks message: {len(env.sections)} ciphertexts for {size} values"
        )
    return _Parsed(fingerprint, size, n, k, env.sections)


def _write(
    *,
    fingerprint: str,
    preset: HEPreset,
    size: int,
    num_examples: int,
    num_updates: int,
    chunks: Sequence[bytes],
) -> bytes:
    header = {
        "scheme": SCHEME,
        "encoding": ENCODING_FLOAT,
        "fingerprint": fingerprint,
        "preset": preset.name,
        "size": int(size),
        "slots": preset.slots,
        "scale_bits": preset.scale_bits,
        "num_examples": int(num_examples),
        "num_updates": int(num_updates),
    }
    return wire.pack(header, chunks)


def _load_vector(ctx: ts.Context, data: bytes | memoryview, expected: int) -> ts.CKKSVector:
    try:
        vec = ts.ckks_vector_from(ctx, bytes(data))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ProtocolError(
            f"ciphertext does not deserialize under this key context: {exc}"
        ) from exc
    if vec.size() != expected:
        raise ProtocolError(
            f"malformed ckks message: ciphertext holds {vec.size()} values, expected {expected}"
        )
    return vec


def _chunk_lengths(size: int, slots: int) -> list[int]:
    full, rest = divmod(size, slots)
    return [slots] * full + ([rest] if rest else [])


class CKKSHospital:
    """Hospital side of the float CKKS presets: holds the secret key, encrypts and decrypts.

    Parameters
    ----------
    context : tenseal.Context
        The private CKKS key context (with the secret key) from
        :mod:`fedcrypt.protection.he.keys`.
    preset : HEPreset
        The parameters the context was made with (``encoding="ckks-float"``).
    fingerprint : str
        The key context's fingerprint (hex), stored in both key files.

    Raises
    ------
    KeyMaterialError
        If ``context`` holds no secret key or is not a CKKS context of a float preset.
    """

    scheme = MODE
    wire_scheme = WIRE_SCHEME

    def __init__(self, context: ts.Context, *, preset: HEPreset, fingerprint: str) -> None:
        if preset.is_packed or not isinstance(context, ts.Context):
            raise KeyMaterialError(f"preset {preset.name!r} needs a CKKS key context")
        if not context.is_private():
            raise KeyMaterialError(
                "a hospital needs the secret key: this key context is public "
                "(use the hospital key file, not the server key file)"
            )
        context.global_scale = float(2**preset.scale_bits)
        self._ctx = context
        self._preset = preset
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        """The key context's fingerprint (hex sha256)."""
        return self._fingerprint

    @property
    def preset(self) -> HEPreset:
        """The encryption parameters."""
        return self._preset

    @property
    def last_clipped(self) -> int:
        """Values clipped by the last :meth:`protect`: always 0 (float CKKS does not clip)."""
        return 0

    def set_reference(self, mean: NDArray[np.floating] | None, *, total_examples: int) -> None:
        """No-op: float CKKS needs no calibration (present for the common interface)."""

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """Encrypt ``num_examples * update`` in packed ciphertexts of ``N/2`` float slots.

        Parameters
        ----------
        update : numpy.ndarray
            Flat update, shape ``(P,)``, floating dtype.
        num_examples : int
            Local training examples ``n_i`` (FedAvg weight), at least 1.

        Returns
        -------
        bytes
            A ``wire`` envelope: header (scheme, encoding, fingerprint, size, counts)
            and the serialized ciphertexts.

        Raises
        ------
        ValueError
            If ``update`` is not 1-D and finite, or ``num_examples`` < 1.
        ConfigError
            If ``num_examples * max|update|`` exceeds the preset's per-hospital range
            (:attr:`HEPreset.max_weighted_abs`), which would wrap around the modulus.
        """
        vec = check_update(update, num_examples)
        weighted = vec * float(num_examples)
        peak = float(np.max(np.abs(weighted)))
        if peak > self._preset.max_weighted_abs:
            raise ConfigError(
                f"num_examples * |update| reaches {peak:.3g}, above the {self._preset.name!r} "
                f"preset's capacity of {self._preset.max_weighted_abs:.3g} per hospital "
                f"(for {self._preset.max_hospitals} hospitals); use a preset with a "
                "smaller scale"
            )
        slots = self._preset.slots
        chunks = [
            ts.ckks_vector(self._ctx, weighted[i : i + slots]).serialize()
            for i in range(0, weighted.size, slots)
        ]
        return _write(
            fingerprint=self._fingerprint,
            preset=self._preset,
            size=weighted.size,
            num_examples=num_examples,
            num_updates=1,
            chunks=chunks,
        )

    def unprotect(self, aggregate: bytes) -> AggregateResult:
        """Decrypt an aggregate and divide by the total example count.

        Returns
        -------
        AggregateResult
            ``mean`` of shape ``(P,)``, float64.

        Raises
        ------
        ProtocolError
            If ``aggregate`` is malformed.
        DecryptionError
            If it was encrypted under another key context or does not decrypt.
        """
        msg = _parse(aggregate, self._preset)
        if msg.fingerprint != self._fingerprint:
            raise DecryptionError(
                "aggregate was encrypted under another key context "
                f"(fingerprint {msg.fingerprint[:16]}…, this hospital's key is "
                f"{self._fingerprint[:16]}…)"
            )
        out = np.empty(msg.size, dtype=np.float64)
        pos = 0
        lengths = _chunk_lengths(msg.size, self._preset.slots)
        for data, length in zip(msg.chunks, lengths, strict=True):
            vec = _load_vector(self._ctx, data, length)
            try:
                out[pos : pos + length] = vec.decrypt()
            except (ValueError, RuntimeError) as exc:
                raise DecryptionError(f"ciphertext does not decrypt: {exc}") from exc
            pos += length
        return AggregateResult(
            mean=out / msg.num_examples,
            total_examples=msg.num_examples,
            num_updates=msg.num_updates,
        )


class CKKSAggregator:
    """Server side of the float CKKS presets: adds ciphertexts; holds no secret key.

    Parameters
    ----------
    public_context : tenseal.Context
        The key context without its secret key (server key file).
    preset : HEPreset
        The parameters the context was made with.
    fingerprint : str
        The key context's fingerprint (hex).

    Raises
    ------
    KeyMaterialError
        If ``public_context`` holds a secret key (the server must never hold one) or is
        not a CKKS context of a float preset.
    """

    scheme = MODE
    wire_scheme = WIRE_SCHEME

    def __init__(self, public_context: ts.Context, *, preset: HEPreset, fingerprint: str) -> None:
        if preset.is_packed or not isinstance(public_context, ts.Context):
            raise KeyMaterialError(f"preset {preset.name!r} needs a CKKS key context")
        if public_context.is_private():
            raise KeyMaterialError(
                "refusing a key context that holds a secret key: the aggregation server "
                "must only hold the public (server) key file"
            )
        self._ctx = public_context
        self._preset = preset
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        """The key context's fingerprint (hex sha256)."""
        return self._fingerprint

    @property
    def preset(self) -> HEPreset:
        """The encryption parameters."""
        return self._preset

    def aggregate(self, updates: Sequence[bytes]) -> bytes:
        """Add protected updates ciphertext by ciphertext (depth 0), summing the counts.

        Memory is bounded by one ciphertext per update at a time beyond the messages
        themselves: chunk ``j`` of every update is added before chunk ``j+1`` is read.

        Raises
        ------
        AggregationError
            If ``updates`` is empty, exceeds the preset's ``max_hospitals``, was encrypted
            under another key context ("update was encrypted under another key context"),
            or the updates differ in size (or, packed, in quantization grid).
        ProtocolError
            If an update is malformed or a ciphertext does not deserialize.
        """
        if not updates:
            raise AggregationError("no updates to aggregate")
        parsed = [_parse(blob, self._preset) for blob in updates]
        for i, msg in enumerate(parsed):
            if msg.fingerprint != self._fingerprint:
                raise AggregationError(
                    f"update {i} was encrypted under another key context (fingerprint "
                    f"{msg.fingerprint[:16]}…, server key {self._fingerprint[:16]}…)"
                )
            if msg.size != parsed[0].size:
                raise AggregationError(
                    f"update sizes differ: {msg.size} values vs {parsed[0].size} values"
                )
        k_total = sum(m.num_updates for m in parsed)
        if k_total > self._preset.max_hospitals:
            raise AggregationError(
                f"{k_total} updates exceed the {self._preset.name!r} preset's limit of "
                f"{self._preset.max_hospitals} hospitals per aggregate (carry headroom)"
            )
        size = parsed[0].size
        out: list[bytes] = []
        for j, length in enumerate(_chunk_lengths(size, self._preset.slots)):
            acc = _load_vector(self._ctx, parsed[0].chunks[j], length)
            for msg in parsed[1:]:
                acc += _load_vector(self._ctx, msg.chunks[j], length)
            out.append(acc.serialize())
        return _write(
            fingerprint=self._fingerprint,
            preset=self._preset,
            size=size,
            num_examples=sum(m.num_examples for m in parsed),
            num_updates=k_total,
            chunks=out,
        )
