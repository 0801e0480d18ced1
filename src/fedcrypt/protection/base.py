"""The protection interface: what a hospital holds, what the server holds.

A protection scheme is split in two roles so that the server side cannot hold a secret
key by construction:

* :class:`HospitalProtection` (hospital side, may hold secret key material):
  ``protect(update, num_examples) -> bytes`` and ``unprotect(bytes) -> AggregateResult``.
* :class:`ServerAggregator` (server side, public material only):
  ``aggregate([bytes, ...]) -> bytes``.

FedAvg under protection (DESIGN.md §3): each hospital multiplies its update by its
example count ``n_i`` before protecting it and sends ``n_i`` alongside; the server only
adds; a hospital divides the unprotected sum by ``sum(n_i)``. The server therefore needs
no ciphertext multiplication (multiplicative depth 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

SCHEMES: tuple[str, ...] = ("plain", "ckks", "secagg")


@dataclass(frozen=True)
class AggregateResult:
    """The unprotected FedAvg of one round.

    Attributes
    ----------
    mean : numpy.ndarray
        The example-weighted mean update, shape ``(P,)``, dtype float64.
    total_examples : int
        ``sum(n_i)`` over the hospitals whose updates were aggregated.
    num_updates : int
        How many hospitals' updates the aggregate contains.
    """

    mean: NDArray[np.float64]
    total_examples: int
    num_updates: int


@runtime_checkable
class HospitalProtection(Protocol):
    """Hospital-side half of a protection scheme (may hold a secret key)."""

    scheme: str

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """Weight ``update`` (shape ``(P,)``) by ``num_examples`` and protect it.

        Raises
        ------
        ValueError
            If ``update`` is not 1-D and finite, or ``num_examples`` < 1.
        """
        ...

    def unprotect(self, aggregate: bytes) -> AggregateResult:
        """Recover the FedAvg mean from a protected aggregate.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If ``aggregate`` is malformed.
        fedcrypt.exceptions.DecryptionError
            If it cannot be decrypted with this hospital's key.
        """
        ...


@runtime_checkable
class ServerAggregator(Protocol):
    """Server-side half of a protection scheme (public material only)."""

    scheme: str

    def aggregate(self, updates: Sequence[bytes]) -> bytes:
        """Add protected updates without unprotecting them.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If any update is malformed.
        fedcrypt.exceptions.AggregationError
            If ``updates`` is empty or the updates do not match each other (length,
            key context).
        """
        ...


def check_update(update: NDArray[np.floating], num_examples: int) -> NDArray[np.float64]:
    """Validate a hospital's update and example count; return it as float64.

    Parameters
    ----------
    update : numpy.ndarray
        Flat update, shape ``(P,)``, any floating dtype.
    num_examples : int
        Local training examples, at least 1.

    Raises
    ------
    ValueError
        Naming the offending parameter.
    """
    arr = np.asarray(update)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"update must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"update must be floating point, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("update contains NaN or infinite values")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
        raise ValueError(f"num_examples must be an int, got {type(num_examples).__name__}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    return arr.astype(np.float64, copy=False)
