"""Build the hospital-side and server-side halves of the configured protection scheme.

Application code (the federation, the CLI) calls these recipes instead of constructing
schemes directly, so that the server path can only ever load public key material.
"""

from __future__ import annotations

from pathlib import Path

from fedcrypt.exceptions import ConfigError, KeyMaterialError
from fedcrypt.protection.base import HospitalProtection, ServerAggregator
from fedcrypt.protection.plain import PlainAggregator, PlainHospital

HOSPITAL_KEY_FILE = "hospital.key"
SERVER_KEY_FILE = "server.key"


def _require(path: Path | None, what: str) -> Path:
    if path is None:
        raise KeyMaterialError(f"protection 'ckks' needs the {what} key file; none was given")
    return path


def _named(path: Path, exc: KeyMaterialError) -> KeyMaterialError:
    """The same error, with the offending file's path in front (once)."""
    msg = str(exc)
    return exc if str(path) in msg else KeyMaterialError(f"{path}: {msg}")


def hospital_protection(
    scheme: str, *, key_file: Path | None = None, encrypt_layers: str = "all", layout: object = None
) -> HospitalProtection:
    """The hospital's half of ``scheme``.

    Parameters
    ----------
    scheme : {"plain", "ckks"}
        Protection scheme.
    key_file : Path, optional
        The hospital key file (secret); required for ``ckks``.
    encrypt_layers : str
        ``all`` or a layer selection (see :mod:`fedcrypt.protection.selective`).
    layout : fedcrypt.protection.packing.Layout, optional
        The model layout, required when ``encrypt_layers`` is not ``all``.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        For an unknown or unsupported scheme.
    fedcrypt.exceptions.KeyMaterialError
        If the key file is missing or not a hospital key.
    """
    if scheme == "plain":
        return PlainHospital()
    if scheme == "ckks":
        from fedcrypt.protection import keys

        path = _require(key_file, "hospital")
        try:
            inner: HospitalProtection = keys.load_hospital(path)
        except KeyMaterialError as exc:
            raise _named(path, exc) from None
        if encrypt_layers != "all":
            from fedcrypt.protection import selective

            mask = selective.select_layers(layout, encrypt_layers)  # type: ignore[arg-type]
            return selective.SelectiveHospital(inner, mask)
        return inner
    raise ConfigError(f"protection {scheme!r} has no single-message hospital side")


def server_aggregator(
    scheme: str, *, key_file: Path | None = None, encrypt_layers: str = "all"
) -> ServerAggregator:
    """The server's half of ``scheme``: public key material only.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        For an unknown or unsupported scheme.
    fedcrypt.exceptions.KeyMaterialError
        If the key file is missing, or is a hospital (secret) key file.
    """
    if scheme == "plain":
        return PlainAggregator()
    if scheme == "ckks":
        from fedcrypt.protection import keys

        path = _require(key_file, "server")
        try:
            inner: ServerAggregator = keys.load_server(path)
        except KeyMaterialError as exc:
            raise _named(path, exc) from None
        if encrypt_layers != "all":
            from fedcrypt.protection import selective

            return selective.SelectiveAggregator(inner)
        return inner
    raise ConfigError(f"protection {scheme!r} has no single-message server side")
