"""HE key generation and key files: a secret hospital file (0600) and a public server file.

Key files are :mod:`~fedcrypt.protection.wire` envelopes (never pickles)::

    header  {"scheme": "he" (older files: "ckks"), "kind": "hospital-secret" | "server-public",
             "format": 1, "preset": {...}, "key_id": hex, "fingerprint": hex}
    section 0: hospital: the secret key material (a TenSEAL CKKS context with its secret
               key, or a SEAL BFV secret key); server: the public context again
    section 1: the public context (TenSEAL CKKS context without keys, or serialized SEAL
               BFV parameters), identical in both files; the fingerprint input

The context **fingerprint** is ``sha256("fedcrypt/ckks-context/v1" | public context |
key_id | preset JSON)``. Contexts use symmetric encryption, so the public context holds
parameters only and would be identical for every key with the same preset; the 32-byte
random ``key_id`` drawn at generation makes the fingerprint identify one key. Both files
store it; loading recomputes and compares it, so a corrupted or edited file is refused.

Permissions: the hospital file is created with ``os.open(..., 0o600)``; loading
**refuses** (``KeyMaterialError``) a hospital file readable or writable by group or
others, as OpenSSH does for private keys.

Loading is cheap after the first time in a process: the deserialized key contexts are
kept per file content (sha256), and every call builds a fresh hospital or server object
(with its own round state) around them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenseal as ts

from fedcrypt.exceptions import ConfigError, KeyMaterialError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.he.bfv import BFVAggregator, BFVHospital
from fedcrypt.protection.he.ckks import CKKSAggregator, CKKSHospital, context_for, public_bytes
from fedcrypt.protection.he.params import (
    DEFAULT_PRESET,
    READ_SCHEMES,
    WIRE_SCHEME,
    HEPreset,
    get_preset,
)
from fedcrypt.protection.he.seal import BFVContext

KIND_HOSPITAL = "hospital-secret"
KIND_SERVER = "server-public"
FORMAT = 1
HOSPITAL_FILE = "hospital.key"
SERVER_FILE = "server.key"
_FP_DOMAIN = b"fedcrypt/ckks-context/v1\x00"
#: Deserialized contexts, per (role, sha256 of the key file): loaded once per process.
_CONTEXTS: dict[tuple[str, str], Any] = {}
_CONTEXTS_LOCK = threading.Lock()
_CONTEXTS_MAX = 8


def _cached(role: str, data: bytes, build: Any) -> Any:
    key = (role, hashlib.sha256(data).hexdigest())
    with _CONTEXTS_LOCK:
        hit = _CONTEXTS.get(key)
    if hit is not None:
        return hit
    value = build()
    with _CONTEXTS_LOCK:
        if len(_CONTEXTS) >= _CONTEXTS_MAX:
            _CONTEXTS.pop(next(iter(_CONTEXTS)))
        _CONTEXTS[key] = value
    return value


def fingerprint_of(public_context: bytes, key_id: bytes, preset: HEPreset) -> str:
    """Fingerprint (hex sha256) identifying one key context; see the module docstring."""
    h = hashlib.sha256(_FP_DOMAIN)
    for part in (
        public_context,
        key_id,
        json.dumps(preset.to_dict(), sort_keys=True, separators=(",", ":")).encode(),
    ):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def generate_keys(preset: str | HEPreset = DEFAULT_PRESET) -> tuple[bytes, bytes]:
    """Generate a fresh HE key context (CKKS or BFV, by preset).

    Parameters
    ----------
    preset : str or HEPreset
        A preset name (see :mod:`fedcrypt.protection.he.params`) or a preset (default:
        ``DEFAULT_PRESET``).

    Returns
    -------
    (bytes, bytes)
        The hospital key file (holds the secret key: keep it 0600, share it only among
        the consortium's hospitals) and the server key file (parameters only).

    Raises
    ------
    ConfigError
        If the preset name is unknown.
    InsecureParametersError
        If the parameters fail the 128-bit security check.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.is_packed:
        bfv = BFVContext.generate(
            p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.plain_modulus_bits
        )
        pub = bfv.params_bytes
        secret = bfv.secret_key_bytes()
    else:
        ctx = context_for(p)
        pub = public_bytes(ctx)
        secret = bytes(
            ctx.serialize(
                save_secret_key=True,
                save_public_key=False,
                save_relin_keys=False,
                save_galois_keys=False,
            )
        )
    key_id = secrets.token_bytes(32)
    fp = fingerprint_of(pub, key_id, p)
    base: dict[str, Any] = {
        "scheme": WIRE_SCHEME,
        "format": FORMAT,
        "preset": p.to_dict(),
        "key_id": key_id.hex(),
        "fingerprint": fp,
    }
    hospital = wire.pack({**base, "kind": KIND_HOSPITAL}, [secret, pub])
    server = wire.pack({**base, "kind": KIND_SERVER}, [pub, pub])
    return hospital, server


@dataclass(frozen=True)
class KeyFileInfo:
    """What a key file says about itself (from its header, verified).

    Attributes
    ----------
    kind : str
        ``"hospital-secret"`` or ``"server-public"``.
    preset : HEPreset
        Its parameters.
    fingerprint : str
        Hex sha256 of the key context.
    has_secret_key : bool
        Whether the file holds a secret key (its context deserializes as private).
    size_bytes : int
        File size.
    """

    kind: str
    preset: HEPreset
    fingerprint: str
    has_secret_key: bool
    size_bytes: int


def _parse(data: bytes) -> tuple[str, HEPreset, str, bytes | memoryview, bytes]:
    """Validate a key file's envelope; return kind, preset, fingerprint, context, public."""
    try:
        env = wire.unpack(data, expect_scheme=READ_SCHEMES)  # 'ckks' in older key files
    except ProtocolError as exc:
        raise KeyMaterialError(f"not a fedcrypt HE key file ({exc})") from exc
    h = env.header
    kind = h.get("kind")
    if kind not in (KIND_HOSPITAL, KIND_SERVER):
        raise KeyMaterialError("not a fedcrypt HE key file: unknown key kind")
    if h.get("format") != FORMAT:
        raise KeyMaterialError(f"unsupported key file format {h.get('format')!r}")
    if len(env.sections) != 2:
        raise KeyMaterialError("corrupt key file: wrong number of sections")
    try:
        preset = HEPreset.from_dict(h.get("preset"))
        key_id = bytes.fromhex(str(h.get("key_id")))
    except (ConfigError, ValueError) as exc:
        raise KeyMaterialError(f"corrupt key file: {exc}") from exc
    fp = h.get("fingerprint")
    pub = bytes(env.sections[1])
    if not isinstance(fp, str) or fingerprint_of(pub, key_id, preset) != fp:
        raise KeyMaterialError("corrupt key file: fingerprint does not match its contents")
    return str(kind), preset, fp, env.sections[0], pub


def _context(data: bytes | memoryview) -> ts.Context:
    try:
        return ts.context_from(bytes(data))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise KeyMaterialError(f"corrupt key file: the key context does not load ({exc})") from exc


def _bfv(params: bytes, preset: HEPreset, *, secret_key: bytes | None = None) -> BFVContext:
    ctx = BFVContext(params, secret_key=secret_key)
    if (
        ctx.slots != preset.poly_modulus_degree
        or ctx.coeff_mod_bit_sizes != tuple(preset.coeff_mod_bit_sizes)
        or ctx.plain_modulus.bit_length() != preset.plain_modulus_bits
    ):
        raise KeyMaterialError("corrupt key file: BFV parameters do not match its preset")
    return ctx


def hospital_from_bytes(data: bytes, *, layout: Any = None) -> CKKSHospital | BFVHospital:
    """Load the hospital side from key-file bytes.

    Parameters
    ----------
    data : bytes
        The hospital key file's content.
    layout : fedcrypt.protection.flatten.Layout, optional
        The model's layout (per-tensor quantization blocks, exact integer buffers,
        non-negative variances); see :class:`~fedcrypt.protection.he.bfv.BFVHospital`.

    Raises
    ------
    KeyMaterialError
        If the bytes are not a hospital key file (e.g. a server key file), are corrupt,
        or hold no secret key.
    """
    kind, preset, fp, ctx_bytes, pub = _parse(data)
    if kind != KIND_HOSPITAL:
        raise KeyMaterialError(
            "this is the server (public) key file; a hospital needs the hospital key file"
        )
    if preset.is_packed:
        bfv = _cached("hospital", data, lambda: _bfv(pub, preset, secret_key=bytes(ctx_bytes)))
        return BFVHospital(bfv, preset=preset, fingerprint=fp, layout=layout)

    def build() -> ts.Context:
        ctx = _context(ctx_bytes)
        if public_bytes(ctx) != pub:
            raise KeyMaterialError(
                "corrupt key file: the key context does not match its fingerprint"
            )
        return ctx

    return CKKSHospital(
        _cached("hospital", data, build), preset=preset, fingerprint=fp, layout=layout
    )


def server_from_bytes(data: bytes) -> CKKSAggregator | BFVAggregator:
    """Load the server side from key-file bytes.

    A hospital (secret) key file is refused before its context is deserialized, and a
    context that turns out to hold a secret key is dropped, never used.

    Raises
    ------
    KeyMaterialError
        If the bytes are a hospital (secret) key file, are corrupt, or hold a secret key.
    """
    kind, preset, fp, ctx_bytes, pub = _parse(data)
    if kind != KIND_SERVER:
        raise KeyMaterialError(
            "refusing a hospital (secret) key file on the server: the aggregation server "
            "must only hold server.key, never the secret key"
        )
    if bytes(ctx_bytes) != pub:
        raise KeyMaterialError("corrupt key file: the server context is not the public context")
    if preset.is_packed:
        return BFVAggregator(
            _cached("server", data, lambda: _bfv(pub, preset)), preset=preset, fingerprint=fp
        )

    def build() -> ts.Context:
        ctx = _context(ctx_bytes)
        if ctx.is_private():
            del ctx
            raise KeyMaterialError("refusing a server key file that holds a secret key")
        return ctx

    return CKKSAggregator(_cached("server", data, build), preset=preset, fingerprint=fp)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise KeyMaterialError(f"key file not found: {path}") from exc
    except OSError as exc:
        raise KeyMaterialError(f"cannot read key file {path}: {exc.strerror}") from exc


def check_permissions(path: Path) -> None:
    """Refuse a secret key file that group or others may read or write.

    Raises
    ------
    KeyMaterialError
        If ``path``'s mode grants any permission to group or others (wider than 0600).
    """
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KeyMaterialError(
            f"hospital key file {path} has permissions {mode:04o}, wider than 0600; "
            f"it holds the secret key: run `chmod 600 {path}`"
        )


def load_hospital(path: Path, *, layout: Any = None) -> CKKSHospital | BFVHospital:
    """Load a hospital key file (``layout``: see :func:`hospital_from_bytes`).

    Raises
    ------
    KeyMaterialError
        If the file is missing, corrupt, is the server key file, or its permissions are
        wider than 0600 (refused, not warned).
    """
    data = _read(path)
    check_permissions(Path(path))
    return hospital_from_bytes(data, layout=layout)


def load_server(path: Path) -> CKKSAggregator | BFVAggregator:
    """Load a server key file.

    Raises
    ------
    KeyMaterialError
        If the file is missing, corrupt, or is a hospital (secret) key file.
    """
    return server_from_bytes(_read(path))


def read_info(path: Path) -> KeyFileInfo:
    """Describe a key file without exposing its key.

    Raises
    ------
    KeyMaterialError
        If the file is missing or corrupt.
    """
    data = _read(path)
    kind, preset, fp, ctx_bytes, pub = _parse(data)
    has_secret = False
    if kind == KIND_HOSPITAL:
        if preset.is_packed:
            has_secret = _bfv(pub, preset, secret_key=bytes(ctx_bytes)).is_private()
        else:
            has_secret = _context(ctx_bytes).is_private()
    return KeyFileInfo(kind, preset, fp, has_secret, len(data))


def _write_new(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    if overwrite and path.exists():
        path.unlink()  # recreate so the new mode applies even if the old file was wider
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise KeyMaterialError(f"{path} exists; pass --force to overwrite it") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_key_files(
    out_dir: Path, *, preset: str = DEFAULT_PRESET, overwrite: bool = False
) -> tuple[Path, Path]:
    """Generate keys and write ``out_dir/hospital.key`` (0600) and ``out_dir/server.key``.

    Parameters
    ----------
    out_dir : Path
        Created if missing.
    preset : str
        Preset name or ``custom:N:b1,...:scale`` (default: ``DEFAULT_PRESET``).
    overwrite : bool
        Replace existing files (default: refuse).

    Returns
    -------
    (Path, Path)
        Hospital and server key file paths.

    Raises
    ------
    KeyMaterialError
        If a file exists and ``overwrite`` is false.
    ConfigError, InsecureParametersError
        For an unknown or insecure preset.
    """
    out = Path(out_dir)
    hospital_path = out / HOSPITAL_FILE
    server_path = out / SERVER_FILE
    if not overwrite:
        for p in (hospital_path, server_path):
            if p.exists():
                raise KeyMaterialError(f"{p} exists; pass --force to overwrite it")
    hospital, server = generate_keys(preset)
    out.mkdir(parents=True, exist_ok=True)
    _write_new(hospital_path, hospital, mode=0o600, overwrite=overwrite)
    _write_new(server_path, server, mode=0o644, overwrite=overwrite)
    return hospital_path, server_path
