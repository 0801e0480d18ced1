"""Stochastic-rounding quantization on per-tensor blocks, and carry-safe packing of several
integers per slot.

**Plan** (:class:`QuantPlan`, from the model's :class:`~fedcrypt.protection.flatten.Layout`).
Each tensor is a segment of the flat update. Floating tensors are cut into blocks of
:data:`BLOCK` values *within the tensor*, so that no quantization step is shared by two
tensors (a block once held BatchNorm running variances of at most 0.04 next to the
``num_batches_tracked`` counter, 330, and the counter's step erased the variances).
Integer tensors (``num_batches_tracked``) are not quantized: they travel exactly, as whole
integers in their own slots. ``running_var`` segments are marked so that decoding can
guarantee a non-negative variance (with stochastic rounding of non-negative numbers every
hospital's integers are already non-negative; see :func:`stochastic_round`).

**Quantization.** A hospital's weighted update ``y = n_i x`` (float64) becomes integers
``v = SR(y / δ)`` on a power-of-two grid ``δ_b = 2**e_b`` per block, shared by every
hospital of the round, and ``F`` signed integers are packed into one plaintext slot as
``S = Σ_f v_f 2**(f w)``. Slots add as integers; while every field sum ``|V_f| <=
2**(w-1) - 1`` the fields come back exactly as balanced base-``2**w`` digits, and
``|S| < 2**(F w - 1) (1 + 2**-w) < t/2`` keeps the slot inside the plaintext modulus
(``F w <= bits(t) - 1``). :func:`calibrate` chooses ``δ`` so the bound holds. Stochastic
rounding (``SR(a) = floor(a) + Bernoulli(a - floor(a))``) is unbiased: the error of the
mean has zero expectation and is below ``K δ / Σ n_i``.

Random bits for rounding come from a NumPy PCG64 generator the caller provides (seeded
reproducibly from the secret key, run, round and hospital, or fresh:
:meth:`fedcrypt.protection.he.integrity.RoundState.rng`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # flatten imports torch; quantization itself needs only the layout
    from fedcrypt.protection.flatten import Layout

#: Values per block sharing one quantization step in calibrated mode (within a tensor).
BLOCK = 64

#: Segment kinds of a :class:`QuantPlan`.
SEG_FLOAT, SEG_VAR, SEG_INT = 0, 1, 2
_PLAN_MAGIC = b"FQP2"


def ceil_log2(x: NDArray[np.float64]) -> NDArray[np.int64]:
    """Exact ``ceil(log2(x))`` for positive finite ``x`` (via ``frexp``, no rounding)."""
    mant, exp = np.frexp(x)
    return (exp - (mant == 0.5)).astype(np.int64)


def stochastic_round(a: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.int64]:
    """Unbiased stochastic rounding: ``floor(a) + (U < a - floor(a))``, ``U ~ U[0, 1)``.

    Computed as ``floor(a + U)``. ``U`` is a float32 uniform (24 random bits): the
    rounding probability is off by less than ``2**-24``, a bias far below the step.

    Parameters
    ----------
    a : numpy.ndarray
        float64 values, any shape, ``|a| < 2**52``.
    rng : numpy.random.Generator
        Source of the uniform draws.

    Returns
    -------
    numpy.ndarray
        int64, same shape; ``E[SR(a)] = a``, ``|SR(a) - a| < 1``, and ``SR(a) >= 0``
        wherever ``a >= 0`` (``floor`` of a non-negative number is non-negative).
    """
    return _round_in_place(np.array(a, dtype=np.float64), rng)


def _round_in_place(a: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.int64]:
    """:func:`stochastic_round` overwriting ``a``: ``floor(a + U)`` is ``floor(a) + 1``
    with probability ``a - floor(a)``."""
    a += rng.random(a.shape, dtype=np.float32)
    np.floor(a, out=a)
    return a.astype(np.int64)


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

    def slots_for(self, values: int) -> int:
        """Slots that hold ``values`` integers, ``ceil(values / F)``."""
        return -(-values // self.fields)

    def pack(self, ints: NDArray[np.int64]) -> NDArray[np.int64]:
        """Pack quantized integers into signed slots.

        Value ``p`` lives in slot ``p % D``, field ``p // D``, with ``D =
        slots_for(len(ints))`` (padding values are 0).

        Parameters
        ----------
        ints : numpy.ndarray
            int64, shape ``(P,)``, each ``|v| <= bound``.

        Returns
        -------
        numpy.ndarray
            int64, shape ``(D,)``.
        """
        d = self.slots_for(ints.size)
        padded = np.zeros(self.fields * d, dtype=np.int64)
        padded[: ints.size] = ints
        grid = padded.reshape(self.fields, d)
        out = grid[0].copy()
        for f in range(1, self.fields):
            out += grid[f] * (1 << (f * self.field_bits))
        return out

    def unpack(self, packed: NDArray[np.int64], *, size: int) -> NDArray[np.int64]:
        """Inverse of :meth:`pack` for a sum of packed vectors (balanced digits).

        Parameters
        ----------
        packed : numpy.ndarray
            int64, shape ``(D,)``, signed slot sums.
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
        grid = np.stack(fields)  # (F, D)
        if grid.size and int(np.abs(grid).max()) > self.bound:
            raise ValueError("packed field outside its range")
        return grid.reshape(-1)[:size]


