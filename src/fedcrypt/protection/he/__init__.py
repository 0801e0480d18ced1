"""Homomorphic encryption (mode ``he``): float CKKS and quantized, packed BFV parameter sets.

Modules: :mod:`~.params` (named presets, 128-bit check), :mod:`~.ckks` (float CKKS via
TenSEAL), :mod:`~.bfv` (quantized values packed several per BFV slot), :mod:`~.seal`
(the low-level SEAL layer), :mod:`~.quantize`, :mod:`~.bounds` (error bounds) and
:mod:`~.keys` (key files). This module holds the scheme's factories for the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcrypt.exceptions import KeyMaterialError, ProtocolError
from fedcrypt.protection.base import HospitalProtection, ServerAggregator, UploadCheck
from fedcrypt.protection.he.params import LEGACY_WIRE_SCHEMES, MODE, WIRE_SCHEME

__all__ = ["LEGACY_WIRE_SCHEMES", "MODE", "WIRE_SCHEME", "check_upload", "hospital", "server"]


def _require(path: Path | None, what: str) -> Path:
    if path is None:
        raise KeyMaterialError(f"protection {MODE!r} needs the {what} key file; none was given")
    return path


def _named(path: Path, exc: KeyMaterialError) -> KeyMaterialError:
    """The same error, with the offending file's path in front (once)."""
    msg = str(exc)
    return exc if str(path) in msg else KeyMaterialError(f"{path}: {msg}")


def hospital(
    *, key_file: Path | None = None, encrypt_layers: str = "all", layout: object = None
) -> HospitalProtection:
    """The hospital half of ``he`` from the hospital key file (secret, 0600).

    Parameters
    ----------
    key_file : Path
        The hospital key file from ``fedcrypt keys generate``.
    encrypt_layers : str
        ``all`` or a layer selection (:mod:`fedcrypt.protection.selective`).
    layout : fedcrypt.protection.flatten.Layout, optional
        The model layout, required when ``encrypt_layers`` is not ``all``. Give it always:
        the packed presets then quantize each tensor on blocks of its own, send integer
        buffers exactly and keep variances non-negative (without it the update is
        treated as one floating tensor).

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If the key file is missing, corrupt, too widely readable or not a hospital key.
    """
    from fedcrypt.protection import selective
    from fedcrypt.protection.he import keys

    path = _require(key_file, "hospital")
    mask = None
    inner_layout = layout
    if encrypt_layers != "all":
        mask = selective.select_layers(layout, encrypt_layers)  # type: ignore[arg-type]
        inner_layout = selective.selected_layout(layout, mask)  # type: ignore[arg-type]
    try:
        inner: HospitalProtection = keys.load_hospital(path, layout=inner_layout)
    except KeyMaterialError as exc:
        raise _named(path, exc) from None
    if mask is not None:
        return selective.SelectiveHospital(inner, mask)
    return inner


def server(*, key_file: Path | None = None, encrypt_layers: str = "all") -> ServerAggregator:
    """The server half of ``he`` from the server key file (public parameters only).

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If the key file is missing, corrupt, or is a hospital (secret) key file.
    """
    from fedcrypt.protection import selective
    from fedcrypt.protection.he import keys

    path = _require(key_file, "server")
    try:
        inner: ServerAggregator = keys.load_server(path)
    except KeyMaterialError as exc:
        raise _named(path, exc) from None
    if encrypt_layers != "all":
        return selective.SelectiveAggregator(inner)
    return inner


def check_upload(
    header: dict[str, Any], section_lengths: Sequence[int], expected: UploadCheck
) -> None:
    """Check an ``he`` upload's header against its federation (no decryption).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the header names no or another key context, or carries no ciphertext. (A
        retired format version is refused by the aggregator, naming the version.)
    """
    fingerprint = header.get("fingerprint")
    if not isinstance(fingerprint, str):
        raise ProtocolError("the update's header names no key context fingerprint")
    if expected.fingerprint is not None and fingerprint != expected.fingerprint:
        raise ProtocolError(
            "the update was encrypted under another key context (fingerprint "
            f"{fingerprint[:16]}…, this federation uses {expected.fingerprint[:16]}…)"
        )
    if not section_lengths:
        raise ProtocolError(f"malformed {MODE} update: no ciphertext sections")
