"""Partition example indices across hospitals (IID or Dirichlet), and stratified hold-outs.

Both schemes are seeded and reproducible, and return disjoint index sets that together
cover every example, so that every hospital can compute its own share independently
from the same ``(labels, num_clients, scheme, alpha, seed)``.

Multi-label data (multi-hot labels ``(N, K)``) are stratified and skewed on the **label
combination**: each distinct multi-hot row (e.g. "effusion + nodule", or "no finding")
is one group (:func:`label_keys`). IID then gives every hospital its share of every
combination; Dirichlet skews the hospitals' mixes of combinations.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")

MAX_DIRICHLET_DRAWS = 100_000
"""Dirichlet draws tried before giving up on the ``min_size`` constraint."""
_DRAWS_PER_BATCH = 500


def label_keys(labels: NDArray[Any]) -> NDArray[np.int64]:
    """The stratification group of each example: its class, or its label combination.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer class labels ``(N,)``, or 0/1 multi-hot labels ``(N, K)`` (any dtype).

    Returns
    -------
    numpy.ndarray
        int64 ``(N,)``: the class itself for ``(N,)`` labels; for ``(N, K)`` labels the
        index of the example's multi-hot row among the distinct rows (sorted), so two
        examples share a key exactly when they have the same labels.

    Raises
    ------
    ConfigError
        If ``labels`` is neither ``(N,)`` integers nor ``(N, K)``.
    """
    y = np.asarray(labels)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if y.ndim == 2:
        rows = (y > 0.5).astype(np.uint8)
        _, inverse = np.unique(rows, axis=0, return_inverse=True)
        return inverse.reshape(-1).astype(np.int64)
    raise ConfigError(f"labels must be (N,) integers or (N, K) multi-hot, got {y.dtype} {y.shape}")


def stratified_holdout(
    keys: NDArray[np.int64],
    fraction: float,
    rng: np.random.Generator,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split positions ``0 .. N-1`` into (kept, held out), stratified by ``keys``.

    The examples are shuffled within each group and the groups laid end to end; the
    ``m = round(fraction * N)`` held-out examples are then taken at evenly spaced
    positions (systematic sampling with a random start), so every group gives up its
    share to within one example, even groups of a single example (rare label
    combinations) as a whole. With ``0 < fraction`` and ``N >= 2`` at least one example
    is held out and at least one kept.

    Parameters
    ----------
    keys : numpy.ndarray
        int64 ``(N,)`` groups (:func:`label_keys`).
    fraction : float
        Share to hold out, in ``[0, 1)``.
    rng : numpy.random.Generator
        Source of the shuffles.

    Returns
    -------
    kept, held_out : numpy.ndarray
        Sorted int64 positions, disjoint, covering ``0 .. N-1``.
    """
    n = int(keys.size)
    if fraction <= 0 or n < 2:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    order = np.concatenate([rng.permutation(np.flatnonzero(keys == k)) for k in np.unique(keys)])
    m = min(max(round(fraction * n), 1), n - 1)
    start = rng.random()
    picks = np.floor((np.arange(m) + start) * n / m).astype(np.int64)
    held = np.sort(order[np.minimum(picks, n - 1)])
    kept = np.setdiff1d(np.arange(n, dtype=np.int64), held)
    return kept.astype(np.int64), held.astype(np.int64)


