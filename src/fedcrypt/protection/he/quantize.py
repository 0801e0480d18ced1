"""Stochastic-rounding quantization and carry-safe packing of several integers per slot.

A hospital's weighted update ``y = n_i x`` (float64, shape ``(P,)``) becomes integers
``v = SR(y / δ)`` on a power-of-two grid ``δ = 2**e`` shared by every hospital of the
round, and ``F`` signed integers are packed into one plaintext slot as the signed
integer::

    S = sum_f v_f * 2**(f w)

Slots add as integers, so the server's sum is ``Σ_f V_f 2**(f w)`` with ``V_f`` the
field-wise sums. As long as every ``|V_f| <= 2**(w-1) - 1`` the fields are recovered
exactly as balanced base-``2**w`` digits, and ``|S| < 2**(F w - 1) (1 + 2**-w) < t/2``
keeps the slot inside the plaintext modulus (``F w <= bits(t) - 1``). The caller
guarantees the field bound by choosing ``δ`` (see :func:`calibrate`). Stochastic rounding
(``SR(a) = floor(a) + Bernoulli(a - floor(a))``) is unbiased: the error of the mean has
zero expectation and is below ``K δ / Σ n_i`` in absolute value.

Random bits for rounding come from NumPy's PCG64 generator seeded with 128 bits from
:mod:`secrets` per call: rounding noise needs statistical quality, not secrecy (the
rounded values are encrypted).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: Values per block sharing one quantization step in calibrated mode.
BLOCK = 64
#: Exponents are stored as int8.
_EXP_MIN, _EXP_MAX = -126, 126


def new_rng() -> np.random.Generator:
    """A PCG64 generator seeded with 128 bits from :mod:`secrets` (for rounding noise)."""
    return np.random.default_rng(secrets.randbits(128))


def ceil_log2(x: NDArray[np.float64]) -> NDArray[np.int64]:
    """Exact ``ceil(log2(x))`` for positive finite ``x`` (via ``frexp``, no rounding)."""
    mant, exp = np.frexp(x)
    return (exp - (mant == 0.5)).astype(np.int64)


def stochastic_round(a: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.int64]:
    """Unbiased stochastic rounding: ``floor(a) + (U < a - floor(a))``, ``U ~ U[0, 1)``.

    Parameters
    ----------
    a : numpy.ndarray
        float64 values, any shape, ``|a| < 2**52``.
    rng : numpy.random.Generator
        Source of the uniform draws.

    Returns
    -------
    numpy.ndarray
        int64, same shape; ``E[SR(a)] = a`` and ``|SR(a) - a| < 1``.
    """
    fl = np.floor(a)
    up = rng.random(a.shape) < (a - fl)
    return fl.astype(np.int64) + up


@dataclass(frozen=True)
class FieldPacking:
    """How ``fields`` signed integers share one plaintext slot without carries.

    Attributes
    ----------
    fields : int
        ``F``, integers per slot.
    field_bits : int
        ``w``, bits per field; ``F * w`` must be below the plaintext modulus' bit size.
    """

    fields: int
    field_bits: int

    def __post_init__(self) -> None:
        if self.fields < 1 or self.field_bits < 4 or self.fields * self.field_bits > 62:
            raise ValueError(f"invalid field packing {self.fields} x {self.field_bits} bits")

    @property
    def bound(self) -> int:
        """Largest ``|V_f|`` a field sum may reach, ``2**(w-1) - 1``."""
        return (1 << (self.field_bits - 1)) - 1

    def pack(self, ints: NDArray[np.int64], slots: int) -> NDArray[np.int64]:
        """Pack quantized integers into signed slots.

        Parameters
        ----------
        ints : numpy.ndarray
            int64, shape ``(P,)``, each ``|v| <= bound``.
        slots : int
            Slots per ciphertext ``S``.

        Returns
        -------
        numpy.ndarray
            int64, shape ``(C, S)`` with ``C = ceil(P / (F S))``; value ``p`` lives in
            ciphertext ``p // (F S)``, field ``(p % (F S)) // S``, slot ``p % S``.
            Padding values are 0.
        """
        per_ct = self.fields * slots
        chunks = -(-ints.size // per_ct)
        padded = np.zeros(chunks * per_ct, dtype=np.int64)
        padded[: ints.size] = ints
        grid = padded.reshape(chunks, self.fields, slots)
        out = grid[:, 0, :].copy()
        for f in range(1, self.fields):
            out += grid[:, f, :] * (1 << (f * self.field_bits))
        return out

    def unpack(self, packed: NDArray[np.int64], *, size: int) -> NDArray[np.int64]:
        """Inverse of :meth:`pack` for a sum of packed vectors (balanced digits).

        Parameters
        ----------
        packed : numpy.ndarray
            int64, shape ``(C, S)``, signed slot sums.
        size : int
            ``P``, values to return.

        Returns
        -------
        numpy.ndarray
            int64, shape ``(P,)``, the summed integers.

        Raises
        ------
        ValueError
            If a field sum lies outside ``[-bound, bound]`` (an overflow, corrupted data
            or a wrong key).
        """
        w = self.field_bits
        half = 1 << (w - 1)
        mask = (1 << w) - 1
        rest = packed.copy()
        fields = []
        for _ in range(self.fields - 1):
            digit = ((rest + half) & mask) - half
            fields.append(digit)
            rest = (rest - digit) >> w
        fields.append(rest)
        grid = np.stack(fields, axis=1)  # (C, F, S)
        if grid.size and int(np.abs(grid).max()) > self.bound:
            raise ValueError("packed field outside its range")
        return grid.reshape(-1)[:size]


@dataclass(frozen=True)
class StepTable:
    """Quantization steps ``δ = 2**exponent`` shared by every hospital of a round.

    Attributes
    ----------
    exponents : numpy.ndarray or None
        int8, shape ``(ceil(P / BLOCK),)``, one exponent per block of ``BLOCK`` values;
        ``None`` for the uniform (calibration) grid.
    uniform_exponent : int
        The exponent of every value when ``exponents`` is ``None``.
    """

    exponents: NDArray[np.int8] | None
    uniform_exponent: int = 0

    def per_value(self, size: int) -> NDArray[np.int64] | int:
        """Exponent of each of ``size`` values (an int if uniform)."""
        if self.exponents is None:
            return self.uniform_exponent
        return np.repeat(self.exponents.astype(np.int64), BLOCK)[:size]

    def to_bytes(self) -> bytes:
        """The block exponents (int8); empty for the uniform grid."""
        return b"" if self.exponents is None else self.exponents.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, size: int) -> StepTable:
        """Inverse of :meth:`to_bytes` for ``size`` values.

        Raises
        ------
        ValueError
            If ``data`` does not hold one exponent per block.
        """
        blocks = -(-size // BLOCK)
        if len(data) != blocks:
            raise ValueError(f"step table has {len(data)} entries, expected {blocks}")
        return cls(np.frombuffer(data, dtype=np.int8).copy())


def uniform_steps(frac_bits: int) -> StepTable:
    """The calibration grid ``δ = 2**-frac_bits`` for every value (no reference yet)."""
    return StepTable(None, -int(frac_bits))


@dataclass(frozen=True)
class Calibration:
    """A round's shared quantization grid and the clipping it implies.

    Attributes
    ----------
    steps : StepTable
        ``δ_b = 2**e_b`` per block.
    clip_per_example : float
        ``|y / δ|`` is clipped at ``n_i * clip_per_example`` (``= X_b / δ_b``, the same
        for every block).
    max_examples : int
        Largest ``Σ n_i`` the round may reach without overflowing a field.
    """

    steps: StepTable
    clip_per_example: float
    max_examples: int


def calibrate(
    reference: NDArray[np.float64],
    *,
    reference_examples: int,
    packing: FieldPacking,
    margin_bits: int,
    growth_bits: int,
    max_hospitals: int,
    floor_bits: int = 20,
) -> Calibration:
    """Per-block steps derived from the round's global model (known to every hospital).

    For block ``b`` (``BLOCK`` values) with ``m_b = max |g|`` (floored at
    ``2**-floor_bits · max |g|``), values are clipped to ``X_b = 2**(ceil(log2 m_b) +
    margin_bits)`` and the step is ``δ_b = X_b 2**shift`` with the smallest ``shift``
    such that ``2**growth_bits · M · 2**-shift + K_max <= bound``, ``M`` the reference
    aggregate's example count. A round whose hospitals hold ``Σ n_i <= 2**growth_bits M``
    examples then has field sums ``|Σ_i v_i| <= Σ n_i X_b / δ_b + K <= bound``. All
    arithmetic is on powers of two, so every hospital derives the same table from the
    same reference.

    Parameters
    ----------
    reference : numpy.ndarray
        float64, shape ``(P,)``: the decrypted global model the round started from.
    reference_examples : int
        ``M``: the example count of that aggregate (``Σ n_i`` of the previous round).
    packing : FieldPacking
        Gives ``bound``.
    margin_bits : int
        Growth of a block's magnitude allowed before clipping.
    growth_bits : int
        Growth of the round's total example count allowed over ``M``.
    max_hospitals : int
        ``K_max``: room for one rounding step per hospital.
    floor_bits : int
        Blocks far below the model's largest value use ``2**-floor_bits · max |g|``.

    Raises
    ------
    ValueError
        If the field is too narrow for ``max_hospitals`` rounding steps.
    """
    room = packing.bound - max_hospitals
    if room < 1:
        raise ValueError(
            f"{packing.field_bits}-bit fields leave no room for {max_hospitals} hospitals"
        )
    g = np.abs(np.asarray(reference, dtype=np.float64))
    blocks = -(-g.size // BLOCK)
    padded = np.zeros(blocks * BLOCK)
    padded[: g.size] = g
    bmax = padded.reshape(blocks, BLOCK).max(axis=1)
    gmax = float(bmax.max()) if blocks else 0.0
    floor = math.ldexp(gmax, -floor_bits) if gmax > 0 else 1.0
    bmax = np.maximum(bmax, floor)
    m = max(1, int(reference_examples))
    cap = m << growth_bits
    shift = 0  # smallest shift with cap * 2^-shift <= room (exact: powers of two)
    while math.ldexp(cap, -shift) > room:
        shift += 1
    while shift > -64 and math.ldexp(cap, -(shift - 1)) <= room:
        shift -= 1
    # a larger step is always safe (smaller integers); a too large magnitude is not
    exps = np.maximum(ceil_log2(bmax) + margin_bits + shift, _EXP_MIN)
    if int(exps.max(initial=0)) > _EXP_MAX:
        raise ValueError("global model magnitudes are outside the representable range")
    return Calibration(StepTable(exps.astype(np.int8)), math.ldexp(1.0, -shift), cap)


@dataclass(frozen=True)
class Quantized:
    """A hospital's quantized, weighted update.

    Attributes
    ----------
    ints : numpy.ndarray
        int64, shape ``(P,)``, ``|v| <= limit``.
    clipped : int
        How many values had to be clipped to fit.
    """

    ints: NDArray[np.int64]
    clipped: int


def quantize(
    weighted: NDArray[np.float64],
    steps: StepTable,
    *,
    clip: float,
    rng: np.random.Generator,
) -> Quantized:
    """Quantize ``weighted`` (``n_i x``, float64 ``(P,)``) on ``steps`` with SR.

    Values with ``|y / δ| > clip`` are clipped to ``±clip`` first, so ``|SR| <= clip + 1``.
    """
    exps = steps.per_value(weighted.size)
    a = np.ldexp(weighted, np.negative(exps))
    over = np.abs(a) > clip
    clipped = int(np.count_nonzero(over))
    if clipped:
        np.clip(a, -clip, clip, out=a)
    return Quantized(stochastic_round(a, rng), clipped)


def dequantize(ints: NDArray[np.int64], steps: StepTable) -> NDArray[np.float64]:
    """``ints * 2**exponent`` as float64 (exact for ``|ints| < 2**53``)."""
    exps = steps.per_value(ints.size)
    return np.ldexp(ints.astype(np.float64), exps)
