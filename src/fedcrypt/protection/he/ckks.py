"""Float CKKS (``N/2`` real slots per ciphertext, seeded symmetric ciphertexts) for mode ``he``.

Single-key (threshold-free): every hospital holds the same secret key, the server a
context without it and only adds ciphertexts (Cheon et al. 2017, "Homomorphic
Encryption for Arithmetic of Approximate Numbers"). Key files hold TenSEAL contexts; the
encoding and the seeded encryption go through SEAL itself
(:class:`~fedcrypt.protection.he.seal.CKKSContext`), which halves the ciphertexts
(TenSEAL's ``ckks_vector`` does not keep seeds). Every ciphertext carries the example
count, the update count and a keyed check value
(:mod:`~fedcrypt.protection.he.integrity`). The quantized, packed BFV presets are
:mod:`fedcrypt.protection.he.bfv`.
"""

from __future__ import annotations

import hashlib
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
    KeyMaterialError,
    ProtocolError,
)
from fedcrypt.protection import wire
from fedcrypt.protection.base import AggregateResult, check_update
from fedcrypt.protection.he import framing
from fedcrypt.protection.he.bounds import ckks_slot_error
from fedcrypt.protection.he.integrity import (
    FORMAT,
    RESERVED,
    FloatCheck,
    RoundState,
    derive,
    float_tolerance,
    integrity_error,
)
from fedcrypt.protection.he.params import ENCODING_CKKS as ENCODING_FLOAT
from fedcrypt.protection.he.params import MODE, READ_SCHEMES, WIRE_SCHEME, HEPreset
from fedcrypt.protection.he.quantize import QuantPlan
from fedcrypt.protection.he.seal import CKKSContext, WordFormat, public_word_format

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


@dataclass(frozen=True)
class _Parsed:
    """A parsed CKKS message (sections are zero-copy views)."""

    common: framing.Common
    c0: bytes | memoryview
    seeds: bytes | memoryview