def partition_indices(
    labels: NDArray[Any],
    num_clients: int,
    *,
    scheme: Literal["iid", "dirichlet"] = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 2,
) -> list[NDArray[np.int64]]:
    """Partition the indices ``0 .. N-1`` of ``labels`` among ``num_clients`` hospitals.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer class labels, shape ``(N,)``, or multi-hot labels ``(N, K)`` (grouped
        by label combination, :func:`label_keys`).
    num_clients : int
        Number of hospitals ``M`` (>= 1).
    scheme : {"iid", "dirichlet"}
        ``"iid"`` (default): a stratified split; each class is shuffled and dealt in
        turn, so every hospital gets ``N // M`` or ``N // M + 1`` examples and the class
        mix of the whole. ``"dirichlet"``: label-skewed non-IID split after Hsu, Qi and
        Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
        Visual Classification", arXiv:1909.06335 (2019): for each class ``k`` a vector
        ``p_k ~ Dir(alpha * 1_M)`` is drawn and the class's shuffled examples are cut
        among the hospitals in proportions ``p_k``. Hospital sizes then differ too.
    alpha : float
        Dirichlet concentration (> 0, default: 0.5). Small values (0.1) give hospitals
        dominated by one class; large values (100) approach IID. Ignored for ``"iid"``.
    seed : int
        Seed of the shuffles and draws (default: 0).
    min_size : int
        Every hospital gets at least this many examples (default: 2). For
        ``"dirichlet"`` the whole draw is repeated until it holds (at most
        :data:`MAX_DIRICHLET_DRAWS` times).

    Returns
    -------
    list of numpy.ndarray
        ``M`` sorted int64 index arrays, disjoint, covering ``0 .. N-1``.

    Raises
    ------
    ConfigError
        If an argument is invalid, ``N < M * min_size``, or no Dirichlet draw met
        ``min_size`` (use a larger ``alpha``, fewer hospitals or a smaller ``min_size``).
    """
    raw = np.asarray(labels)
    if not (raw.ndim == 1 and np.issubdtype(raw.dtype, np.integer)) and raw.ndim != 2:
        raise ConfigError(
            f"labels must be a 1-D integer array or (N, K) multi-hot, got {raw.dtype} {raw.shape}"
        )
    y = label_keys(raw)
    if isinstance(num_clients, bool) or not isinstance(num_clients, Integral) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, Integral) or min_size < 0:
        raise ConfigError(f"min_size must be an integer >= 0, got {min_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if scheme not in PARTITIONS:
        raise ConfigError(f"unknown partition {scheme!r}; choose one of {', '.join(PARTITIONS)}")
    if scheme == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    num_clients, min_size, seed = int(num_clients), int(min_size), int(seed)
    n = int(y.size)
    if n < num_clients * max(min_size, 1):
        raise ConfigError(
            f"{n} examples cannot give {num_clients} hospitals at least "
            f"{max(min_size, 1)} example(s) each"
        )
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == k)) for k in np.unique(y)]
    if scheme == "iid":
        order = np.concatenate(by_class)
        parts = [order[c::num_clients] for c in range(num_clients)]
    else:
        parts = _dirichlet(by_class, num_clients, alpha=alpha, min_size=min_size, rng=rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    by_class: list[NDArray[np.intp]],
    num_clients: int,
    *,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[NDArray[np.intp]]:
    """Cut each class's (shuffled) indices among hospitals in ``Dir(alpha)`` proportions."""
    sizes = np.array([idx.size for idx in by_class])
    for _ in range(0, MAX_DIRICHLET_DRAWS, _DRAWS_PER_BATCH):
        # (draws, K, M): for each draw and class, the hospitals' shares of that class
        props = rng.dirichlet(np.full(num_clients, alpha), size=(_DRAWS_PER_BATCH, sizes.size))
        cuts = np.floor(np.cumsum(props, axis=2) * sizes[None, :, None]).astype(np.int64)
        cuts[..., -1] = sizes  # the last hospital takes the rounding remainder
        totals = np.diff(cuts, axis=2, prepend=0).sum(axis=1)  # (draws, M) hospital sizes
        good = np.flatnonzero(totals.min(axis=1) >= min_size)
        if good.size:
            chosen = cuts[good[0]]  # the first acceptable draw: reproducible given the seed
            break
    else:
        raise ConfigError(
            f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} gave each of "
            f"{num_clients} hospitals at least {min_size} examples; use a larger alpha, "
            "fewer hospitals or a smaller min_size"
        )
    pieces = [np.split(idx, cut[:-1]) for idx, cut in zip(by_class, chosen, strict=True)]
    return [np.concatenate([p[c] for p in pieces]) for c in range(num_clients)]
