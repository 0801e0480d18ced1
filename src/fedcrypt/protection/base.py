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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError


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


@dataclass(frozen=True)
class UploadCheck:
    """What a federation expects of one hospital's protected update (portal inspection).

    Attributes
    ----------
    size : int or None
        The model's number of values ``P``, if known.
    fingerprint : str or None
        The federation's key-context fingerprint (schemes with key files).
    """

    size: int | None = None
    fingerprint: str | None = None


#: ``hospital(key_file=..., encrypt_layers=..., layout=...)`` of a single-message scheme.
HospitalFactory = Callable[..., HospitalProtection]
#: ``server(key_file=..., encrypt_layers=...)`` of a single-message scheme.
ServerFactory = Callable[..., ServerAggregator]
#: ``check(header, section_lengths, expected)``: raise ProtocolError if an upload is wrong.
UploadInspector = Callable[[dict[str, Any], Sequence[int], UploadCheck], None]


@dataclass(frozen=True)
class Scheme:
    """Descriptor of one protection mode: everything application code may ask of it.

    Application code (federation, CLI, report, portal, benches) asks these questions
    instead of comparing protection names.

    Attributes
    ----------
    name : str
        The mode's name (``--protection``): ``plain``, ``he`` or ``secagg``.
    title : str
        A few words for people ("homomorphic encryption").
    wire_scheme : str
        The scheme tag written in its protected messages' headers.
    legacy_wire_schemes : tuple of str
        Older tags still read (``ckks`` for ``he`` messages and key files written before
        the rename).
    server_sees_updates : bool
        Whether the server can read an individual hospital's update.
    server_sees_aggregate : bool
        Whether the server can read the aggregate (the global model) by default.
    key_pair : bool
        Whether a run needs the shared key pair of ``fedcrypt keys generate``
        (``hospital.key`` at the hospitals, ``server.key`` at the server: ``he``).
        secagg's consortium key files (``--protection secagg``) are the staged
        protocol's own.
    staged : bool
        True for multi-stage protocols (secagg: five signed exchanges per round); False
        for single-message schemes (one upload per hospital per round).
    layer_selection : bool
        Whether ``--encrypt-layers`` applies (encrypt some tensors, send the rest in
        clear).
    threat : str
        The line the run report prints about what the server saw.
    stages : tuple of str
        The exchanges of one round, in order (``("train",)`` for single-message
        schemes); ``--drop ID@ROUND:STAGE`` names one.
    hospital : HospitalFactory or None
        Builds the hospital half (single-message schemes).
    server : ServerFactory or None
        Builds the server half, from public material only (single-message schemes).
    check_upload : UploadInspector or None
        Checks an upload's header and section sizes before the portal stores it.
    aliases : tuple of str
        Deprecated names still accepted for this mode (``ckks`` for ``he``).
    """

    name: str
    title: str
    wire_scheme: str
    server_sees_updates: bool
    server_sees_aggregate: bool
    key_pair: bool
    staged: bool
    layer_selection: bool
    threat: str
    stages: tuple[str, ...] = ("train",)
    hospital: HospitalFactory | None = None
    server: ServerFactory | None = None
    check_upload: UploadInspector | None = None
    aliases: tuple[str, ...] = ()
    legacy_wire_schemes: tuple[str, ...] = ()

    @property
    def read_schemes(self) -> tuple[str, ...]:
        """Every scheme tag accepted in this mode's messages (current first)."""
        return (self.wire_scheme, *self.legacy_wire_schemes)

    def hospital_protection(
        self, *, key_file: Path | None = None, encrypt_layers: str = "all", layout: object = None
    ) -> HospitalProtection:
        """The hospital half of a single-message scheme.

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            If the scheme is staged (it has no single-message hospital side).
        fedcrypt.exceptions.KeyMaterialError
            If a key file is needed and missing or wrong.
        """
        if self.hospital is None:
            raise ConfigError(f"protection {self.name!r} has no single-message hospital side")
        return self.hospital(key_file=key_file, encrypt_layers=encrypt_layers, layout=layout)

    def server_aggregator(
        self, *, key_file: Path | None = None, encrypt_layers: str = "all"
    ) -> ServerAggregator:
        """The server half of a single-message scheme (public material only).

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            If the scheme is staged.
        fedcrypt.exceptions.KeyMaterialError
            If a key file is needed and missing, or is a secret (hospital) key file.
        """
        if self.server is None:
            raise ConfigError(f"protection {self.name!r} has no single-message server side")
        return self.server(key_file=key_file, encrypt_layers=encrypt_layers)
