"""Shared helpers for the secagg tests: deterministic randomness and small consortia."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from numpy.typing import NDArray

from fedcrypt.protection.plain import PlainAggregator, PlainHospital
from fedcrypt.protection.secagg import (
    RoundConfig,
    SecAggHospital,
    SecAggParams,
    SecAggServer,
)


class RecordingRng:
    """Seeded ``rng(n) -> bytes`` that remembers every output (to hunt for leaked secrets)."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)
        self.outputs: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = self._r.randbytes(n)
        self.outputs.append(out)
        return out


@dataclass
class Consortium:
    ids: tuple[int, ...]
    params: SecAggParams
    hospitals: dict[int, SecAggHospital]
    registry: dict[int, Ed25519PublicKey]
    signing: dict[int, Ed25519PrivateKey]
    consortium_key: bytes | None
    rng: RecordingRng
    round: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def server(self, *, vector_size: int, threshold: int | None = None) -> SecAggServer:
        """A server for the next round (increments the round number)."""
        self.round += 1
        cfg = RoundConfig(
            round=self.round,
            hospital_ids=self.ids,
            vector_size=vector_size,
            params=self.params,
            threshold=threshold,
        )
        return SecAggServer(cfg, registry=self.registry)


def make_consortium(
    ids: Sequence[int], params: SecAggParams | None = None, *, seed: int = 0
) -> Consortium:
    params = params or SecAggParams()
    rng = RecordingRng(seed)
    signing = {i: Ed25519PrivateKey.from_private_bytes(rng(32)) for i in ids}
    registry = {i: k.public_key() for i, k in signing.items()}
    key = rng(32) if params.group_mask else None
    hospitals = {
        i: SecAggHospital(
            i,
            signing_key=signing[i],
            registry=registry,
            params=params,
            consortium_key=key,
            rng=rng,
        )
        for i in ids
    }
    return Consortium(tuple(sorted(ids)), params, hospitals, registry, signing, key, rng)


def make_inputs(
    ids: Sequence[int], size: int, *, seed: int = 1, scale: float = 0.5
) -> dict[int, tuple[NDArray[np.float64], int]]:
    gen = np.random.default_rng(seed)
    return {
        i: (np.clip(gen.normal(0.0, scale, size), -3.9, 3.9), int(gen.integers(20, 400)))
        for i in ids
    }


def plain_fedavg(
    inputs: dict[int, tuple[NDArray[np.float64], int]], ids: Sequence[int]
) -> tuple[NDArray[np.float64], int]:
    """FedAvg of ``ids`` through the project's ``plain`` scheme."""
    blobs = [PlainHospital().protect(inputs[i][0], num_examples=inputs[i][1]) for i in ids]
    res = PlainHospital().unprotect(PlainAggregator().aggregate(blobs))
    return res.mean, res.total_examples
