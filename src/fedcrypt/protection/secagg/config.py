"""Consortium parameters and per-round configuration of ``secagg``, with overflow checks."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from fedcrypt.exceptions import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (32, 64)
MAX_HOSPITAL_ID = (1 << 64) - 1
DEFAULT_COLLUDERS = 1
"""γ: hospitals that may collude with an active server, by default (DESIGN.md §2)."""


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
    colluders : int, optional
        ``γ``: how many hospitals may collude with an *active* server (one that lies about
        who dropped out and shows hospitals different views) while every individual update
        stays hidden (default: 1). Every round's threshold must satisfy ``2t > g + γ``
        (:func:`secure_threshold`); hospitals refuse rounds that do not. 0 is secure
        against an active server alone and logs a warning.

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
    colluders: int = DEFAULT_COLLUDERS

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
        if (
            isinstance(self.colluders, bool)
            or not isinstance(self.colluders, int)
            or not 0 <= self.colluders < self.max_hospitals
        ):
            raise ConfigError(
                f"colluders must be an int in [0, max_hospitals - 1 = {self.max_hospitals - 1}]"
                f", got {self.colluders!r}"
            )
        if self.colluders == 0:
            logger.warning(
                "secagg colluders=0: secure against an active server alone, but a server "
                "colluding with one hospital may recover an individual update"
            )
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


def secure_threshold(group_size: int, colluders: int = DEFAULT_COLLUDERS) -> int:
    """Smallest threshold secure against an active server colluding with ``colluders``.

    ``t = min(g, floor((g + γ) / 2) + 1)``, the smallest ``t`` with ``2t > g + γ``.

    Why: an active server recovers hospital ``u``'s update only if some ``t`` holders of
    ``u``'s shares believe ``u`` survived (they reveal shares of its self-mask seed
    ``b_u``) while ``t`` holders believe ``u`` dropped out (shares of its mask key
    ``s_u``), or, through the consistency-checked survivor set ``U3``, if ``t`` holders
    reveal ``b_u`` while ``u``'s honest peers are all declared dropped. An honest
    hospital reveals one kind per peer and signs one survivor set per session; the
    colluders reveal everything. Either way the two groups of ``t`` overlap only in
    colluders, which needs ``2t - γ <= g``: ``2t > g + γ`` makes it impossible (Bonawitz
    et al., CCS 2017, §4 and the active-adversary analysis; with the neighbour graph the
    same bound per share group, Bell et al., CCS 2020). The server then learns no more
    than the sum of the honest updates in ``U3`` (at least ``t - γ`` of them).

    Parameters
    ----------
    group_size : int
        ``g``: hospitals holding shares of one hospital's secrets (itself included).
    colluders : int, optional
        ``γ`` (default: :data:`DEFAULT_COLLUDERS`).

    Examples
    --------
    >>> [secure_threshold(n) for n in (2, 3, 4, 5, 10, 50)]
    [2, 3, 3, 4, 6, 26]
    """
    return min(group_size, (group_size + colluders) // 2 + 1)


def default_threshold(group_size: int) -> int:
    """The default threshold for :data:`DEFAULT_COLLUDERS` (see :func:`secure_threshold`)."""
    return secure_threshold(group_size, DEFAULT_COLLUDERS)


def tolerated_colluders(group_size: int, threshold: int) -> int:
    """The largest ``γ`` with ``2t > g + γ``: ``2t - g - 1`` (negative: insecure)."""
    return 2 * threshold - group_size - 1


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
        ``group_size - t`` hospitals of a share group may drop out after sharing keys.
        ``group_size`` is the number of invited hospitals (complete graph) or
        ``neighbours + 1``. Must satisfy ``2 <= t <= group_size`` and
        ``2t > group_size + params.colluders`` (default: the smallest such ``t``,
        :func:`secure_threshold`). A threshold with ``2t <= group_size`` is refused as
        insecure against an active server alone; one that only misses ``params.colluders``
        is refused with the number of colluders it does tolerate (lower
        ``SecAggParams.colluders`` to accept it).
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
        gamma = self.params.colluders
        t_min = secure_threshold(g, gamma)
        t = t_min if self.threshold is None else self.threshold
        if isinstance(t, bool) or not isinstance(t, int) or not 2 <= t <= g:
            raise ConfigError(
                f"threshold must be an int in [2, {g}] (share groups of {g} hospitals), got {t!r}"
            )
        if 2 * t <= g:
            raise ConfigError(
                f"threshold {t} is insecure for share groups of {g} hospitals: an active "
                f"server alone could recover an individual update (needs 2t > {g}; "
                f"use t >= {t_min} for colluders={gamma})"
            )
        if 2 * t <= g + gamma:
            raise ConfigError(
                f"threshold {t} for share groups of {g} hospitals tolerates only "
                f"{tolerated_colluders(g, t)} hospital(s) colluding with an active server; "
                f"this consortium requires colluders={gamma} (2t > g + colluders: t >= "
                f"{t_min}). Lower SecAggParams.colluders to accept the weaker threshold"
            )
        object.__setattr__(self, "threshold", t)

    @property
    def t(self) -> int:
        """The resolved threshold."""
        assert self.threshold is not None
        return self.threshold

    @property
    def signatures_needed(self) -> int:
        """Valid consistency signatures a hospital needs before it reveals shares.

        ``t`` with the complete graph. With the SecAgg+ graph every hospital must agree on
        one survivor set although share groups are small, so a majority of the invited
        hospitals beyond the colluders must sign: ``max(t, floor((n + γ) / 2) + 1)``
        (two sets signed by that many overlap in an honest hospital, who signs once).
        Also the fewest hospitals every stage before the unmask stage needs.
        """
        n = len(self.hospital_ids)
        if self.group_size >= n:
            return self.t
        return max(self.t, min(n, (n + self.params.colluders) // 2 + 1))

    @property
    def colluders_tolerated(self) -> int:
        """The most hospitals that may collude with an active server: ``2t - g - 1``."""
        return tolerated_colluders(self.group_size, self.t)

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
                colluders=int(p["colluders"]),
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
