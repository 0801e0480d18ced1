"""What a hospital node keeps between messages: the global model it last adopted.

A Flower ``ClientApp`` is stateless between messages (in simulation, a node's messages
may run in different worker processes), so the decrypted global model a hospital holds
lives in the node-local ``context.state``, never sent anywhere: the weights (float64,
shape ``(P,)``), the round they belong to, the digest of the protected aggregate they
came from and its example count (for the next round's quantization grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context
from numpy.typing import NDArray

#: ``context.state`` key of the held global model.
STATE_KEY = "fedcrypt-held"


@dataclass(frozen=True)
class Held:
    """The global model a hospital holds.

    Attributes
    ----------
    weights : numpy.ndarray
        Shape ``(P,)``, float64.
    round : int
        The round whose aggregate these weights are (0: the initial model).
    digest : str
        sha256 (hex) of the protected aggregate they were unprotected from ("" for the
        initial model).
    total_examples : int
        The example count the next quantization grid is calibrated on after that
        aggregate (its ``sum(n_i)``, or more after a small round; 0 for the initial model).
    """

    weights: NDArray[np.float64]
    round: int
    digest: str = ""
    total_examples: int = 0


def _record(context: Context) -> ConfigRecord:
    rec = context.state.get(STATE_KEY)
    if rec is None:
        rec = ConfigRecord()
        context.state[STATE_KEY] = rec
    return rec  # type: ignore[return-value]


def held(context: Context) -> Held | None:
    """The global model this node holds, or None."""
    rec = _record(context)
    data = rec.get("weights")
    if not isinstance(data, bytes):
        return None
    return Held(
        weights=np.frombuffer(data, dtype="<f8").copy(),
        round=int(rec.get("round", -1)),  # type: ignore[arg-type]
        digest=str(rec.get("digest", "")),
        total_examples=int(rec.get("total-examples", 0)),  # type: ignore[arg-type]
    )


def hold(context: Context, value: Held) -> None:
    """Remember ``value`` as this node's global model."""
    rec = _record(context)
    rec["weights"] = np.ascontiguousarray(value.weights, dtype="<f8").tobytes()
    rec["round"] = int(value.round)
    rec["digest"] = value.digest
    rec["total-examples"] = int(value.total_examples)