def _parse(blob: bytes, preset: HEPreset, fmt: WordFormat) -> _Parsed:
    env = wire.unpack(blob, expect_scheme=READ_SCHEMES)
    h = env.header
    encoding = framing.header_str(h, "encoding")
    if encoding != ENCODING_FLOAT:
        raise ProtocolError(f"unsupported ckks encoding {encoding!r}")
    framing.require_format(h)
    size = wire.header_int(h, "size", minimum=1)
    slots = wire.header_int(h, "slots", minimum=1)
    if slots != preset.slots:
        raise ProtocolError(
            f"malformed ckks message: {slots} slots per ciphertext, this key has {preset.slots}"
        )
    if wire.header_int(h, "scale_bits", minimum=1) != preset.scale_bits:
        raise ProtocolError("malformed ckks message: its scale does not match this key")
    usable = slots - RESERVED
    common = framing.read_common(h, max_ciphertexts=-(-size // usable))
    if common.ciphertexts != -(-size // usable):
        raise ProtocolError(
            f"malformed ckks message: {common.ciphertexts} ciphertexts for {size} values"
        )
    if len(env.sections) != 2:
        raise ProtocolError("malformed ckks message: wrong number of sections")
    c0, seeds = env.sections
    framing.check_payload(c0, seeds, common, poly_bytes=fmt.poly_bytes)
    return _Parsed(common, c0, seeds)


def _write(*, preset: HEPreset, common: framing.Common, c0: bytes, seeds: bytes) -> bytes:
    header: dict[str, Any] = {
        "scheme": SCHEME,
        "encoding": ENCODING_FLOAT,
        "format": FORMAT,
        "fingerprint": common.fingerprint,
        "preset": preset.name,
        "run": common.run,
        "round": common.round,
        "size": common.size,
        "slots": preset.slots,
        "scale_bits": preset.scale_bits,
        "ciphertexts": common.ciphertexts,
        "num_examples": common.num_examples,
        "num_updates": common.num_updates,
    }
    if common.hospital is not None:
        header["hospital"] = common.hospital
    return wire.pack(header, [c0, seeds])


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
    layout : fedcrypt.protection.flatten.Layout, optional
        The model's tensors: decrypted ``running_var`` values are clamped at 0 (CKKS
        noise could otherwise take a zero variance below 0).

    Raises
    ------
    KeyMaterialError
        If ``context`` holds no secret key or is not a CKKS context of a float preset.
    """

    scheme = MODE
    wire_scheme = WIRE_SCHEME
    read_schemes = READ_SCHEMES

    def __init__(
        self, context: ts.Context, *, preset: HEPreset, fingerprint: str, layout: Any = None
    ) -> None:
        if preset.is_packed or not isinstance(context, ts.Context):
            raise KeyMaterialError(f"preset {preset.name!r} needs a CKKS key context")
        if not context.is_private():
            raise KeyMaterialError(
                "a hospital needs the secret key: this key context is public "
                "(use the hospital key file, not the server key file)"
            )
        context.global_scale = float(2**preset.scale_bits)
        self._ctx = context
        self._seal = CKKSContext(context, scale_bits=preset.scale_bits)
        self._secret = self._seal.secret_material()
        self._preset = preset
        self._fingerprint = fingerprint
        self._plan = QuantPlan.of(layout) if layout is not None else None
        self._state = RoundState()
        self._last: tuple[str, AggregateResult] | None = None

    @property
    def fingerprint(self) -> str:
        """The key context's fingerprint (hex sha256)."""
        return self._fingerprint

    @property
    def preset(self) -> HEPreset:
        """The encryption parameters."""
        return self._preset

    @property
    def context(self) -> CKKSContext:
        """The SEAL CKKS context (benchmarks time its encryption apart)."""
        return self._seal

    @property
    def round_state(self) -> RoundState:
        """The current run, round and replay state (read-only use)."""
        return self._state

    @property
    def last_clipped(self) -> int:
        """Values clipped by the last :meth:`protect`: always 0 (float CKKS does not clip)."""
        return 0

    def set_round(
        self, run_id: str, round: int, *, hospital: str | None = None, seed: int | None = None
    ) -> None:
        """Bind the next updates to ``run_id`` and ``round``; see
        :meth:`fedcrypt.protection.he.bfv.BFVHospital.set_round` (``seed`` has no effect:
        float CKKS does not round stochastically)."""
        self._state.set(run_id, round, hospital=hospital, seed=seed)

    def set_reference(self, mean: NDArray[np.floating] | None, *, total_examples: int) -> None:
        """No-op: float CKKS needs no calibration (present for the common interface)."""

    def _check(self, run: str, round: int, ciphertexts: int) -> FloatCheck:
        key = derive(self._secret, "ckks-check/v2", self._fingerprint, run, round)
        return FloatCheck(key, slots=self._preset.slots, ciphertexts=ciphertexts)

    def encode(self, weighted: NDArray[np.float64], *, num_examples: int) -> NDArray[np.float64]:
        """The ``(C, N/2)`` slot grid of a weighted update, reserved slots filled in.

        Raises
        ------
        ConfigError
            If a slot (value, count or check) exceeds the preset's per-hospital range
            (:attr:`HEPreset.max_weighted_abs`), which would wrap around the modulus.
        """
        st = self._state
        layout = framing.SlotLayout(self._preset.slots, 0, weighted.size)
        grid = layout.place(np.zeros(0), weighted, count=num_examples, updates=1)
        grid[:, -1] = self._check(st.run_id, st.round, grid.shape[0]).tags(grid[:, :-1])
        peak = float(np.max(np.abs(grid)))
        if peak > self._preset.max_weighted_abs:
            raise ConfigError(
                f"num_examples * |update| (or its check value) reaches {peak:.3g}, above the "
                f"{self._preset.name!r} preset's capacity of "
                f"{self._preset.max_weighted_abs:.3g} per hospital (for "
                f"{self._preset.max_hospitals} hospitals); use a preset with a smaller scale"
            )
        return grid

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """Encrypt ``num_examples * update`` in seeded ciphertexts of ``N/2`` float slots.

        Parameters
        ----------
        update : numpy.ndarray
            Flat update, shape ``(P,)``, floating dtype.
        num_examples : int
            Local training examples ``n_i`` (FedAvg weight), at least 1.

        Returns
        -------
        bytes
            A ``wire`` envelope: header (scheme, encoding, format 2, fingerprint, run,
            round, size, counts), the ``c0`` polynomials and the seeds.

        Raises
        ------
        ValueError
            If ``update`` is not 1-D and finite, or ``num_examples`` < 1.
        ConfigError
            If ``num_examples * max|update|`` exceeds the preset's per-hospital range.
        """
        weighted = check_update(update, num_examples) * float(num_examples)
        grid = self.encode(weighted, num_examples=num_examples)
        sealed = self._seal.encrypt(grid)
        st = self._state
        common = framing.Common(
            fingerprint=self._fingerprint,
            run=st.run_id,
            round=st.round,
            size=weighted.size,
            num_examples=int(num_examples),
            num_updates=1,
            ciphertexts=grid.shape[0],
            hospital=st.hospital,
        )
        return _write(
            preset=self._preset,
            common=common,
            c0=self._seal.word_format.pack(sealed.c0),
            seeds=sealed.seeds.tobytes(),
        )

    def unprotect(self, aggregate: bytes, *, round: int | None = None) -> AggregateResult:
        """Decrypt an aggregate, verify it, and divide by the total example count.

        Decrypting the same aggregate again returns the cached result.

        Parameters
        ----------
        aggregate : bytes
            The server's aggregate.
        round : int, optional
            Demand an aggregate of exactly this round.

        Returns
        -------
        AggregateResult
            ``mean`` of shape ``(P,)``, float64.

        Raises
        ------
        ProtocolError
            If ``aggregate`` is malformed or of an older format version.
        DecryptionError
            If it was encrypted under another key context or does not decrypt.
        fedcrypt.exceptions.ReplayError
            If it belongs to another run or round.
        fedcrypt.exceptions.IntegrityError
            If a check value misses its bound or the counts inside disagree with the
            header (corrupted or tampered with).
        """
        wf = self._seal.word_format
        msg = _parse(aggregate, self._preset, wf)
        common = msg.common
        framing.check_key(common, self._fingerprint)
        self._state.accept(common.run, common.round, expect_round=round)
        digest = hashlib.sha256(aggregate).hexdigest()
        if self._last is not None and self._last[0] == digest:
            return self._last[1]
        r = common.round
        try:
            sealed = framing.sealed_of(msg.c0, msg.seeds, common, wf)
        except ValueError as exc:
            raise integrity_error(f"the aggregate is corrupted ({exc})", round=r) from exc
        rows = self._seal.decrypt(sealed)
        self._verify(rows, common)
        layout = framing.SlotLayout(self._preset.slots, 0, common.size)
        _, data = layout.split(rows)
        mean = data / common.num_examples
        if self._plan is not None and self._plan.size == common.size:
            var = self._plan.variance_index
            if var.size:
                mean[var] = np.maximum(mean[var], 0.0)
        self._state.accepted(r)
        result = AggregateResult(
            mean=mean, total_examples=common.num_examples, num_updates=common.num_updates
        )
        self._last = (digest, result)
        return result

    def _verify(self, rows: NDArray[np.float64], common: framing.Common) -> None:
        r = common.round
        k = common.num_updates
        finite = bool(np.all(np.isfinite(rows)))
        max_abs = float(np.max(np.abs(rows))) if finite else float("inf")
        e_slot = ckks_slot_error(self._preset, num_hospitals=k, max_abs=max_abs)
        tol = float_tolerance(e_slot, max_abs, self._preset.slots)
        expected = self._check(common.run, r, rows.shape[0]).tags(rows[:, :-1], updates=k)
        miss = np.abs(rows[:, -1] - expected) if finite else np.full(rows.shape[0], np.inf)
        bad = np.flatnonzero(~(miss <= tol))
        if bad.size:
            raise integrity_error(
                f"{bad.size} of {rows.shape[0]} ciphertexts of the aggregate of {k} updates "
                f"fail their check value (first: ciphertext {int(bad[0])}, off by "
                f"{float(miss[bad[0]]):.3g}, bound {tol:.3g}): corrupted or tampered with "
                f"after encryption, or not of run {common.run!r} round {r}",
                round=r,
            )
        count_tol = min(0.25, max(tol, 1e-9))
        if np.any(np.abs(rows[:, -3] - common.num_examples) > count_tol) or np.any(
            np.abs(rows[:, -2] - k) > count_tol
        ):
            raise integrity_error(
                f"the counts inside the ciphertexts ({rows[0, -3]:.2f} examples, "
                f"{rows[0, -2]:.2f} updates) disagree with the header "
                f"({common.num_examples} examples, {k} updates)",
                round=r,
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
    read_schemes = READ_SCHEMES

    def __init__(self, public_context: ts.Context, *, preset: HEPreset, fingerprint: str) -> None:
        if preset.is_packed or not isinstance(public_context, ts.Context):
            raise KeyMaterialError(f"preset {preset.name!r} needs a CKKS key context")
        if public_context.is_private():
            raise KeyMaterialError(
                "refusing a key context that holds a secret key: the aggregation server "
                "must only hold the public (server) key file"
            )
        self._ctx = public_context
        self._format = public_word_format(public_context)
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
        """Add protected updates (``c0`` modulo each prime, seeds kept; depth 0).

        Raises
        ------
        AggregationError
            If ``updates`` is empty, exceeds the preset's ``max_hospitals``, was encrypted
            under another key context ("update was encrypted under another key context"),
            or the updates differ in size or round.
        ProtocolError
            If an update is malformed or a coefficient is out of range.
        """
        if not updates:
            raise AggregationError("no updates to aggregate")
        parsed = [_parse(blob, self._preset, self._format) for blob in updates]
        first = parsed[0].common
        framing.check_updates([m.common for m in parsed], self._fingerprint)
        k_total = sum(m.common.num_updates for m in parsed)
        if k_total > self._preset.max_hospitals:
            raise AggregationError(
                f"{k_total} updates exceed the {self._preset.name!r} preset's limit of "
                f"{self._preset.max_hospitals} hospitals per aggregate (carry headroom)"
            )
        c0, seeds = framing.add_ciphertexts(
            [(m.c0, m.seeds, m.common) for m in parsed], self._format
        )
        common = framing.Common(
            fingerprint=self._fingerprint,
            run=first.run,
            round=first.round,
            size=first.size,
            num_examples=sum(m.common.num_examples for m in parsed),
            num_updates=k_total,
            ciphertexts=first.ciphertexts,
            hospital=None,
        )
        return _write(preset=self._preset, common=common, c0=c0, seeds=seeds)