@dataclass(frozen=True)
class QuantPlan:
    """Which values are quantized on which blocks, and which travel exactly.

    Attributes
    ----------
    kinds : tuple of int
        Per segment (tensor, in ``state_dict`` order): :data:`SEG_FLOAT`,
        :data:`SEG_VAR` (a ``running_var``: never negative) or :data:`SEG_INT` (exact).
    lengths : tuple of int
        Values per segment.
    """

    kinds: tuple[int, ...]
    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.kinds) != len(self.lengths) or not self.kinds:
            raise ValueError("a plan needs one kind per segment and at least one segment")
        if any(k not in (SEG_FLOAT, SEG_VAR, SEG_INT) for k in self.kinds):
            raise ValueError("unknown segment kind")
        if any(n < 1 for n in self.lengths):
            raise ValueError("segments must hold at least one value")

    @classmethod
    def of(cls, layout: Layout) -> QuantPlan:
        """The plan of a model layout (every tensor a segment)."""
        kinds = []
        for spec in layout.tensors:
            kind = spec.kind
            kinds.append(
                SEG_INT if kind == "integer" else SEG_VAR if kind == "bn_var" else SEG_FLOAT
            )
        return cls(tuple(kinds), tuple(s.numel for s in layout.tensors))

    @classmethod
    def flat(cls, size: int) -> QuantPlan:
        """One floating segment of ``size`` values (an update without a model layout)."""
        return cls((SEG_FLOAT,), (int(size),))

    @property
    def size(self) -> int:
        """``P``, values of the whole update."""
        return sum(self.lengths)

    def to_bytes(self) -> bytes:
        """``b"FQP2" | u32 count | (u8 kind, u32 length) * count``."""
        body = b"".join(
            struct.pack(">BI", k, n) for k, n in zip(self.kinds, self.lengths, strict=True)
        )
        return _PLAN_MAGIC + struct.pack(">I", len(self.kinds)) + body

    @classmethod
    def from_bytes(cls, data: bytes, *, size: int) -> tuple[QuantPlan, bytes]:
        """Parse a plan from the start of ``data``; return it and the bytes after it.

        Raises
        ------
        ValueError
            If the bytes are not a plan or do not describe ``size`` values.
        """
        if len(data) < 8 or data[:4] != _PLAN_MAGIC:
            raise ValueError("not a quantization plan")
        (count,) = struct.unpack_from(">I", data, 4)
        end = 8 + 5 * count
        if count < 1 or len(data) < end:
            raise ValueError("truncated quantization plan")
        pairs = [struct.unpack_from(">BI", data, 8 + 5 * i) for i in range(count)]
        plan = cls(tuple(k for k, _ in pairs), tuple(n for _, n in pairs))
        if plan.size != size:
            raise ValueError(f"the plan describes {plan.size} values, the message {size}")
        return plan, data[end:]

    @cached_property
    def _masks(self) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]]:
        kinds = np.repeat(np.asarray(self.kinds, dtype=np.int8), self.lengths)
        return (
            np.flatnonzero(kinds != SEG_INT),
            np.flatnonzero(kinds == SEG_INT),
            np.flatnonzero(kinds == SEG_VAR),
        )

    @property
    def quantized_index(self) -> NDArray[np.intp]:
        """Positions (in the update) of the quantized values, ascending."""
        return self._masks[0]

    @property
    def exact_index(self) -> NDArray[np.intp]:
        """Positions of the integer values that travel exactly, ascending."""
        return self._masks[1]

    @property
    def variance_index(self) -> NDArray[np.intp]:
        """Positions of ``running_var`` values (decoded values are clamped at 0)."""
        return self._masks[2]

    @cached_property
    def block_lengths(self) -> NDArray[np.int64]:
        """Lengths of the blocks of the quantized values, in order (each ``<= BLOCK``).

        Every quantized segment is cut into ``ceil(n / BLOCK)`` blocks of its own.
        """
        out: list[int] = []
        for k, n in zip(self.kinds, self.lengths, strict=True):
            if k != SEG_INT:
                full, rest = divmod(n, BLOCK)
                out.extend([BLOCK] * full + ([rest] if rest else []))
        return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class StepTable:
    """Quantization steps ``δ`` shared by every hospital of a round.

    Attributes
    ----------
    steps : numpy.ndarray or None
        float64 (float32-representable, positive), one step per block of the plan's
        quantized values; ``None`` for the uniform (calibration) grid.
    uniform_exponent : int
        ``δ = 2**uniform_exponent`` for every value when ``steps`` is ``None``.
    block_lengths : numpy.ndarray or None
        The plan's block lengths (with ``steps``).
    """

    steps: NDArray[np.float64] | None
    uniform_exponent: int = 0
    block_lengths: NDArray[np.int64] | None = None

    def per_value(self, size: int) -> NDArray[np.float64] | float:
        """Step of each of ``size`` quantized values (a float if uniform)."""
        if self.steps is None:
            return math.ldexp(1.0, self.uniform_exponent)
        assert self.block_lengths is not None
        return np.repeat(self.steps, self.block_lengths)[:size]

    def to_bytes(self) -> bytes:
        """The block steps as little-endian float32; empty for the uniform grid."""
        return b"" if self.steps is None else self.steps.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, plan: QuantPlan) -> StepTable:
        """Inverse of :meth:`to_bytes` for ``plan``'s blocks.

        Raises
        ------
        ValueError
            If ``data`` does not hold one positive finite step per block.
        """
        lengths = plan.block_lengths
        if len(data) != 4 * lengths.size:
            raise ValueError(f"step table has {len(data)} bytes, expected {4 * lengths.size}")
        steps = np.frombuffer(data, dtype="<f4").astype(np.float64)
        if not np.all(np.isfinite(steps) & (steps > 0)):
            raise ValueError("step table holds a step that is not positive and finite")
        return cls(steps, 0, lengths)


