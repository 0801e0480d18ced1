"""Known-answer, round-trip and error tests for Shamir sharing over GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection.secagg import shamir


def coefficients(*values: int) -> Callable[[int], bytes]:
    """An ``rng`` that makes :func:`shamir.split` draw exactly ``values`` as coefficients."""
    it = iter(values)

    def rng(n: int) -> bytes:
        return next(it).to_bytes(n, "big")

    return rng


def test_field_is_mersenne_521() -> None:
    assert shamir.PRIME == 2**521 - 1
    assert shamir.SHARE_BYTES == 66


def test_known_answer_wikipedia_example() -> None:
    # Shamir's Secret Sharing, Wikipedia "Example": secret 1234, a1 = 166, a2 = 94, so
    # f(x) = 1234 + 166 x + 94 x^2 and shares (1, 1494) ... (6, 5614).
    shares = shamir.split(1234, range(1, 7), 3, rng=coefficients(166, 94))
    assert shares == {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
    for subset in itertools.combinations(shares.items(), 3):
        assert shamir.combine(dict(subset)) == 1234
    assert shamir.combine({2: 1942, 4: 3402, 5: 4414}) == 1234


def test_known_answer_with_reduction_mod_p() -> None:
    # f(x) = (p - 1) + (p - 1) x = -(1 + x) mod p, so f(x) = p - 1 - x.
    p = shamir.PRIME
    shares = shamir.split(p - 1, [1, 2, 7, 2**64], 2, rng=coefficients(p - 1))
    assert shares == {1: p - 2, 2: p - 3, 7: p - 8, 2**64: p - 1 - 2**64}
    assert shamir.combine({7: p - 8, 2**64: p - 1 - 2**64}) == p - 1


def test_round_trip_random_32_byte_secrets() -> None:
    r = random.Random(7)
    xs = [r.randrange(1, 2**64) for _ in range(9)]
    for t in (2, 5, 9):
        secret = int.from_bytes(r.randbytes(32), "big")
        shares = shamir.split(secret, xs, t, rng=r.randbytes)
        for _ in range(5):
            subset = dict(r.sample(sorted(shares.items()), t))
            assert shamir.combine(subset) == secret
        if t > 1:  # t - 1 shares interpolate a different polynomial
            subset = dict(r.sample(sorted(shares.items()), t - 1))
            assert shamir.combine(subset) != secret


def test_encode_decode() -> None:
    v = shamir.PRIME - 1
    assert shamir.decode(shamir.encode(v)) == v
    with pytest.raises(ProtocolError):
        shamir.decode(b"\x00" * 65)
    with pytest.raises(ProtocolError):
        shamir.decode(b"\xff" * 66)  # >= PRIME


@pytest.mark.parametrize(
    ("secret", "xs", "t"),
    [(-1, [1, 2], 2), (shamir.PRIME, [1, 2], 2), (5, [1, 1], 2), (5, [0, 1], 2), (5, [1, 2], 3)],
)
def test_split_rejects_bad_arguments(secret: int, xs: list[int], t: int) -> None:
    with pytest.raises(ValueError):
        shamir.split(secret, xs, t)


def test_combine_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        shamir.combine({})
    with pytest.raises(ValueError):
        shamir.combine({0: 1})
