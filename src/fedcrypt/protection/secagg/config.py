"""Consortium parameters and per-round configuration of ``secagg``, with overflow checks."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from fedcrypt.exceptions import ConfigError

SUPPORTED_BITS = (32, 64)
MAX_HOSPITAL_ID = (1 << 64) - 1


@dataclass(frozen=True)
class SecAggParams:
    """Parameters every hospital of the consortium agrees on (fixed across rounds).

    Quantization (fixed point in Z_(2^k)): hospital ``i`` sends
    ``q_i = round(n_i * clip(x_i, -clip, clip) * scale) mod 2^bits`` for each value, plus
    ``n_i`` in one extra element. The sum over at most ``max_hospitals`` hospitals of at
    most ``max_examples`` examples each cannot wrap when::

        clip * scale * max_hospitals * max_examples + max_hospitals / 2 <= 2^(bits-1) - 1
        max_hospitals * max_examples <= 2^bits - 1

    so the signed reading of the sum mod ``2^bits`` is exact. The mean recovered from
    ``m`` updates of ``N = sum(n_i)`` examples then differs from the FedAvg of the
    *clipped* updates by at most ``m / (2 * scale * N)`` per value (:meth:`error_bound`).

    Parameters
    ----------
    bits : int, optional
        ``k``: bits per value, 32 or 64 (default: 32, i.e. 4 bytes per value, the size of
        float32).
    clip : float, optional
        Every update value is clipped to ``[-clip, clip]`` before weighting (default: 4.0).
        Send parameter *deltas* (local minus global), or raise ``clip``, if values can be
        larger.
    max_hospitals : int, optional
        Most hospitals in one round (default: 50).
    max_examples : int, optional
        Most training examples one hospital may weight its update by (default: 65,536).
        A hospital with more refuses with :class:`~fedcrypt.exceptions.ConfigError`.
    scale : float, optional
        Fixed-point scale. If ``None`` (default), the largest power of two that satisfies
        the bound above.
    neighbours : int, optional
        SecAgg+ (Bell et al., CCS 2020): each hospital masks with and shares its secrets
        among only this many neighbours in a Harary graph over a pseudo-random ordering of
        the round's hospitals (even, >= 2). ``None`` (default): the complete graph
        (Bonawitz et al., CCS 2017).
    group_mask : bool, optional
        Hospitals add a mask derived from the consortium key, so the server's aggregate is
        uniformly random to it (default: True).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If a parameter is out of range or the configuration could overflow.
    """

    bits: int = 32
    clip: float = 4.0
    max_hospitals: int = 50
    max_examples: int = 65_536
    scale: float | None = None
    neighbours: int | None = None
    group_mask: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be a positive finite number, got {self.clip}")
        if self.max_hospitals < 2:
            raise ConfigError(f"max_hospitals must be >= 2, got {self.max_hospitals}")
        if self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {self.max_examples}")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ConfigError(f"neighbours must be even and >= 2, got {self.neighbours}")
        if self.max_hospitals * self.max_examples > (1 << self.bits) - 1:
            raise ConfigError(
                f"max_hospitals * max_examples = {self.max_hospitals * self.max_examples} "
                f"does not fit the example count in {self.bits} bits"
            )
        if self.scale is not None:
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise ConfigError(f"scale must be a positive finite number, got {self.scale}")
            if not self._fits(Fraction(self.scale)):
                raise ConfigError(
                    f"scale {self.scale} can overflow {self.bits}-bit sums: need clip * scale "
                    f"* max_hospitals * max_examples + max_hospitals / 2 <= 2^{self.bits - 1} "
                    f"- 1 (largest safe power of two: {self._largest_scale()})"
                )
        elif self._largest_scale() is None:
            raise ConfigError(
                f"no scale >= 2^-64 avoids overflow with clip={self.clip}, "
                f"max_hospitals={self.max_hospitals}, max_examples={self.max_examples}, "
                f"bits={self.bits}"
            )

    def _fits(self, scale: Fraction) -> bool:
        h = self.max_hospitals
        worst = Fraction(self.clip) * scale * h * self.max_examples + Fraction(h, 2)
        return worst <= (1 << (self.bits - 1)) - 1

    def _largest_scale(self) -> float | None:
        for e in range(self.bits, -65, -1):
            if self._fits(Fraction(2) ** e):
                return math.ldexp(1.0, e)
        return None

    @property
    def resolved_scale(self) -> float:
        """The fixed-point scale in use (``scale``, or the derived power of two)."""
        if self.scale is not None:
            return float(self.scale)
        s = self._largest_scale()
        assert s is not None  # checked in __post_init__
        return s

    @property
    def value_bytes(self) -> int:
        """Bytes per transmitted value (``bits / 8``)."""
        return self.bits // 8

    def error_bound(self, num_updates: int, total_examples: int) -> float:
        """Worst-case absolute quantization error of the recovered mean, per value.

        ``num_updates / (2 * scale * total_examples)``: each hospital rounds its weighted
        value once (error <= 1/2 in units of ``1/scale``), and the sum is divided by
        ``scale * total_examples``. Clipping is not included.
        """
        return num_updates / (2.0 * self.resolved_scale * total_examples)

    def to_json(self) -> dict[str, Any]:
        """The parameters as a JSON-compatible dict (``scale`` resolved)."""
        d = asdict(self)
        d["scale"] = self.resolved_scale
        return d


def default_threshold(group_size: int) -> int:
    """Smallest threshold above half the share group: ``group_size // 2 + 1``."""
    return group_size // 2 + 1


