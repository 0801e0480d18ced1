"""The SecAgg+ neighbour graph: who masks with and holds shares for whom."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from fedcrypt.protection.secagg.primitives import DOMAIN, u64


def graph_seed(session: str, keys: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    """Public seed of the round's graph: SHA-256 over the session and every advertised key.

    Parameters
    ----------
    session : str
        The round's session digest.
    keys : mapping of int to (bytes, bytes)
        ``hospital id -> (mask public key, encryption public key)`` of the hospitals that
        advertised (raw 32-byte X25519 keys).
    """
    h = hashlib.sha256(DOMAIN + b"graph\x00" + session.encode())
    for hid in sorted(keys):
        mask_pk, enc_pk = keys[hid]
        h.update(u64(hid) + mask_pk + enc_pk)
    return h.digest()


def neighbour_graph(
    ids: Sequence[int], *, neighbours: int | None, seed: bytes
) -> dict[int, frozenset[int]]:
    """Neighbours of each hospital (itself excluded).

    With ``neighbours=None`` or ``neighbours >= len(ids) - 1``: the complete graph
    (Bonawitz et al., CCS 2017). Otherwise the Harary graph ``H(neighbours, n)`` — hospital
    at position ``p`` is adjacent to positions ``p +- 1, ..., p +- neighbours/2 (mod n)`` —
    over an ordering of the hospitals by ``SHA-256(seed || id)``, as in SecAgg+ (Bell et
    al., "Secure single-server aggregation with (poly)logarithmic overhead", CCS 2020).

    Parameters
    ----------
    ids : sequence of int
        Distinct hospital ids.
    neighbours : int or None
        Even degree, or ``None`` for the complete graph.
    seed : bytes
        Public randomness (:func:`graph_seed`), identical for every party.
    """
    members = sorted(ids)
    n = len(members)
    if neighbours is None or neighbours >= n - 1:
        everyone = frozenset(members)
        return {i: everyone - {i} for i in members}
    order = sorted(members, key=lambda i: hashlib.sha256(seed + u64(i)).digest())
    half = neighbours // 2
    graph: dict[int, frozenset[int]] = {}
    for p, hid in enumerate(order):
        adj = {order[(p + d) % n] for d in range(1, half + 1)}
        adj |= {order[(p - d) % n] for d in range(1, half + 1)}
        graph[hid] = frozenset(adj)
    return graph