def uniform_steps(frac_bits: int) -> StepTable:
    """The calibration grid ``δ = 2**-frac_bits`` for every value (no reference yet)."""
    return StepTable(None, -int(frac_bits))


@dataclass(frozen=True)
class Calibration:
    """A round's shared quantization grid and the clipping it implies.

    Attributes
    ----------
    steps : StepTable
        ``δ_b`` per block.
    clip_per_example : float
        ``|y / δ|`` is clipped at ``n_i * clip_per_example`` (``= room / cap``, the same
        for every block).
    max_examples : int
        Largest ``Σ n_i`` the round may reach without overflowing a field (``cap``).
    """

    steps: StepTable
    clip_per_example: float
    max_examples: int


def _round_up_f32(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """The smallest float32 values ``>= x`` (as float64), elementwise."""
    y = x.astype(np.float32)
    low = y.astype(np.float64) < x
    y[low] = np.nextafter(y[low], np.float32(np.inf))
    return y.astype(np.float64)


def calibrate(
    reference: NDArray[np.float64],
    *,
    block_lengths: NDArray[np.int64],
    reference_examples: int,
    packing: FieldPacking,
    margin_bits: int,
    growth_bits: int,
    max_hospitals: int,
    floor_bits: int = 20,
) -> Calibration:
    """Per-block steps derived from the round's global model (known to every hospital).

    For block ``b`` with ``m_b = max |g|`` (floored at ``2**-floor_bits · max |g|``), the
    values a hospital may send are ``|x| <= X_b = 2**(ceil(log2 m_b) + margin_bits)``
    (between ``2**margin_bits`` and ``2**(margin_bits+1)`` times ``m_b``); with ``cap =
    2**growth_bits · M`` (``M`` the reference aggregate's example count) and ``room =
    bound - K_max``, the step is ``δ_b = X_b · cap / room`` rounded up to a float32, and a
    hospital clips ``|n_i x / δ_b|`` at ``n_i · room / cap``. A round whose hospitals hold
    ``Σ n_i <= cap`` examples then has field sums ``|Σ_i v_i| <= Σ n_i room / cap + K <=
    bound``. Every hospital computes the same IEEE-754 operations on the same reference,
    so all derive the same table.

    Parameters
    ----------
    reference : numpy.ndarray
        float64, shape ``(P_q,)``: the quantized values of the decrypted global model the
        round started from.
    block_lengths : numpy.ndarray
        The plan's blocks over those values (:attr:`QuantPlan.block_lengths`).
    reference_examples : int
        ``M``: the example count of that aggregate (``Σ n_i`` of the previous round).
    packing : FieldPacking
        Gives ``bound``.
    margin_bits : int
        Growth of a block's magnitude allowed before clipping (bits, at least).
    growth_bits : int
        Growth of the round's total example count allowed over ``M``.
    max_hospitals : int
        ``K_max``: room for one rounding step per hospital.
    floor_bits : int
        Blocks far below the model's largest value use ``2**-floor_bits · max |g|``.

    Raises
    ------
    ValueError
        If the field is too narrow for ``max_hospitals`` rounding steps, or the blocks
        do not cover the reference.
    """
    room = packing.bound - max_hospitals
    if room < 1:
        raise ValueError(
            f"{packing.field_bits}-bit fields leave no room for {max_hospitals} hospitals"
        )
    g = np.abs(np.asarray(reference, dtype=np.float64))
    if int(block_lengths.sum()) != g.size:
        raise ValueError("the blocks do not cover the reference")
    if g.size == 0:
        bmax = np.zeros(0)
    else:
        starts = np.concatenate(([0], np.cumsum(block_lengths)[:-1]))
        bmax = np.maximum.reduceat(g, starts)
    gmax = float(bmax.max()) if bmax.size else 0.0
    floor = math.ldexp(gmax, -floor_bits) if gmax > 0 else 1.0
    bmax = np.maximum(bmax, max(floor, 2.0**-100))
    cap = max(1, int(reference_examples)) << growth_bits
    with np.errstate(over="ignore"):
        steps = _round_up_f32(np.ldexp(1.0, ceil_log2(bmax) + margin_bits) * (cap / room))
    if not np.all(np.isfinite(steps)):
        raise ValueError("global model magnitudes are outside the representable range")
    return Calibration(StepTable(steps, 0, block_lengths), room / cap, cap)


@dataclass(frozen=True)
class Quantized:
    """A hospital's quantized, weighted update.

    Attributes
    ----------
    ints : numpy.ndarray
        int64, shape ``(P,)``, ``|v| <= clip + 1``.
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
    a = weighted / steps.per_value(weighted.size)
    clipped = int(np.count_nonzero(np.abs(a) > clip))
    if clipped:
        np.clip(a, -clip, clip, out=a)
    return Quantized(_round_in_place(a, rng), clipped)


def dequantize(ints: NDArray[np.int64], steps: StepTable) -> NDArray[np.float64]:
    """``ints * δ`` as float64 (exact: ``|ints| < 2**29`` times a float32 step)."""
    return ints.astype(np.float64) * steps.per_value(ints.size)
