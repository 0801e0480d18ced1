"""Shamir secret sharing over the prime field GF(2^521 - 1)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping

from fedcrypt.exceptions import ProtocolError

PRIME = (1 << 521) - 1
"""The Mersenne prime 2^521 - 1: holds any 32-byte secret as one field element."""

SHARE_BYTES = 66
"""Big-endian encoding length of one field element (ceil(521 / 8))."""

_COEFF_BYTES = 80  # 640 random bits reduced mod a 521-bit prime: bias below 2^-119

RandomBytes = Callable[[int], bytes]


def split(
    secret: int,
    xs: Iterable[int],
    threshold: int,
    *,
    rng: RandomBytes = secrets.token_bytes,
) -> dict[int, int]:
    """Split ``secret`` into shares, any ``threshold`` of which recover it.

    Shamir, "How to share a secret", CACM 22(11), 1979: a random polynomial ``f`` of
    degree ``threshold - 1`` over GF(p) with ``f(0) = secret``; the share for ``x`` is
    ``f(x)``. Fewer than ``threshold`` shares reveal nothing about ``secret``.

    Parameters
    ----------
    secret : int
        In ``[0, PRIME)``.
    xs : iterable of int
        Distinct evaluation points in ``[1, PRIME)`` (one per share holder).
    threshold : int
        Shares needed to reconstruct, ``1 <= threshold <= len(xs)``.
    rng : callable, optional
        ``rng(n) -> n random bytes`` for the coefficients (default: ``secrets.token_bytes``;
        inject only in tests).

    Returns
    -------
    dict of int to int
        ``x -> f(x)``.

    Raises
    ------
    ValueError
        If ``secret``, ``xs`` or ``threshold`` is out of range.
    """
    points = list(xs)
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be in [0, PRIME)")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError("xs must be distinct and in [1, PRIME)")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be in [1, {len(points)}], got {threshold}")
    coeffs = [secret] + [
        int.from_bytes(rng(_COEFF_BYTES), "big") % PRIME for _ in range(threshold - 1)
    ]
    shares: dict[int, int] = {}
    for x in points:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: Mapping[int, int]) -> int:
    """Recover ``f(0)`` by Lagrange interpolation from the given shares.

    With at least ``threshold`` correct shares the result is the secret; with fewer it
    is an unrelated field element (callers verify the result against a commitment).

    Parameters
    ----------
    shares : mapping of int to int
        ``x -> f(x)``, distinct ``x`` in ``[1, PRIME)``, values in ``[0, PRIME)``.

    Raises
    ------
    ValueError
        If ``shares`` is empty or holds an out-of-range point or value.
    """
    if not shares:
        raise ValueError("no shares to combine")
    items = list(shares.items())
    for x, y in items:
        if not 0 < x < PRIME or not 0 <= y < PRIME:
            raise ValueError("share point or value out of range")
    secret = 0
    for j, (xj, yj) in enumerate(items):
        num, den = 1, 1
        for m, (xm, _) in enumerate(items):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    return secret


def encode(value: int) -> bytes:
    """Encode a field element as :data:`SHARE_BYTES` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode(data: bytes | memoryview) -> int:
    """Decode a field element written by :func:`encode`.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If ``data`` has the wrong length or encodes a value ``>= PRIME``.
    """
    if len(data) != SHARE_BYTES:
        raise ProtocolError(f"malformed share: {len(data)} bytes, expected {SHARE_BYTES}")
    value = int.from_bytes(bytes(data), "big")
    if value >= PRIME:
        raise ProtocolError("malformed share: value outside the field")
    return value
