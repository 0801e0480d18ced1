"""Who can compute what in each protection mode (the threat model of DESIGN.md §2, as data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PARTIES: tuple[str, ...] = ("server", "one hospital", "server + one hospital")


@dataclass(frozen=True)
class Capability:
    """What one party can compute in one protection mode (honest-but-curious hospitals,
    a possibly active server; DESIGN.md §2).

    Attributes
    ----------
    mode : str
        Protection mode as in ``--protection``.
    party : str
        One of :data:`PARTIES`.
    individual_update : str
        Whether it can read another hospital's update (and so try gradient inversion).
    aggregate : str
        Whether it can read the round's aggregate and the global model.
    membership : str
        What bounds a membership-inference attack on the models it can read.
    """

    mode: str
    party: str
    individual_update: str
    aggregate: str
    membership: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready fields."""
        return asdict(self)


_DP = "only differential privacy bounds it (ε, δ)"

CAPABILITIES: tuple[Capability, ...] = (
    Capability("plain", "server", "yes", "yes", _DP),
    Capability("plain", "one hospital", "no", "yes (global model)", _DP),
    Capability("plain", "server + one hospital", "yes", "yes", _DP),
    Capability("he", "server", "no (ciphertext)", "no (ciphertext)", "no model to attack"),
    Capability("he", "one hospital", "no (never receives one)", "yes (it decrypts)", _DP),
    Capability(
        "he",
        "server + one hospital",
        "yes (the hospital holds the shared secret key)",
        "yes",
        _DP,
    ),
    Capability(
        "he --encrypt-layers (not all)",
        "server",
        "the unselected tensors, in clear",
        "the unselected tensors, in clear",
        _DP + " on the clear tensors",
    ),
    Capability(
        "secagg", "server", "no (masked)", "no with the group mask (default); else yes", _DP
    ),
    Capability("secagg", "one hospital", "no", "yes (it unmasks)", _DP),
    Capability(
        "secagg",
        "server + one hospital",
        "no (pairwise masks need the other hospitals' secrets)",
        "yes",
        _DP,
    ),
)
"""Rows per (mode, party). Source: DESIGN.md §2 (threat model), ``docs/secagg.md``."""


def capability_rows() -> list[dict[str, str]]:
    """:data:`CAPABILITIES` as JSON-ready dicts."""
    return [c.to_dict() for c in CAPABILITIES]