@dataclass(frozen=True)
class RoundConfig:
    """What the server and every hospital must agree on for one round.

    Parameters
    ----------
    round : int
        Round number, >= 1; hospitals refuse a round not newer than the last one they
        joined (replay protection).
    hospital_ids : tuple of int
        The hospitals invited to this round (distinct, in ``[0, 2^64)``), sorted.
    vector_size : int
        ``P``, values per update.
    params : SecAggParams
        The consortium parameters.
    threshold : int, optional
        ``t``: shares needed to recover a hospital's secrets, so at most
        ``group_size - t`` hospitals of a share group may drop out. Must satisfy
        ``group_size / 2 < t <= group_size`` and ``t >= 2`` where ``group_size`` is the
        number of hospitals (complete graph) or ``neighbours + 1`` (default:
        ``group_size // 2 + 1``).
    nonce : str, optional
        32 hex digits chosen by the server for this round (default: fresh random), so that
        messages from another run that reused the round number do not verify.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If a field is out of range.
    """

    round: int
    hospital_ids: tuple[int, ...]
    vector_size: int
    params: SecAggParams
    threshold: int | None = None
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        ids = tuple(sorted(int(i) for i in self.hospital_ids))
        object.__setattr__(self, "hospital_ids", ids)
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 1:
            raise ConfigError(f"round must be an int >= 1, got {self.round!r}")
        if len(set(ids)) != len(ids) or any(not 0 <= i <= MAX_HOSPITAL_ID for i in ids):
            raise ConfigError("hospital_ids must be distinct integers in [0, 2^64)")
        if not 2 <= len(ids) <= self.params.max_hospitals:
            raise ConfigError(
                f"a round needs 2 to max_hospitals={self.params.max_hospitals} hospitals, "
                f"got {len(ids)}"
            )
        if not (
            isinstance(self.nonce, str)
            and len(self.nonce) == 32
            and all(ch in "0123456789abcdef" for ch in self.nonce)
        ):
            raise ConfigError("nonce must be 32 lowercase hex digits")
        if self.vector_size < 1:
            raise ConfigError(f"vector_size must be >= 1, got {self.vector_size}")
        g = self.group_size
        t = default_threshold(g) if self.threshold is None else self.threshold
        if not (2 * t > g and 2 <= t <= g):
            raise ConfigError(
                f"threshold must satisfy {g}/2 < t <= {g} and t >= 2 "
                f"(share group of {g} hospitals), got {t}"
            )
        object.__setattr__(self, "threshold", t)

    @property
    def t(self) -> int:
        """The resolved threshold."""
        assert self.threshold is not None
        return self.threshold

    @property
    def group_size(self) -> int:
        """Hospitals holding shares of one hospital's secrets (itself included)."""
        n = len(self.hospital_ids)
        k = self.params.neighbours
        return n if k is None or k >= n - 1 else k + 1

    def to_json(self) -> dict[str, Any]:
        """The configuration as a JSON-compatible dict (hashed into :attr:`session`)."""
        return {
            "round": self.round,
            "hospital_ids": list(self.hospital_ids),
            "vector_size": self.vector_size,
            "threshold": self.t,
            "nonce": self.nonce,
            "params": self.params.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> RoundConfig:
        """Rebuild a configuration from :meth:`to_json` output.

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            If ``data`` does not describe a valid configuration.
        """
        try:
            p = dict(data["params"])
            params = SecAggParams(
                bits=int(p["bits"]),
                clip=float(p["clip"]),
                max_hospitals=int(p["max_hospitals"]),
                max_examples=int(p["max_examples"]),
                scale=float(p["scale"]),
                neighbours=None if p["neighbours"] is None else int(p["neighbours"]),
                group_mask=bool(p["group_mask"]),
            )
            return cls(
                round=int(data["round"]),
                hospital_ids=tuple(int(i) for i in data["hospital_ids"]),
                vector_size=int(data["vector_size"]),
                params=params,
                threshold=int(data["threshold"]),
                nonce=str(data["nonce"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"invalid secagg round configuration: {exc}") from exc

    @property
    def session(self) -> str:
        """SHA-256 (hex) of the canonical JSON configuration; binds every message."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"fedcrypt/secagg/v1/session\x00" + blob).hexdigest()
