"""Fixed-point quantization into Z_(2^k) and PRG masks (pairwise, self, group) for ``secagg``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, DecryptionError, ProtocolError
from fedcrypt.protection.secagg.config import SecAggParams
from fedcrypt.protection.secagg.primitives import Prg, agree, hkdf, u64

EXTRA = 2
"""Elements appended to the ``P`` values: the example count and a zero check element."""


def unsigned_dtype(bits: int) -> np.dtype[np.unsignedinteger]:
    """Little-endian unsigned dtype of ``bits`` bits (the wire and arithmetic type)."""
    return np.dtype(f"<u{bits // 8}")


def signed_dtype(bits: int) -> np.dtype[np.signedinteger]:
    """Little-endian signed dtype of ``bits`` bits (two's-complement reading of a sum)."""
    return np.dtype(f"<i{bits // 8}")


def quantize(
    update: NDArray[np.float64], num_examples: int, params: SecAggParams
) -> NDArray[np.unsignedinteger]:
    """Encode ``num_examples * clip(update)`` in fixed point, with the count and a check.

    Parameters
    ----------
    update : numpy.ndarray
        Shape ``(P,)``, float64, finite.
    num_examples : int
        ``n_i``, in ``[1, params.max_examples]``.
    params : SecAggParams
        Supplies ``clip``, ``scale`` and ``bits``.

    Returns
    -------
    numpy.ndarray
        Shape ``(P + 2,)``, dtype ``<u{bits/8}``: element ``p < P`` is
        ``round(n_i * clip(update[p]) * scale) mod 2^bits``, element ``P`` is ``n_i`` and
        element ``P + 1`` is 0 (after unmasking, a non-zero sum there reveals a wrong
        consortium key or a corrupted aggregate).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If ``num_examples`` exceeds ``params.max_examples`` (the overflow bound).
    """
    if num_examples > params.max_examples:
        raise ConfigError(
            f"num_examples={num_examples} exceeds the consortium's max_examples="
            f"{params.max_examples}; the masked sum could overflow"
        )
    size = update.shape[0]
    w = np.clip(update, -params.clip, params.clip)
    w *= float(num_examples) * params.resolved_scale
    np.rint(w, out=w)
    out = np.empty(size + EXTRA, dtype=signed_dtype(params.bits))
    np.copyto(out[:size], w, casting="unsafe")  # |w| < 2^(bits-1) by the params bound
    out[size] = num_examples
    out[size + 1] = 0
    return out.view(unsigned_dtype(params.bits))


def dequantize(
    total: NDArray[np.unsignedinteger], params: SecAggParams
) -> tuple[NDArray[np.float64], int]:
    """Decode an unmasked sum of :func:`quantize` outputs into the FedAvg mean.

    Parameters
    ----------
    total : numpy.ndarray
        Shape ``(P + 2,)``, dtype ``<u{bits/8}``, the sum mod ``2^bits``.
    params : SecAggParams
        As used to quantize.

    Returns
    -------
    mean : numpy.ndarray
        Shape ``(P,)``, float64: ``sum_i n_i clip(x_i) / sum_i n_i`` up to
        :meth:`SecAggParams.error_bound`.
    total_examples : int
        ``sum_i n_i``.

    Raises
    ------
    fedcrypt.exceptions.DecryptionError
        If the check element is not 0 (wrong consortium key, or corrupted aggregate).
    fedcrypt.exceptions.ProtocolError
        If the decoded example count is 0 or above the configured maximum.
    """
    if int(total[-1]) != 0:
        raise DecryptionError(
            "secagg aggregate does not unmask: wrong consortium key or corrupted aggregate"
        )
    count = int(total[-2])
    if not 1 <= count <= params.max_hospitals * params.max_examples:
        raise ProtocolError(
            f"secagg aggregate decodes to {count} examples: wrong mask or corrupted aggregate"
        )
    values = total[:-EXTRA].view(signed_dtype(params.bits)).astype(np.float64)
    values /= params.resolved_scale * count
    return values, count


def pairwise_key(
    mask_private: X25519PrivateKey, peer_public: X25519PublicKey, *, session: bytes, a: int, b: int
) -> bytes:
    """PRG key of the mask shared by hospitals ``a`` and ``b`` (symmetric in ``a, b``).

    ``HKDF-SHA256(X25519(s_a, s_b^PK), salt=session, info=.. || min || max)``
    (Bonawitz et al. 2017, §4: pairwise masks ``p_{u,v}``).
    """
    lo, hi = min(a, b), max(a, b)
    return agree(
        mask_private, peer_public, info=b"pairwise-mask\x00" + u64(lo) + u64(hi), salt=session
    )


def self_mask_key(seed: bytes, *, session: bytes, owner: int) -> bytes:
    """PRG key of hospital ``owner``'s self-mask from its 32-byte seed ``b_owner``."""
    return hkdf(seed, info=b"self-mask\x00" + u64(owner), salt=session)


def group_mask_key(
    consortium_key: bytes,
    *,
    nonce: str,
    invited: Sequence[int],
    round_: int,
    owner: int,
    size: int,
) -> bytes:
    """PRG key of hospital ``owner``'s group mask in one session.

    ``HKDF-SHA256(consortium key, info = "group-mask" || nonce || round || |invited| ||
    invited ids (sorted) || owner || size)``: bound to the session's random nonce, the
    sorted invited set and the round, so a group mask (or a masked vector) of another
    session, another invited set or another round is useless here. Any consortium
    hospital (also one not invited to the round) can remove it: the aggregate names the
    nonce, the invited set and the contributors.

    Parameters
    ----------
    consortium_key : bytes
        The consortium's group-mask key (at least 32 bytes; hospitals only).
    nonce : str
        The round configuration's 32 hex digits (:attr:`RoundConfig.nonce`).
    invited : sequence of int
        The invited hospital ids (sorted here).
    round_ : int
        Round number.
    owner : int
        The hospital whose mask this is.
    size : int
        Vector length ``P + 2``.

    Raises
    ------
    ValueError
        If ``nonce`` is not 32 hex digits.
    """
    ids = sorted(int(i) for i in invited)
    info = (
        b"group-mask\x00"
        + bytes.fromhex(nonce)
        + u64(round_)
        + u64(len(ids))
        + b"".join(u64(i) for i in ids)
        + u64(owner)
        + u64(size)
    )
    if len(nonce) != 32:
        raise ValueError("nonce must be 32 hex digits")
    return hkdf(consortium_key, info=info)


class Masker:
    """Adds or subtracts AES-256-CTR masks to a ``(P + 2,)`` vector in place, mod ``2^bits``.

    Parameters
    ----------
    size : int
        Vector length (``P + 2``).
    bits : int
        32 or 64.
    """

    def __init__(self, size: int, bits: int) -> None:
        self.size = size
        self.dtype = unsigned_dtype(bits)
        self._prg = Prg(size * self.dtype.itemsize)

    def apply(self, acc: NDArray[np.unsignedinteger], key: bytes, *, sign: int) -> None:
        """``acc += sign * PRG(key) (mod 2^bits)``, ``sign`` in ``{+1, -1}``."""
        stream = np.frombuffer(self._prg.expand(key), dtype=self.dtype, count=self.size)
        if sign > 0:
            np.add(acc, stream, out=acc)
        else:
            np.subtract(acc, stream, out=acc)

    def wipe(self) -> None:
        """Overwrite the keystream buffer with zeros."""
        np.frombuffer(self._prg.buffer, dtype=np.uint8).fill(0)

    def mask(self, key: bytes) -> NDArray[np.unsignedinteger]:
        """A fresh copy of ``PRG(key)`` as a vector (for tests and inspection)."""
        return np.frombuffer(self._prg.expand(key), dtype=self.dtype, count=self.size).copy()
