"""Protection mode ``ckks``: packed homomorphic encryption, the server only adds ciphertexts.

Two encodings, chosen by the preset: ``ckks-float`` (TenSEAL CKKS vectors of ``N/2`` float
slots) and ``bfv-packed`` (quantized values, several per BFV slot; see
:mod:`fedcrypt.protection.packed`). Both are single-key (threshold-free) schemes: every
hospital holds the same secret key, the server a context without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

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
from fedcrypt.protection.bfv import BFVContext
from fedcrypt.protection.packed import PackedHospitalCodec, aggregate_packed
from fedcrypt.protection.presets import CKKSPreset

logger = logging.getLogger(__name__)

SCHEME = "ckks"
ENCODING_FLOAT = "ckks-float"

#: SEAL samples fresh noise from a centred binomial distribution with σ = 3.2 (SEAL ≥ 3.6;
#: earlier versions: a normal clipped at 6σ = 19.2); every coefficient is at most 21.
NOISE_COEFF_MAX = 21.0
#: Per-slot failure probability used in the high-probability error bound (2^-64 per slot
#: keeps the union over any model below 2^-40).
BOUND_FAILURE_LOG2 = -64


def context_for(preset: CKKSPreset) -> ts.Context:
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


def error_bound(
    preset: CKKSPreset,
    *,
    num_hospitals: int,
    max_abs: float,
    total_examples: int | None = None,
    reference_examples: int | None = None,
) -> float:
    """Absolute error bound on each value of the decrypted FedAvg mean (one aggregation).

    **ckks-float** (Cheon et al. 2017, "Homomorphic Encryption for Arithmetic of
    Approximate Numbers"; SEAL's noise distribution). Hospital ``i`` encodes ``n_i x_i``
    as ``m_i = round(Δ · FFT⁻¹(n_i x_i))``: each of the ``N`` coefficients is rounded by at
    most 1/2, so a slot (an evaluation at a root of unity, ``|ζ| = 1``) is off by at most
    ``N/2``. Symmetric encryption adds a fresh error polynomial whose ``N`` coefficients
    are independent, centred and bounded by ``B = 21``; over the ``K`` summed ciphertexts
    the slot error is a sum of ``K N`` such terms, which by Hoeffding exceeds
    ``B sqrt(2 K N ln(2/p))`` with probability below ``p = 2^-64``. Adding ciphertexts
    adds errors (depth 0), so the sum is off by at most ``E = (K N/2 + B sqrt(2 K N
    ln(2/p))) / Δ`` and the mean (divided by ``n = Σ n_i >= K``) by ``E / n``, plus the
    double-precision FFTs' ``2 log2(N) sqrt(N/2) 2^-53 max_abs``.

    **bfv-packed**. BFV decrypts sums exactly (while the noise budget lasts), so the only
    error is quantization: each hospital's stochastic rounding is off by less than one
    step ``δ``, and the mean by less than ``K δ / n``. Calibration round:
    ``δ = 2^-scale_bits``. Calibrated rounds: ``δ_b = 2^(ceil(log2 m_b) + margin +
    shift)`` with ``m_b <= max_abs`` the global model's block maximum and ``shift`` the
    smallest integer with ``2^growth M 2^-shift <= 2^(w-1) - 1 - K_max``, ``M`` the
    reference aggregate's example count (:func:`~fedcrypt.protection.quantize.calibrate`).
    The bound returned is the larger of the two (valid in any round), and assumes no
    value was clipped
    (``|x| <= 2^margin · m_b``; see ``CKKSHospital.last_clipped``).

    Parameters
    ----------
    preset : CKKSPreset
        The parameters.
    num_hospitals : int
        ``K``, updates in the aggregate.
    max_abs : float
        Largest ``|value|`` in any hospital's (unweighted) update.
    total_examples : int, optional
        ``n = Σ n_i``; if omitted the worst case ``K`` (one example per hospital).
    reference_examples : int, optional
        ``M`` (bfv-packed): the previous aggregate's example count; defaults to
        ``total_examples`` (the same hospitals as last round).

    Returns
    -------
    float
        Bound on ``|decrypted mean - exact FedAvg mean|`` per value.

    Raises
    ------
    ValueError
        If ``num_hospitals`` < 1, ``max_abs`` < 0 or ``total_examples`` < ``num_hospitals``.
    """
    if num_hospitals < 1:
        raise ValueError(f"num_hospitals must be >= 1, got {num_hospitals}")
    if not max_abs >= 0:
        raise ValueError(f"max_abs must be >= 0, got {max_abs}")
    n_total = num_hospitals if total_examples is None else int(total_examples)
    if n_total < num_hospitals:
        raise ValueError("total_examples must be >= num_hospitals (each n_i >= 1)")
    k = num_hospitals
    if preset.is_packed:
        wide = k * math.ldexp(1.0, -preset.scale_bits) / n_total
        if max_abs == 0:
            return wide
        m = n_total if reference_examples is None else int(reference_examples)
        room = preset.packing().bound - preset.max_hospitals
        cap = m << preset.growth_bits
        shift = 0
        while math.ldexp(cap, -shift) > room:
            shift += 1
        while shift > -64 and math.ldexp(cap, -(shift - 1)) <= room:
            shift -= 1
        mant, exp = math.frexp(max_abs)
        cl2 = exp - 1 if mant == 0.5 else exp
        step = math.ldexp(1.0, cl2 + preset.margin_bits + shift)
        return max(wide, k * step / n_total)
    n = preset.poly_modulus_degree
    log_term = math.log(2.0) * (1 - BOUND_FAILURE_LOG2)  # ln(2/p), p = 2^BOUND_FAILURE_LOG2
    scaled = k * n / 2 + NOISE_COEFF_MAX * math.sqrt(2.0 * k * n * log_term)
    fft = 2.0 * math.log2(n) * math.sqrt(n / 2) * 2.0**-53 * max_abs
    return math.ldexp(scaled, -preset.scale_bits) / n_total + fft


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


def _parse(blob: bytes, preset: CKKSPreset) -> _Parsed:
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
    preset: CKKSPreset,
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


HEContext: TypeAlias = ts.Context | BFVContext


class CKKSHospital:
    """Hospital side of ``ckks``: holds the secret key, encrypts and decrypts.

    Parameters
    ----------
    context : tenseal.Context or BFVContext
        The private key context (with the secret key) from
        :mod:`fedcrypt.protection.keys`: a TenSEAL CKKS context for ``ckks-float``
        presets, a :class:`~fedcrypt.protection.bfv.BFVContext` for ``bfv-packed`` ones.
    preset : CKKSPreset
        The parameters the context was made with.
    fingerprint : str
        The key context's fingerprint (hex), stored in both key files.

    Raises
    ------
    KeyMaterialError
        If ``context`` holds no secret key or does not fit the preset's encoding.
    """

    scheme = SCHEME

    def __init__(self, context: HEContext, *, preset: CKKSPreset, fingerprint: str) -> None:
        if not context.is_private():
            raise KeyMaterialError(
                "a hospital needs the secret key: this key context is public "
                "(use the hospital key file, not the server key file)"
            )
        self._preset = preset
        self._fingerprint = fingerprint
        self._codec: PackedHospitalCodec | None = None
        if preset.is_packed:
            if not isinstance(context, BFVContext):
                raise KeyMaterialError(f"preset {preset.name!r} needs a BFV key context")
            self._codec = PackedHospitalCodec(context, preset=preset, fingerprint=fingerprint)
        else:
            if not isinstance(context, ts.Context):
                raise KeyMaterialError(f"preset {preset.name!r} needs a CKKS key context")
            context.global_scale = float(2**preset.scale_bits)
        self._ctx = context

    @property
    def fingerprint(self) -> str:
        """The key context's fingerprint (hex sha256)."""
        return self._fingerprint

    @property
    def preset(self) -> CKKSPreset:
        """The encryption parameters."""
        return self._preset

    @property
    def last_clipped(self) -> int:
        """Values clipped by the last :meth:`protect` (calibrated ``bfv-packed`` rounds)."""
        return 0 if self._codec is None else self._codec.last_clipped

    def set_reference(self, mean: NDArray[np.floating] | None, *, total_examples: int) -> None:
        """Calibrate the next update's quantization on a global model (``bfv-packed``).

        :meth:`unprotect` does this automatically with every aggregate; no-op for
        ``ckks-float`` presets.
        """
        if self._codec is not None:
            self._codec.set_reference(mean, total_examples=total_examples)

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """Encrypt ``num_examples * update`` in packed ciphertexts.

        ``ckks-float``: ``N/2`` float slots per ciphertext. ``bfv-packed``: stochastic
        rounding to the round's grid, ``F`` values per slot, ``F N`` per ciphertext.

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
            (:attr:`CKKSPreset.max_weighted_abs`), which would wrap around the modulus.
        """
        vec = check_update(update, num_examples)
        weighted = vec * float(num_examples)
        if self._codec is not None:
            return self._codec.protect(weighted, num_examples=num_examples)
        assert isinstance(self._ctx, ts.Context)
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
        if self._codec is not None:
            mean, n, k = self._codec.unprotect(aggregate)
            return AggregateResult(mean=mean, total_examples=n, num_updates=k)
        assert isinstance(self._ctx, ts.Context)
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
    """Server side of ``ckks``: adds ciphertexts; holds no secret key.

    Parameters
    ----------
    public_context : tenseal.Context or BFVContext
        The key context without its secret key (server key file).
    preset : CKKSPreset
        The parameters the context was made with.
    fingerprint : str
        The key context's fingerprint (hex).

    Raises
    ------
    KeyMaterialError
        If ``public_context`` holds a secret key: the server must never hold one.
    """

    scheme = SCHEME

    def __init__(self, public_context: HEContext, *, preset: CKKSPreset, fingerprint: str) -> None:
        if public_context.is_private():
            raise KeyMaterialError(
                "refusing a key context that holds a secret key: the aggregation server "
                "must only hold the public (server) key file"
            )
        expected = BFVContext if preset.is_packed else ts.Context
        if not isinstance(public_context, expected):
            raise KeyMaterialError(f"preset {preset.name!r} needs a {expected.__name__}")
        self._ctx = public_context
        self._preset = preset
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        """The key context's fingerprint (hex sha256)."""
        return self._fingerprint

    @property
    def preset(self) -> CKKSPreset:
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
        if isinstance(self._ctx, BFVContext):
            return aggregate_packed(
                self._ctx, updates, preset=self._preset, fingerprint=self._fingerprint
            )
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
