"""Quantized, packed updates under BFV: several values per slot, steps calibrated per round.

Round protocol (see ``docs/he-packing.md``):

* **Calibration round** (a hospital has not yet decrypted a global model): one wide
  field per slot, fixed-point step ``2**-scale_bits``; ``num_examples * |x|`` must stay
  below :attr:`~fedcrypt.protection.he.params.HEPreset.max_weighted_abs`.
* **Calibrated rounds**: the steps come from the global model every hospital decrypted
  at the start of the round (:func:`~fedcrypt.protection.he.quantize.calibrated_steps`),
  so all hospitals quantize on the same grid and ``F`` fields share a slot.

The step table travels with every update and aggregate, encrypted deterministically
with AES-SIV (RFC 5297) under a key derived (HKDF-SHA256, RFC 5869) from the shared
secret key: hospitals can decode any aggregate on their own, while the server learns
nothing about the global model's magnitudes and can still check that all updates of a
round used the same table (equal ciphertexts).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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
from fedcrypt.protection.he.params import ENCODING_BFV, MODE, WIRE_SCHEME, HEPreset
from fedcrypt.protection.he.quantize import (
    FieldPacking,
    StepTable,
    calibrate,
    dequantize,
    new_rng,
    quantize,
    uniform_steps,
)
from fedcrypt.protection.he.seal import BFVContext

logger = logging.getLogger(__name__)

SCHEME = WIRE_SCHEME
MODE_CALIBRATION = "calibration"
MODE_CALIBRATED = "calibrated"


def table_key(secret_key: bytes, fingerprint: str) -> AESSIV:
    """AES-SIV (512-bit key) for step tables, derived from the shared secret key."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=None,
        info=b"fedcrypt/step-table/v1|" + fingerprint.encode(),
    ).derive(secret_key)
    return AESSIV(okm)


def packing_for(preset: HEPreset, mode: str) -> FieldPacking:
    """The field layout of ``mode``."""
    return preset.packing() if mode == MODE_CALIBRATED else preset.calibration_packing()


@dataclass(frozen=True)
class PackedMessage:
    """A parsed packed update or aggregate (ciphertexts are zero-copy views)."""

    header: dict[str, Any]
    fingerprint: str
    mode: str
    size: int
    num_examples: int
    num_updates: int
    table: bytes
    max_examples: int
    chunks: Sequence[bytes | memoryview]


