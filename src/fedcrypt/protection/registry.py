"""The registry of protection modes: one :class:`~fedcrypt.protection.base.Scheme` each.

Application code (the federation, the CLI, the report, the portal, the benches) asks a
descriptor what a mode does instead of comparing protection names, and builds a mode's
halves through it, so that the server path can only ever load public key material.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import get_args

from fedcrypt.config import DEPRECATED_PROTECTIONS, Protection
from fedcrypt.exceptions import ConfigError
from fedcrypt.protection import he, plain
from fedcrypt.protection.base import HospitalProtection, Scheme, ServerAggregator
from fedcrypt.protection.secagg import STAGES

HOSPITAL_KEY_FILE = "hospital.key"
SERVER_KEY_FILE = "server.key"

PLAIN = Scheme(
    name="plain",
    title="no protection (baseline)",
    wire_scheme=plain.SCHEME,
    server_sees_updates=True,
    server_sees_aggregate=True,
    key_pair=False,
    staged=False,
    layer_selection=False,
    threat="the server saw every hospital's update and the global model (baseline, no protection).",
    hospital=plain.hospital,
    server=plain.server,
    check_upload=plain.check_upload,
)

HE = Scheme(
    name=he.MODE,
    title="homomorphic encryption",
    wire_scheme=he.WIRE_SCHEME,
    legacy_wire_schemes=he.LEGACY_WIRE_SCHEMES,
    server_sees_updates=False,
    server_sees_aggregate=False,
    key_pair=True,
    staged=False,
    layer_selection=True,
    threat=(
        "the server held only public HE parameters and added ciphertexts: it never saw an "
        "individual update nor the global model. Hospitals share the secret key, so a server "
        "colluding with one hospital learns everything."
    ),
    hospital=he.hospital,
    server=he.server,
    check_upload=he.check_upload,
    aliases=tuple(k for k, v in DEPRECATED_PROTECTIONS.items() if v == he.MODE),
)

SECAGG = Scheme(
    name="secagg",
    title="secure aggregation (pairwise masks)",
    wire_scheme="secagg",
    server_sees_updates=False,
    server_sees_aggregate=False,
    key_pair=False,
    staged=True,
    layer_selection=False,
    threat=(
        "the server saw only pairwise-masked updates and learnt at most their sum (nothing, "
        "with the consortium group mask), even when lying about dropouts or showing hospitals "
        "different views (signed consistency check). No individual update leaks to a server "
        "colluding with up to 2t - n - 1 hospitals (the default threshold tolerates one); "
        "with the group mask the colluders learn the aggregate."
    ),
    stages=STAGES,
)

SCHEMES: dict[str, Scheme] = {s.name: s for s in (PLAIN, HE, SECAGG)}
#: Every accepted ``--protection`` value (deprecated aliases excluded).
MODES: tuple[str, ...] = tuple(SCHEMES)

if set(MODES) != set(get_args(Protection)):  # pragma: no cover - a programming error
    raise RuntimeError("fedcrypt.config.Protection and the protection registry disagree")


def get_scheme(name: str) -> Scheme:
    """The descriptor of protection mode ``name`` (deprecated aliases warn and resolve).

    Parameters
    ----------
    name : str
        ``plain``, ``he`` or ``secagg`` (or the deprecated ``ckks``, for ``he``).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        For an unknown name (the message lists the valid ones).
    """
    key = str(name).strip().lower()
    if key in DEPRECATED_PROTECTIONS:
        warnings.warn(
            f"protection {key!r} is deprecated; use {DEPRECATED_PROTECTIONS[key]!r}",
            FutureWarning,
            stacklevel=2,
        )
        key = DEPRECATED_PROTECTIONS[key]
    try:
        return SCHEMES[key]
    except KeyError:
        raise ConfigError(
            f"unknown protection {name!r}; choose one of {', '.join(MODES)}"
        ) from None


def hospital_protection(
    scheme: str, *, key_file: Path | None = None, encrypt_layers: str = "all", layout: object = None
) -> HospitalProtection:
    """The hospital's half of ``scheme`` (see :meth:`Scheme.hospital_protection`)."""
    return get_scheme(scheme).hospital_protection(
        key_file=key_file, encrypt_layers=encrypt_layers, layout=layout
    )


def server_aggregator(
    scheme: str, *, key_file: Path | None = None, encrypt_layers: str = "all"
) -> ServerAggregator:
    """The server's half of ``scheme``: public key material only."""
    return get_scheme(scheme).server_aggregator(key_file=key_file, encrypt_layers=encrypt_layers)
