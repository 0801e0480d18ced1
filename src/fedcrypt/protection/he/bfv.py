"""Quantized, packed updates under BFV: several values per slot, steps calibrated per round.

Round protocol (see ``docs/he-packing.md``):

* **Calibration round** (a hospital has not yet decrypted a global model): one wide
  field per slot, fixed-point step ``2**-scale_bits``; ``num_examples * |x|`` must stay
  below :attr:`~fedcrypt.protection.he.params.HEPreset.max_weighted_abs`.
* **Calibrated rounds**: the steps come from the global model every hospital decrypted
  at the start of the round (:func:`~fedcrypt.protection.he.quantize.calibrate`), on
  blocks that never span two tensors, so all hospitals quantize on the same grid and
  ``F`` fields share a slot.

Integer buffers (BatchNorm's ``num_batches_tracked``) travel exactly in slots of their
own; every ciphertext carries the example count, the update count and a keyed check
value (:mod:`~fedcrypt.protection.he.integrity`). The quantization plan and the step
table travel with every update and aggregate, encrypted deterministically with AES-SIV
(RFC 5297) under a key derived (HKDF-SHA256, RFC 5869) from the shared secret key, with
the run id, round, size and mode as associated data: hospitals decode any aggregate on
their own, the server learns nothing about the global model's magnitudes and can still
check that all updates of a round used the same table (equal ciphertexts).

Ciphertexts are seeded (:mod:`~fedcrypt.protection.he.seal`): a hospital uploads ``c0``
and a 64-byte seed per ciphertext; the server adds the ``c0`` and keeps every seed, and
the aggregate carries ``Σ c0`` and the ``K`` seeds, from which each hospital re-derives
``Σ c1`` (download ≈ upload + 64 bytes per ciphertext per extra hospital).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from numpy.typing import NDArray

from fedcrypt.exceptions import (
    AggregationError,
    ConfigError,
    KeyMaterialError,
    ProtocolError,
)
from fedcrypt.protection import wire
from fedcrypt.protection.base import AggregateResult, check_update
from fedcrypt.protection.he import framing
from fedcrypt.protection.he.integrity import (
    FORMAT,
    RESERVED,
    ModularCheck,
    RoundState,
    derive,
    integrity_error,
)
from fedcrypt.protection.he.params import ENCODING_BFV, MODE, READ_SCHEMES, WIRE_SCHEME, HEPreset
from fedcrypt.protection.he.quantize import (
    FieldPacking,
    QuantPlan,
    StepTable,
    calibrate,
    dequantize,
    quantize,
    uniform_steps,
)
from fedcrypt.protection.he.seal import BFVContext

logger = logging.getLogger(__name__)

SCHEME = WIRE_SCHEME
MODE_CALIBRATION = "calibration"
MODE_CALIBRATED = "calibrated"


def packing_for(preset: HEPreset, mode: str) -> FieldPacking:
    """The field layout of ``mode``."""
    return preset.packing() if mode == MODE_CALIBRATED else preset.calibration_packing()


def _table_aad(
    fingerprint: str, run: str, round: int, size: int, mode: str, max_examples: int = 0
) -> list[bytes]:
    aad = [
        b"fedcrypt/step-table/v2",
        fingerprint.encode(),
        run.encode(),
        str(round).encode(),
        str(size).encode(),
        mode.encode(),
    ]
    if mode == MODE_CALIBRATED:  # the grid's capacity: the next grid never shrinks below it
        aad.append(str(max_examples).encode())
    return aad


def next_reference_examples(total_examples: int, max_examples: int, growth_bits: int) -> int:
    """The example count the next round's grid is calibrated for.

    The larger of the aggregate's own ``Σ n_i`` and the count its grid was made for
    (``max_examples / 2^growth``): a small round (a dropout, a sample) does not shrink the
    capacity, so hospitals rejoining the next round fit (e.g. 1 of 3 hospitals in round
    2, all 3 again in round 3). Every hospital that decrypts the aggregate derives the same
    count, and ``max_examples`` is authenticated with the step table.
    """
    return max(int(total_examples), int(max_examples) >> int(growth_bits))


@dataclass(frozen=True)
class PackedMessage:
    """A parsed packed update or aggregate (sections are zero-copy views)."""

    common: framing.Common
    mode: str
    table: bytes
    max_examples: int
    c0: bytes | memoryview
    seeds: bytes | memoryview


def parse(blob: bytes, preset: HEPreset, *, slots: int, poly_bytes: int) -> PackedMessage:
    """Parse and check a packed message against ``preset``.

    Raises
    ------
    ProtocolError
        If the message is malformed, of another format version, or does not match the
        preset's layout.
    """
    env = wire.unpack(blob, expect_scheme=READ_SCHEMES)
    h = env.header
    if h.get("encoding") != ENCODING_BFV:
        raise ProtocolError(
            f"message encoding {h.get('encoding')!r} does not match this key ({ENCODING_BFV})"
        )
    framing.require_format(h)
    mode = h.get("mode")
    if mode not in (MODE_CALIBRATION, MODE_CALIBRATED):
        raise ProtocolError("malformed packed message: bad mode")
    size = wire.header_int(h, "size", minimum=1)
    usable = slots - RESERVED
    common = framing.read_common(h, max_ciphertexts=-(-size // usable) + 1)
    packing = packing_for(preset, mode)
    if (
        wire.header_int(h, "slots", minimum=1) != slots
        or wire.header_int(h, "fields", minimum=1) != packing.fields
        or wire.header_int(h, "field_bits", minimum=1) != packing.field_bits
    ):
        raise ProtocolError("malformed packed message: layout does not match this key")
    if common.ciphertexts < -(-size // (packing.fields * usable)):
        raise ProtocolError(
            f"malformed packed message: {common.ciphertexts} ciphertexts for {size} values"
        )
    if len(env.sections) != 3:
        raise ProtocolError("malformed packed message: wrong number of sections")
    table, c0, seeds = env.sections
    framing.check_payload(c0, seeds, common, poly_bytes=poly_bytes)
    max_examples = wire.header_int(h, "max_examples")
    return PackedMessage(common, str(mode), bytes(table), max_examples, c0, seeds)


def write(
    *,
    preset: HEPreset,
    common: framing.Common,
    mode: str,
    table: bytes,
    max_examples: int,
    c0: bytes,
    seeds: bytes,
) -> bytes:
    """Serialize a packed message (header, encrypted plan and steps, ``c0``, seeds).

    ``max_examples`` (calibrated rounds) is the largest ``Σ n_i`` the round's grid can
    hold; the server refuses a round above it. It is ``2**growth_bits`` times the
    previous aggregate's example count, which the server already knows.
    """
    packing = packing_for(preset, mode)
    header: dict[str, Any] = {
        "scheme": SCHEME,
        "encoding": ENCODING_BFV,
        "format": FORMAT,
        "fingerprint": common.fingerprint,
        "preset": preset.name,
        "mode": mode,
        "run": common.run,
        "round": common.round,
        "size": common.size,
        "slots": preset.slots,
        "fields": packing.fields,
        "field_bits": packing.field_bits,
        "ciphertexts": common.ciphertexts,
        "steps": hashlib.sha256(table).hexdigest()[:32],
        "max_examples": int(max_examples),
        "num_examples": common.num_examples,
        "num_updates": common.num_updates,
    }
    if common.hospital is not None:
        header["hospital"] = common.hospital
    return wire.pack(header, [table, c0, seeds])


@dataclass(frozen=True)
class EncodedUpdate:
    """A quantized, packed update before encryption.

    Attributes
    ----------
    mode : str
        ``"calibration"`` or ``"calibrated"``.
    table : bytes
        The encrypted plan and step table.
    max_examples : int
        The round's example capacity (0 in the calibration round).
    slots : numpy.ndarray
        uint64, shape ``(C, N)``: slot values reduced modulo ``t``, reserved slots filled
        in.
    """

    mode: str
    table: bytes
    max_examples: int
    slots: NDArray[np.uint64]


class BFVHospital:
    """Hospital side of the quantized, packed BFV presets: quantize, pack, encrypt; decrypt.

    Holds the reference (last decrypted global model and its example count) from which
    the next round's steps are calibrated, and the round binding (:meth:`set_round`).

    Parameters
    ----------
    ctx : BFVContext
        The private BFV context (with the secret key) from
        :mod:`fedcrypt.protection.he.keys`.
    preset : HEPreset
        The parameters the context was made with (``encoding="bfv-packed"``).
    fingerprint : str
        The key context's fingerprint (hex), stored in both key files.
    layout : fedcrypt.protection.flatten.Layout, optional
        The model's tensors: quantization blocks then never span two tensors, integer
        buffers travel exactly and variances stay non-negative. Without it an update is
        one floating tensor (blocks of 64 consecutive values).

    Raises
    ------
    KeyMaterialError
        If ``ctx`` holds no secret key or ``preset`` is not a packed BFV preset.
    """

    scheme = MODE
    wire_scheme = WIRE_SCHEME
    read_schemes = READ_SCHEMES

    def __init__(
        self, ctx: BFVContext, *, preset: HEPreset, fingerprint: str, layout: Any = None
    ) -> None:
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
        self._secret = ctx.secret_material()
        self._siv = AESSIV(derive(self._secret, "step-table/v2", fingerprint, length=64))
        self._plan = QuantPlan.of(layout) if layout is not None else None
        self._reference: tuple[NDArray[np.float64], int] | None = None
        self._state = RoundState()
        self._last: tuple[str, AggregateResult] | None = None
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

    @property
    def round_state(self) -> RoundState:
        """The current run, round and replay state (read-only use)."""
        return self._state

    def set_round(
        self, run_id: str, round: int, *, hospital: str | None = None, seed: int | None = None
    ) -> None:
        """Bind the next updates to ``run_id`` and ``round``, and enforce them on aggregates.

        ``protect`` writes the round and run into the update (header, the step table's
        associated data, the check values). ``unprotect`` then refuses an aggregate of
        another run, of a round after ``round``, or older than the last aggregate this
        hospital decrypted (a replay); pass ``unprotect(blob, round=r)`` to demand one
        round.

        Parameters
        ----------
        run_id : str
            The run's or federation's identity (at most 128 printable characters).
        round : int
            The round being played (>= 0).
        hospital : str, optional
            This hospital's label (errors name it; it must be unique in the run).
        seed : int, optional
            Makes stochastic rounding reproducible: its noise comes from HKDF(secret key;
            run, round, hospital, seed), so runs with the same seed are identical and the
            server still cannot predict it. Needs ``hospital``.

        Raises
        ------
        ConfigError
            If an argument is invalid.
        """
        self._state.set(run_id, round, hospital=hospital, seed=seed)

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
    def reference_examples(self) -> int | None:
        """The example count the next grid is calibrated for (None before a reference).

        Pass it to :meth:`set_reference` to restore the calibration elsewhere (another
        process of the same hospital) without decrypting the aggregate again.
        """
        return None if self._reference is None else self._reference[1]

    @property
    def calibrated(self) -> bool:
        """Whether the next update uses calibrated (packed) steps."""
        return self._reference is not None

    def _plan_for(self, size: int) -> QuantPlan:
        if self._plan is None:
            return QuantPlan.flat(size)
        if self._plan.size != size:
            raise ValueError(f"update has {size} values, the model layout {self._plan.size}")
        return self._plan

    def _check_values(self, round: int, run: str, ciphertexts: int) -> ModularCheck:
        key = derive(self._secret, "bfv-check/v2", self._fingerprint, run, round)
        return ModularCheck(
            key,
            plain_modulus=self._ctx.plain_modulus,
            slots=self._preset.slots,
            ciphertexts=ciphertexts,
        )

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
            A ``wire`` envelope: header (scheme, encoding, format 2, mode, fingerprint,
            run, round, size, counts), the encrypted plan and step table, the ``c0``
            polynomials and the seeds.

        Raises
        ------
        ValueError
            If ``update`` is not 1-D and finite, ``num_examples`` < 1, or the update's
            size differs from the layout's or the calibrated reference's.
        ConfigError
            In the calibration round, if ``max |weighted|`` exceeds the preset's range;
            in calibrated rounds, if ``num_examples`` exceeds the round's capacity; if an
            integer buffer times ``num_examples`` exceeds its exact range.
        """
        weighted = check_update(update, num_examples) * float(num_examples)
        enc = self.encode(weighted, num_examples=num_examples)
        sealed = self._ctx.encrypt(enc.slots)
        st = self._state
        common = framing.Common(
            fingerprint=self._fingerprint,
            run=st.run_id,
            round=st.round,
            size=weighted.size,
            num_examples=int(num_examples),
            num_updates=1,
            ciphertexts=enc.slots.shape[0],
            hospital=st.hospital,
        )
        return write(
            preset=self._preset,
            common=common,
            mode=enc.mode,
            table=enc.table,
            max_examples=enc.max_examples,
            c0=self._ctx.word_format.pack(sealed.c0),
            seeds=sealed.seeds.tobytes(),
        )

    def encode(self, weighted: NDArray[np.float64], *, num_examples: int) -> EncodedUpdate:
        """Quantize and pack (no encryption); see :meth:`protect`."""
        preset = self._preset
        st = self._state
        plan = self._plan_for(weighted.size)
        qidx, xidx = plan.quantized_index, plan.exact_index
        values = weighted if xidx.size == 0 else weighted[qidx]
        t = self._ctx.plain_modulus
        exact = np.rint(weighted[xidx]).astype(np.int64)
        limit = (t // 2 - 1) // preset.max_hospitals
        if exact.size and int(np.abs(exact).max()) > limit:
            raise ConfigError(
                f"num_examples x an integer buffer reaches {int(np.abs(exact).max())}, above "
                f"the exact range of {limit} per hospital"
            )
        if self._reference is None:
            mode = MODE_CALIBRATION
            steps = uniform_steps(preset.scale_bits)
            peak = float(np.max(np.abs(values))) if values.size else 0.0
            if peak > preset.max_weighted_abs:
                raise ConfigError(
                    f"num_examples * |update| reaches {peak:.3g}, above the {preset.name!r} "
                    f"preset's calibration-round range of {preset.max_weighted_abs:.3g} per "
                    "hospital; use a preset with fewer scale_bits"
                )
            clip = float(preset.calibration_limit - 1)
            max_examples = 0
        else:
            mode = MODE_CALIBRATED
            ref, m = self._reference
            if ref.size != weighted.size:
                raise ValueError(
                    f"update has {weighted.size} values, the global model it was calibrated "
                    f"on has {ref.size}"
                )
            cal = calibrate(
                ref if xidx.size == 0 else ref[qidx],
                block_lengths=plan.block_lengths,
                reference_examples=m,
                packing=preset.packing(),
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
            max_examples = cal.max_examples
        packing = packing_for(preset, mode)
        table = self._siv.encrypt(
            plan.to_bytes() + steps.to_bytes(),
            _table_aad(self._fingerprint, st.run_id, st.round, weighted.size, mode, max_examples),
        )
        q = quantize(values, steps, clip=clip, rng=st.rng(self._secret, self._fingerprint))
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
        data = packing.pack(q.ints)
        layout = framing.SlotLayout(preset.slots, exact.size, data.size)
        grid = layout.place(exact, data, count=num_examples, updates=1)
        np.mod(grid, t, out=grid)
        slots = grid.view(np.uint64)  # reduced: in [0, t)
        tags = self._check_values(st.round, st.run_id, grid.shape[0]).tags(slots)
        slots[:, -1] = np.asarray(tags, dtype=np.uint64)
        return EncodedUpdate(mode, table, max_examples, slots)

    def unprotect(self, aggregate: bytes, *, round: int | None = None) -> AggregateResult:
        """Decrypt an aggregate, verify it, and divide by the total example count.

        Also makes the result the reference for the next round's steps. Decrypting the
        same aggregate again returns the cached result.

        Parameters
        ----------
        aggregate : bytes
            The server's aggregate.
        round : int, optional
            Demand an aggregate of exactly this round (default: any round allowed by
            :meth:`set_round`'s rules).

        Raises
        ------
        ProtocolError
            If the aggregate is malformed or of an older format version.
        DecryptionError
            If it belongs to another key context.
        fedcrypt.exceptions.ReplayError
            If it belongs to another run or round (see :meth:`set_round`).
        fedcrypt.exceptions.IntegrityError
            If its step table fails authentication, a ciphertext fails its check value,
            the counts inside disagree with the header, or a field is out of range
            (corrupted, tampered with, or more than ``max_hospitals`` updates).
        """
        wf = self._ctx.word_format
        msg = parse(aggregate, self._preset, slots=self._preset.slots, poly_bytes=wf.poly_bytes)
        common = msg.common
        framing.check_key(common, self._fingerprint)
        self._state.accept(common.run, common.round, expect_round=round)
        digest = hashlib.sha256(aggregate).hexdigest()
        if self._last is not None and self._last[0] == digest:
            return self._last[1]
        r = common.round
        try:
            raw = self._siv.decrypt(
                msg.table,
                _table_aad(
                    self._fingerprint, common.run, r, common.size, msg.mode, msg.max_examples
                ),
            )
            plan, rest = QuantPlan.from_bytes(raw, size=common.size)
            if msg.mode == MODE_CALIBRATED:
                steps = StepTable.from_bytes(rest, plan=plan)
            elif rest:
                raise ValueError("a calibration-round table holds no steps")
            else:
                steps = uniform_steps(self._preset.scale_bits)
        except (InvalidTag, ValueError) as exc:
            raise integrity_error(
                "the aggregate's step table fails authentication (tampered with, or not of "
                f"run {common.run!r} round {r})",
                round=r,
            ) from exc
        packing = packing_for(self._preset, msg.mode)
        qidx, xidx = plan.quantized_index, plan.exact_index
        layout = framing.SlotLayout(self._preset.slots, xidx.size, packing.slots_for(qidx.size))
        if layout.ciphertexts != common.ciphertexts:
            raise integrity_error(
                f"the aggregate has {common.ciphertexts} ciphertexts, its plan needs "
                f"{layout.ciphertexts}",
                round=r,
            )
        try:
            sealed = framing.sealed_of(msg.c0, msg.seeds, common, wf)
        except ValueError as exc:
            raise integrity_error(f"the aggregate is corrupted ({exc})", round=r) from exc
        rows = self._ctx.decrypt(sealed)
        self._verify(rows, common)
        t = self._ctx.plain_modulus
        signed = np.where(
            rows > np.uint64(t // 2), rows.astype(np.int64) - t, rows.astype(np.int64)
        )
        exact, data = layout.split(signed)
        try:
            ints = packing.unpack(data, size=qidx.size)
        except ValueError as exc:
            raise integrity_error(
                f"the decrypted aggregate is out of range ({exc}): corrupted data or a sum "
                f"of more than {self._preset.max_hospitals} updates",
                round=r,
            ) from exc
        n = common.num_examples
        if xidx.size:
            mean = np.empty(common.size, dtype=np.float64)
            mean[qidx] = dequantize(ints, steps)
            mean[xidx] = exact
        else:
            mean = dequantize(ints, steps)
        mean /= n
        var = plan.variance_index
        if var.size:  # a no-op in exact arithmetic: SR of y >= 0 is >= 0 at every hospital
            mean[var] = np.maximum(mean[var], 0.0)
        self.set_reference(
            mean,
            total_examples=next_reference_examples(n, msg.max_examples, self._preset.growth_bits),
        )
        self._state.accepted(r)
        result = AggregateResult(mean=mean, total_examples=n, num_updates=common.num_updates)
        self._last = (digest, result)
        return result

    def _verify(self, rows: NDArray[np.uint64], common: framing.Common) -> None:
        """Check values, then the counts inside every ciphertext, against the header."""
        r = common.round
        tags = self._check_values(r, common.run, rows.shape[0]).tags(rows)
        bad = [j for j, (a, b) in enumerate(zip(tags, rows[:, -1].tolist(), strict=True)) if a != b]
        if bad:
            raise integrity_error(
                f"{len(bad)} of {rows.shape[0]} ciphertexts of the aggregate of "
                f"{common.num_updates} updates fail their check value (first: ciphertext "
                f"{bad[0]}): corrupted or tampered with after encryption, not of run "
                f"{common.run!r} round {r}, or summed beyond the noise budget",
                round=r,
            )
        counts = rows[:, -3]
        updates = rows[:, -2]
        if np.any(counts != np.uint64(common.num_examples)) or np.any(
            updates != np.uint64(common.num_updates)
        ):
            raise integrity_error(
                f"the counts inside the ciphertexts ({int(counts[0])} examples, "
                f"{int(updates[0])} updates) disagree with the header "
                f"({common.num_examples} examples, {common.num_updates} updates)",
                round=r,
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
    read_schemes = READ_SCHEMES

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
        """Add packed updates: ``c0`` polynomials modulo each prime, seeds kept (depth 0).

        Raises
        ------
        AggregationError
            If ``updates`` is empty, exceeds ``max_hospitals``, comes from another key
            context, or the updates differ in size, round, mode or step table.
        ProtocolError
            If an update is malformed or a coefficient is out of range.
        """
        preset, fingerprint = self._preset, self._fingerprint
        wf = self._ctx.word_format
        if not updates:
            raise AggregationError("no updates to aggregate")
        msgs = [
            parse(blob, preset, slots=preset.slots, poly_bytes=wf.poly_bytes) for blob in updates
        ]
        first = msgs[0]
        framing.check_updates([m.common for m in msgs], fingerprint)
        for i, m in enumerate(msgs):
            if (
                m.mode != first.mode
                or m.table != first.table
                or m.max_examples != first.max_examples
                or m.common.ciphertexts != first.common.ciphertexts
            ):
                raise AggregationError(
                    f"{framing.who(i, m.common)} was quantized on a different grid (hospitals "
                    "calibrated on different global models, or some skipped the calibration "
                    "round)"
                )
        k_total = sum(m.common.num_updates for m in msgs)
        n_total = sum(m.common.num_examples for m in msgs)
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
        c0, seeds = framing.add_ciphertexts([(m.c0, m.seeds, m.common) for m in msgs], wf)
        fc = first.common
        common = framing.Common(
            fingerprint=fingerprint,
            run=fc.run,
            round=fc.round,
            size=fc.size,
            num_examples=n_total,
            num_updates=k_total,
            ciphertexts=fc.ciphertexts,
            hospital=None,
        )
        return write(
            preset=preset,
            common=common,
            mode=first.mode,
            table=first.table,
            max_examples=first.max_examples,
            c0=c0,
            seeds=seeds,
        )
