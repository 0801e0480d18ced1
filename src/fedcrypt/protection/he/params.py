"""Named HE parameter sets (float CKKS and quantized, packed BFV), each checked against
the HomomorphicEncryption.org 128-bit security table."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fedcrypt.exceptions import ConfigError, InsecureParametersError
from fedcrypt.protection.he.quantize import FieldPacking

#: Largest total coefficient-modulus size (bits) for 128-bit classical security with a
#: ternary secret, per ring dimension ``N``. Source: HomomorphicEncryption.org security
#: standard, Albrecht et al., "Homomorphic Encryption Security Standard" (2018), Table 1
#: (also SEAL's ``CoeffModulus::MaxBitCount(N, sec_level_type::tc128)``).
HE_STANDARD_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: SEAL accepts primes of at most 60 bits (``SEAL_USER_MOD_BIT_COUNT_MAX``).
MAX_PRIME_BITS = 60
#: SEAL needs primes of at least 2 bits; NTT-friendly primes need more (``q = 1 mod 2N``).
MIN_PRIME_BITS = 17

#: The protection mode these parameter sets serve (``--protection he``).
MODE = "he"
#: The scheme tag written in protected messages and key files (CKKS and BFV alike).
WIRE_SCHEME = "he"
#: The tag written before the mode's rename from ``ckks`` to ``he`` (it named BFV messages
#: too): key files and messages carrying it are still read.
LEGACY_WIRE_SCHEMES: tuple[str, ...] = ("ckks",)
#: Every tag a reader accepts.
READ_SCHEMES: tuple[str, ...] = (WIRE_SCHEME, *LEGACY_WIRE_SCHEMES)

#: Hospitals per round a preset accepts by default (sets the carry headroom, bits).
DEFAULT_MAX_HOSPITALS = 64

#: Float CKKS encoding (TenSEAL ``ckks_vector``, ``N/2`` values per ciphertext).
ENCODING_CKKS = "ckks-float"
#: Quantized values packed several per BFV slot (SEAL batching, ``F N`` per ciphertext).
ENCODING_BFV = "bfv-packed"
ENCODINGS = (ENCODING_CKKS, ENCODING_BFV)


def check_security(poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int]) -> None:
    """Refuse parameters below 128-bit classical security.

    Parameters
    ----------
    poly_modulus_degree : int
        Ring dimension ``N`` (a power of two, 1024 to 32768).
    coeff_mod_bit_sizes : sequence of int
        Bit sizes of the coefficient-modulus primes (each 17 to 60 bits).

    Raises
    ------
    InsecureParametersError
        If ``N`` is not in the HomomorphicEncryption.org table or ``sum(bits)`` exceeds
        its 128-bit bound (Albrecht et al. 2018, Table 1: 1024→27, 2048→54, 4096→109,
        8192→218, 16384→438, 32768→881 bits).
    ConfigError
        If a prime size is outside what SEAL accepts.
    """
    n = int(poly_modulus_degree)
    if n not in HE_STANDARD_128:
        raise InsecureParametersError(
            f"poly_modulus_degree {n} is not in the HomomorphicEncryption.org 128-bit table "
            f"(allowed: {', '.join(str(k) for k in HE_STANDARD_128)})"
        )
    bits = [int(b) for b in coeff_mod_bit_sizes]
    if not bits:
        raise ConfigError("coeff_mod_bit_sizes must name at least one prime")
    for b in bits:
        if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS:
            raise ConfigError(
                f"coefficient prime of {b} bits is outside SEAL's range "
                f"[{MIN_PRIME_BITS}, {MAX_PRIME_BITS}]"
            )
    total = sum(bits)
    limit = HE_STANDARD_128[n]
    if total > limit:
        raise InsecureParametersError(
            f"coefficient modulus of {total} bits with N={n} is below 128-bit security: the "
            f"HomomorphicEncryption.org standard (Albrecht et al. 2018) allows at most "
            f"{limit} bits for N={n}"
        )


@dataclass(frozen=True)
class HEPreset:
    """A named homomorphic-encryption parameter set for depth-0 (add-only) aggregation.

    It describes both float CKKS (``encoding="ckks-float"``) and quantized, packed BFV
    (``encoding="bfv-packed"``) parameter sets.

    Attributes
    ----------
    name : str
        Identifier used by ``--he-preset``.
    poly_modulus_degree : int
        Ring dimension ``N``; one ciphertext packs ``N/2`` slots.
    coeff_mod_bit_sizes : tuple of int
        Prime sizes in bits. With more than one prime the last is SEAL's special prime
        (key switching only); fresh ciphertexts carry the others ("data primes").
    scale_bits : int
        ``log2`` of the scale Δ: a value ``x`` is encoded as ``round(x * 2**scale_bits)``
        (CKKS; for BFV presets, the fixed-point grid of the calibration round).
    description : str
        One line: where the parameters come from.
    max_hospitals : int
        Most updates one aggregate may contain (carry headroom; BFV noise budget;
        default 64).
    encoding : str
        ``"ckks-float"`` (TenSEAL CKKS vectors) or ``"bfv-packed"`` (quantized values
        packed several per BFV slot; :mod:`fedcrypt.protection.he.bfv`).
    plain_modulus_bits : int
        BFV: bits of the batching-friendly prime plaintext modulus ``t``.
    fields_per_slot : int
        BFV: ``F``, quantized values per slot (fields of ``floor((bits(t)-1)/F)`` bits).
    margin_bits : int
        BFV: growth of a block's magnitude over the global model before clipping.
    growth_bits : int
        BFV: growth of a round's total example count over the previous round's.

    Raises
    ------
    InsecureParametersError
        On construction, if the parameters fail :func:`check_security`.
    ConfigError
        If the scale leaves no room for values (``scale_bits`` ≥ data-modulus bits − 2).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    description: str
    max_hospitals: int = DEFAULT_MAX_HOSPITALS
    encoding: str = ENCODING_CKKS
    plain_modulus_bits: int = 0
    fields_per_slot: int = 1
    margin_bits: int = 1
    growth_bits: int = 1

    def __post_init__(self) -> None:
        check_security(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        if self.encoding not in ENCODINGS:
            raise ConfigError(
                f"unknown encoding {self.encoding!r}; expected one of {', '.join(ENCODINGS)}"
            )
        if self.max_hospitals < 1:
            raise ConfigError(f"max_hospitals must be >= 1, got {self.max_hospitals}")
        if not 1 <= self.scale_bits:
            raise ConfigError(f"scale_bits must be >= 1, got {self.scale_bits}")
        if self.encoding == ENCODING_BFV:
            self._check_bfv()
        elif self.capacity_bits < 1:
            raise ConfigError(
                f"preset {self.name!r}: scale 2^{self.scale_bits} leaves no room for values "
                f"in a {self.data_modulus_bits}-bit data modulus"
            )

    def _check_bfv(self) -> None:
        if not 17 <= self.plain_modulus_bits <= MAX_PRIME_BITS:
            raise ConfigError(
                f"plain_modulus_bits must be in [17, 60] for BFV, got {self.plain_modulus_bits}"
            )
        if self.plain_modulus_bits >= min(self.data_primes):
            raise ConfigError("the plaintext modulus must be smaller than the data prime")
        if self.fields_per_slot < 1 or self.margin_bits < 0 or self.growth_bits < 0:
            raise ConfigError("fields_per_slot must be >= 1, margin_bits and growth_bits >= 0")
        try:
            packing = self.packing()
            self.calibration_packing()
        except ValueError as exc:
            raise ConfigError(f"preset {self.name!r}: {exc}") from exc
        if packing.bound - self.max_hospitals < 1 << (self.growth_bits + 8):
            raise ConfigError(
                f"preset {self.name!r}: {packing.field_bits}-bit fields leave fewer than 8 "
                f"bits of precision with {self.max_hospitals} hospitals"
            )
        if self.calibration_limit < 2 ** (self.scale_bits + 1):
            raise ConfigError(
                f"preset {self.name!r}: 2^-{self.scale_bits} calibration steps leave no "
                "integer range"
            )

    @property
    def is_packed(self) -> bool:
        """Whether this preset quantizes and packs (BFV) rather than encoding floats (CKKS)."""
        return self.encoding == ENCODING_BFV

    @property
    def slots(self) -> int:
        """Slots per ciphertext: ``N/2`` for CKKS, ``N`` for BFV batching."""
        if self.is_packed:
            return self.poly_modulus_degree
        return self.poly_modulus_degree // 2

    def packing(self) -> FieldPacking:
        """Field layout of calibrated rounds (BFV presets): ``F`` fields of ``w`` bits.

        ``w = floor((log2 t - 1) / F)`` with ``t`` a ``plain_modulus_bits``-bit prime, so
        a packed slot stays below ``2**(F w) <= 2**(bits(t) - 1) < t``.
        """
        w = (self.plain_modulus_bits - 1) // self.fields_per_slot
        return FieldPacking(self.fields_per_slot, w)

    def calibration_packing(self) -> FieldPacking:
        """Field layout of the calibration round (no global model yet): one wide field."""
        return FieldPacking(1, self.plain_modulus_bits - 1)

    @property
    def calibration_limit(self) -> int:
        """Largest ``|v|`` one hospital may send in the calibration round.

        ``floor(bound / K_max) - 1``, so that ``K_max`` updates sum within the field.
        """
        return self.calibration_packing().bound // self.max_hospitals - 1

    @property
    def data_primes(self) -> tuple[int, ...]:
        """Bit sizes of the primes a fresh ciphertext carries (all but the special prime)."""
        bits = self.coeff_mod_bit_sizes
        return bits[:-1] if len(bits) > 1 else bits

    @property
    def data_modulus_bits(self) -> int:
        """``sum`` of the data primes' sizes, bits."""
        return sum(self.data_primes)

    @property
    def capacity_bits(self) -> int:
        """``log2`` of the largest ``|sum|`` (value units) an aggregate slot holds safely.

        The data modulus ``Q`` is a product of primes of exactly ``b_j`` bits, so
        ``Q >= 2**(sum(b_j) - L)``; decryption is centred (``|x Δ| < Q/2``) and we keep one
        more bit for noise: ``capacity = sum(b_j) - L - 2 - scale_bits``.
        """
        return self.data_modulus_bits - len(self.data_primes) - 2 - self.scale_bits

    @property
    def max_weighted_abs(self) -> float:
        """Largest ``num_examples * |value|`` one hospital may send in float/calibration mode.

        CKKS: ``2**capacity_bits / max_hospitals``, so that the sum over
        ``max_hospitals`` updates cannot wrap around the modulus. BFV calibration round:
        ``(2**s - 2) * 2**-scale_bits`` with ``s`` the wide field's per-hospital share.
        """
        if self.is_packed:
            return math.ldexp(self.calibration_limit - 1, -self.scale_bits)
        return math.ldexp(1.0, self.capacity_bits) / self.max_hospitals

    def to_dict(self) -> dict[str, object]:
        """JSON-compatible form (stored in key files)."""
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "description": self.description,
            "max_hospitals": self.max_hospitals,
            "encoding": self.encoding,
            "plain_modulus_bits": self.plain_modulus_bits,
            "fields_per_slot": self.fields_per_slot,
            "margin_bits": self.margin_bits,
            "growth_bits": self.growth_bits,
        }

    @classmethod
    def from_dict(cls, data: object) -> HEPreset:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ConfigError
            If ``data`` is not a valid preset description (or is insecure).
        """
        if not isinstance(data, dict):
            raise ConfigError("preset description must be a JSON object")
        try:
            bits = data["coeff_mod_bit_sizes"]
            if not isinstance(bits, list) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in bits
            ):
                raise ConfigError("preset coeff_mod_bit_sizes must be a list of ints")
            fields = {
                k: data[k]
                for k in (
                    "poly_modulus_degree",
                    "scale_bits",
                    "max_hospitals",
                    "plain_modulus_bits",
                    "fields_per_slot",
                    "margin_bits",
                    "growth_bits",
                )
                if k in data
            }
            for k, v in fields.items():
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"preset field {k!r} must be an int")
            return cls(
                name=str(data["name"]),
                poly_modulus_degree=int(data["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(bits),
                scale_bits=int(data["scale_bits"]),
                description=str(data.get("description", "")),
                max_hospitals=int(data.get("max_hospitals", DEFAULT_MAX_HOSPITALS)),
                encoding=str(data.get("encoding", ENCODING_CKKS)),
                plain_modulus_bits=int(data.get("plain_modulus_bits", 0)),
                fields_per_slot=int(data.get("fields_per_slot", 1)),
                margin_bits=int(data.get("margin_bits", 1)),
                growth_bits=int(data.get("growth_bits", 1)),
            )
        except KeyError as exc:
            raise ConfigError(f"preset description lacks field {exc.args[0]!r}") from exc


PRESETS: dict[str, HEPreset] = {
    p.name: p
    for p in (
        HEPreset(
            name="packed",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60, 49),
            scale_bits=12,
            plain_modulus_bits=45,
            fields_per_slot=2,
            encoding=ENCODING_BFV,
            description=(
                "BFV batching (SEAL), 45-bit plaintext prime, 2 x 22-bit quantized values "
                "per slot, steps calibrated on the global model"
            ),
        ),
        HEPreset(
            name="compact",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60, 49),
            scale_bits=12,
            plain_modulus_bits=45,
            fields_per_slot=3,
            encoding=ENCODING_BFV,
            description=(
                "as 'packed' with 3 x 14-bit values per slot: a third smaller, about 8 bits coarser"
            ),
        ),
        HEPreset(
            name="fast",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60, 49),
            scale_bits=26,
            description="float CKKS (TenSEAL), N=4096, one 60-bit data prime, scale 2^26",
        ),
        HEPreset(
            name="paper-heavy",
            poly_modulus_degree=32768,
            coeff_mod_bit_sizes=(60, *([40] * 8), 60),
            scale_bits=40,
            description="Lessage et al.'s heavy key: N=32768, [60]+[40]*8+[60], scale 2^40",
        ),
        HEPreset(
            name="paper-light",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(40, 21, 21, 21, 21, 21, 21, 40),
            scale_bits=21,
            description=(
                "light key in the paper's style (stand-in: TenSEAL tutorial set "
                "[40,21*6,40]), scale 2^21"
            ),
        ),
        HEPreset(
            name="nvflare",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 40, 40),
            scale_bits=40,
            description=(
                "NVIDIA FLARE HEBuilder defaults: N=8192, [60,40,40], scale 2^40, symmetric"
            ),
        ),
    )
}

DEFAULT_PRESET = "packed"

_CUSTOM = re.compile(r"^custom:(\d+):(\d+(?:,\d+)*):(\d+)$")


def get_preset(name: str) -> HEPreset:
    """Look up a preset by name, or build a custom one.

    Parameters
    ----------
    name : str
        A key of :data:`PRESETS`, or ``custom:N:b1,b2,...:scale_bits`` (for example
        ``custom:8192:60,40,40:40``).

    Raises
    ------
    ConfigError
        If the name is unknown (the message lists the valid names).
    InsecureParametersError
        If a custom parameter set fails the 128-bit security table.
    """
    if name in PRESETS:
        return PRESETS[name]
    m = _CUSTOM.match(name.strip())
    if m is None:
        raise ConfigError(
            f"unknown HE preset {name!r}; valid presets: {', '.join(sorted(PRESETS))} "
            "(or custom:N:b1,b2,...:scale_bits)"
        )
    return HEPreset(
        name=name.strip(),
        poly_modulus_degree=int(m.group(1)),
        coeff_mod_bit_sizes=tuple(int(b) for b in m.group(2).split(",")),
        scale_bits=int(m.group(3)),
        description="custom parameter set from the command line",
    )