def parse(blob: bytes, preset: HEPreset) -> PackedMessage:
    """Parse and check a packed message against ``preset``.

    Raises
    ------
    ProtocolError
        If the message is malformed or does not match the preset's layout.
    """
    env = wire.unpack(blob, expect_scheme=SCHEME)
    h = env.header
    if h.get("encoding") != ENCODING_BFV:
        raise ProtocolError(
            f"message encoding {h.get('encoding')!r} does not match this key ({ENCODING_BFV})"
        )
    fp = h.get("fingerprint")
    mode = h.get("mode")
    if not isinstance(fp, str) or mode not in (MODE_CALIBRATION, MODE_CALIBRATED):
        raise ProtocolError("malformed packed message: bad fingerprint or mode")
    size = wire.header_int(h, "size", minimum=1)
    n = wire.header_int(h, "num_examples", minimum=1)
    k = wire.header_int(h, "num_updates", minimum=1)
    packing = packing_for(preset, mode)
    if (
        wire.header_int(h, "slots", minimum=1) != preset.slots
        or wire.header_int(h, "fields", minimum=1) != packing.fields
        or wire.header_int(h, "field_bits", minimum=1) != packing.field_bits
    ):
        raise ProtocolError("malformed packed message: layout does not match this key")
    per_ct = packing.fields * preset.slots
    if len(env.sections) != 1 + -(-size // per_ct):
        raise ProtocolError(
            f"malformed packed message: {len(env.sections) - 1} ciphertexts for {size} values"
        )
    table = bytes(env.sections[0])
    if (mode == MODE_CALIBRATION) != (len(table) == 0):
        raise ProtocolError("malformed packed message: step table does not match the mode")
    max_examples = wire.header_int(h, "max_examples", minimum=0)
    return PackedMessage(h, fp, mode, size, n, k, table, max_examples, env.sections[1:])


def write(
    *,
    preset: HEPreset,
    fingerprint: str,
    mode: str,
    size: int,
    num_examples: int,
    num_updates: int,
    table: bytes,
    max_examples: int,
    chunks: Sequence[bytes],
) -> bytes:
    """Serialize a packed message (header, encrypted step table, ciphertexts).

    ``max_examples`` (calibrated rounds) is the largest ``Σ n_i`` the round's grid can
    hold; the server refuses a round above it. It is ``2**growth_bits`` times the
    previous aggregate's example count, which the server already knows.
    """
    packing = packing_for(preset, mode)
    header = {
        "scheme": SCHEME,
        "encoding": ENCODING_BFV,
        "fingerprint": fingerprint,
        "preset": preset.name,
        "mode": mode,
        "size": int(size),
        "slots": preset.slots,
        "fields": packing.fields,
        "field_bits": packing.field_bits,
        "steps": hashlib.sha256(table).hexdigest()[:32],
        "max_examples": int(max_examples),
        "num_examples": int(num_examples),
        "num_updates": int(num_updates),
    }
    return wire.pack(header, [table, *chunks])


@dataclass(frozen=True)
class EncodedUpdate:
    """A quantized, packed update before encryption.

    Attributes
    ----------
    mode : str
        ``"calibration"`` or ``"calibrated"``.
    table : bytes
        The encrypted step table (empty in the calibration round).
    max_examples : int
        The round's example capacity (0 in the calibration round).
    slots : numpy.ndarray
        int64, shape ``(C, N)``: signed packed slots, one row per ciphertext.
    """

    mode: str
    table: bytes
    max_examples: int
    slots: NDArray[np.int64]


class BFVHospital:
    """Hospital side of the quantized, packed BFV presets: quantize, pack, encrypt; decrypt.

    Holds the reference (last decrypted global model and its example count) from which
    the next round's steps are calibrated.

    Parameters
    ----------
    ctx : BFVContext
        The private BFV context (with the secret key) from
        :mod:`fedcrypt.protection.he.keys`.
    preset : HEPreset
        The parameters the context was made with (``encoding="bfv-packed"``).
    fingerprint : str
        The key context's fingerprint (hex), stored in both key files.

    Raises
    ------
    KeyMaterialError
        If ``ctx`` holds no secret key or ``preset`` is not a packed BFV preset.
    """

    scheme = MODE
    wire_scheme = WIRE_SCHEME

    def __init__(self, ctx: BFVContext, *, preset: HEPreset, fingerprint: str) -> None:
        if not preset.is_packed or not isinstance(ctx, BFVContext):
            raise KeyMaterialError(f"preset {preset.name!r} needs a BFV key context")
        if not ctx.is_private():
            raise KeyMaterialError(
                "a hospital needs the secret key: this key context is public "
                "(use the hospital key file, not the server key file)"
            )
        self._ctx = ctx
        self._preset = preset
        self._fingerprint = fingerprint
        self._siv = table_key(ctx.secret_key_bytes(), fingerprint)
        self._reference: tuple[NDArray[np.float64], int] | None = None
        self.last_clipped = 0

    @property
    def fingerprint(self) -> str:
        """The key context's fingerprint (hex sha256)."""
        return self._fingerprint

    @property
    def preset(self) -> HEPreset:
        """The encryption parameters."""
        return self._preset

    @property
    def context(self) -> BFVContext:
        """The private BFV context (benchmarks time its encryption apart)."""
        return self._ctx

    def set_reference(self, mean: NDArray[np.floating] | None, *, total_examples: int) -> None:
        """Calibrate the next updates' steps on ``mean`` (the current global model).

        :meth:`unprotect` calls this with every aggregate it decrypts; call it yourself
        only to calibrate on a global model every hospital holds (e.g. in benchmarks).
        ``None`` returns to the calibration grid.
        """
        if mean is None:
            self._reference = None
            return
        if total_examples < 1:
            raise ValueError(f"total_examples must be >= 1, got {total_examples}")
        self._reference = (np.array(mean, dtype=np.float64), int(total_examples))

    @property
    def calibrated(self) -> bool:
        """Whether the next update uses calibrated (packed) steps."""
        return self._reference is not None

    def _aad(self, size: int) -> list[bytes]:
        return [b"fedcrypt/step-table", self._fingerprint.encode(), str(size).encode()]

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """Quantize, pack and encrypt ``num_examples * update``.

        Parameters
        ----------
        update : numpy.ndarray
            Flat update, shape ``(P,)``, floating dtype.
        num_examples : int
            Local training examples ``n_i`` (FedAvg weight), at least 1.

        Returns
        -------
        bytes
            A ``wire`` envelope: header (scheme, encoding, mode, fingerprint, size,
            counts, the encrypted step table) and the serialized BFV ciphertexts.

        Raises
        ------
        ValueError
            If ``update`` is not 1-D and finite, or ``num_examples`` < 1.
        ConfigError
            In the calibration round, if ``max |weighted|`` exceeds the preset's range;
            in calibrated rounds, if ``num_examples`` exceeds the round's capacity.
        ValueError
            If the update's size differs from the calibrated reference's.
        """
        weighted = check_update(update, num_examples) * float(num_examples)
        enc = self.encode(weighted, num_examples=num_examples)
        chunks = [self._ctx.encrypt(row) for row in enc.slots]
        return write(
            preset=self._preset,
            fingerprint=self._fingerprint,
            mode=enc.mode,
            size=weighted.size,
            num_examples=num_examples,
            num_updates=1,
            table=enc.table,
            max_examples=enc.max_examples,
            chunks=chunks,
        )

    def encode(self, weighted: NDArray[np.float64], *, num_examples: int) -> EncodedUpdate:
        """Quantize and pack (no encryption); see :meth:`protect`."""
        preset = self._preset
        if self._reference is None:
            mode = MODE_CALIBRATION
            packing = preset.calibration_packing()
            steps = uniform_steps(preset.scale_bits)
            peak = float(np.max(np.abs(weighted)))
            if peak > preset.max_weighted_abs:
                raise ConfigError(
                    f"num_examples * |update| reaches {peak:.3g}, above the {preset.name!r} "
                    f"preset's calibration-round range of {preset.max_weighted_abs:.3g} per "
                    "hospital; use a preset with fewer scale_bits"
                )
            clip = float(preset.calibration_limit - 1)
            table = b""
            max_examples = 0
        else:
            mode = MODE_CALIBRATED
            packing = preset.packing()
            ref, m = self._reference
            if ref.size != weighted.size:
                raise ValueError(
                    f"update has {weighted.size} values, the global model it was calibrated "
                    f"on has {ref.size}"
                )
            cal = calibrate(
                ref,
                reference_examples=m,
                packing=packing,
                margin_bits=preset.margin_bits,
                growth_bits=preset.growth_bits,
                max_hospitals=preset.max_hospitals,
            )
            if num_examples > cal.max_examples:
                raise ConfigError(
                    f"this hospital's {num_examples} examples exceed the round's calibrated "
                    f"capacity of {cal.max_examples} (2^{preset.growth_bits} x the previous "
                    "round's total)"
                )
            steps = cal.steps
            clip = num_examples * cal.clip_per_example
            table = self._siv.encrypt(steps.to_bytes(), self._aad(weighted.size))
            max_examples = cal.max_examples
        q = quantize(weighted, steps, clip=clip, rng=new_rng())
        self.last_clipped = q.clipped
        if q.clipped:
            logger.warning(
                "clipped %d of %d values (%.2g%%) to the calibrated range; the update grew "
                "more than 2^%d x the global model's block maximum",
                q.clipped,
                weighted.size,
                100.0 * q.clipped / weighted.size,
                preset.margin_bits,
            )
        return EncodedUpdate(mode, table, max_examples, packing.pack(q.ints, preset.slots))

    def unprotect(self, blob: bytes) -> AggregateResult:
        """Decrypt an aggregate and divide by the total example count.

        Also makes the result the reference for the next round's steps.

        Raises
        ------
        ProtocolError
            If the aggregate is malformed.
        DecryptionError
            If it belongs to another key context, its step table fails authentication,
            or its fields are out of range (corrupted, or more than ``max_hospitals``).
        """
        msg = parse(blob, self._preset)
        if msg.fingerprint != self._fingerprint:
            raise DecryptionError(
                "aggregate was encrypted under another key context "
                f"(fingerprint {msg.fingerprint[:16]}…, this hospital's key is "
                f"{self._fingerprint[:16]}…)"
            )
        if msg.mode == MODE_CALIBRATED:
            try:
                raw = self._siv.decrypt(msg.table, self._aad(msg.size))
                steps = StepTable.from_bytes(raw, size=msg.size)
            except (InvalidTag, ValueError) as exc:
                raise DecryptionError("the aggregate's step table fails authentication") from exc
        else:
            steps = uniform_steps(self._preset.scale_bits)
        packing = packing_for(self._preset, msg.mode)
        t = self._ctx.plain_modulus
        rows = np.empty((len(msg.chunks), self._preset.slots), dtype=np.int64)
        for i, data in enumerate(msg.chunks):
            u = self._ctx.decrypt(self._ctx.load(data))
            rows[i] = np.where(u > t // 2, u.astype(np.int64) - t, u.astype(np.int64))
        try:
            ints = packing.unpack(rows, size=msg.size)
        except ValueError as exc:
            raise DecryptionError(
                f"decrypted aggregate is out of range ({exc}): corrupted data or a sum of "
                f"more than {self._preset.max_hospitals} updates"
            ) from exc
        mean = dequantize(ints, steps) / msg.num_examples
        self.set_reference(mean, total_examples=msg.num_examples)
        return AggregateResult(
            mean=mean, total_examples=msg.num_examples, num_updates=msg.num_updates
        )


class BFVAggregator:
    """Server side of the packed BFV presets: adds ciphertexts; holds no secret key.

    Parameters
    ----------
    ctx : BFVContext
        The public BFV context (parameters only; server key file).
    preset : HEPreset
        The parameters the context was made with.
    fingerprint : str
        The key context's fingerprint (hex).

    Raises
    ------
    KeyMaterialError
        If ``ctx`` holds a secret key (the server must never hold one) or ``preset`` is
        not a packed BFV preset.
    """

    scheme = MODE
    wire_scheme = WIRE_SCHEME

    def __init__(self, ctx: BFVContext, *, preset: HEPreset, fingerprint: str) -> None:
        if not preset.is_packed or not isinstance(ctx, BFVContext):
            raise KeyMaterialError(f"preset {preset.name!r} needs a BFV key context")
        if ctx.is_private():
            raise KeyMaterialError(
                "refusing a key context that holds a secret key: the aggregation server "
                "must only hold the public (server) key file"
            )
        self._ctx = ctx
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
        """Add packed updates ciphertext by ciphertext, chunk by chunk (depth 0).

        Raises
        ------
        AggregationError
            If ``updates`` is empty, exceeds ``max_hospitals``, comes from another key
            context, or the updates differ in size, mode or step table.
        ProtocolError
            If an update is malformed or a ciphertext does not deserialize.
        """
        ctx, preset, fingerprint = self._ctx, self._preset, self._fingerprint
        if not updates:
            raise AggregationError("no updates to aggregate")
        msgs = [parse(blob, preset) for blob in updates]
        first = msgs[0]
        for i, m in enumerate(msgs):
            if m.fingerprint != fingerprint:
                raise AggregationError(
                    f"update {i} was encrypted under another key context (fingerprint "
                    f"{m.fingerprint[:16]}…, server key {fingerprint[:16]}…)"
                )
            if m.size != first.size:
                raise AggregationError(
                    f"update sizes differ: {m.size} values vs {first.size} values"
                )
            if (
                m.mode != first.mode
                or m.table != first.table
                or m.max_examples != first.max_examples
            ):
                raise AggregationError(
                    "updates were quantized on different grids (hospitals calibrated on "
                    "different global models, or some skipped the calibration round)"
                )
        k_total = sum(m.num_updates for m in msgs)
        n_total = sum(m.num_examples for m in msgs)
        if first.mode == MODE_CALIBRATED and n_total > first.max_examples:
            raise AggregationError(
                f"the round's {n_total} examples exceed the {first.max_examples} its "
                "quantization grid was calibrated for (more hospitals or data than last round)"
            )
        if k_total > preset.max_hospitals:
            raise AggregationError(
                f"{k_total} updates exceed the {preset.name!r} preset's limit of "
                f"{preset.max_hospitals} hospitals per aggregate (carry headroom)"
            )
        out: list[bytes] = []
        for j in range(len(first.chunks)):
            acc = ctx.load(first.chunks[j])
            for m in msgs[1:]:
                ctx.add_inplace(acc, ctx.load(m.chunks[j]))
            out.append(ctx.dump(acc))
        return write(
            preset=preset,
            fingerprint=fingerprint,
            mode=first.mode,
            size=first.size,
            num_examples=n_total,
            num_updates=k_total,
            table=first.table,
            max_examples=first.max_examples,
            chunks=out,
        )
