"""Key files of a ``secagg`` consortium: identity keys, the group-mask key, the public registry.

What real sites hold (``fedcrypt keys generate --protection secagg --hospitals N``):

=====================  ======================================  ======  =====  ================
file                   holds                                   secret  mode   held by
=====================  ======================================  ======  =====  ================
``hospital-<id>.key``  hospital ``id``'s long-term Ed25519     yes     0600   hospital ``id``
                       identity (signing) key                                 only
``group-mask.key``     the consortium's 32-byte group-mask     yes     0600   every hospital,
                       key                                                    never the server
``registry.pub``       every hospital's Ed25519 public key     no      0644   the server and
                                                                              every hospital
=====================  ======================================  ======  =====  ================

Every file is a :mod:`fedcrypt.protection.wire` envelope (never a pickle) with
``scheme = "secagg"``, ``format = 1`` and a ``kind``::

    registry-public     header {consortium, group_mask, hospitals: {"<id>": hex public key},
                                fingerprint}; no sections
    identity-secret     header {consortium, registry, hospital, public_key};
                        section 0: the raw 32-byte Ed25519 private key
    group-mask-secret   header {consortium, registry, check}; section 0: the 32-byte key

``consortium`` is a random id drawn at generation; ``registry`` in the secret files is
the registry's ``fingerprint`` (SHA-256 of its canonical content), so a hospital only
accepts the registry generated with its own key (a server handing hospitals another
registry, with keys of its own, is refused); ``check`` is an HKDF key-check value that
detects a corrupted group-mask key. Loaders refuse a secret file where the public
registry is expected (before reading its key), a secret file readable or writable by
group or others, and any file that fails validation, with
:class:`~fedcrypt.exceptions.KeyMaterialError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcrypt.exceptions import ConfigError, KeyMaterialError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg.config import MAX_HOSPITAL_ID, SecAggParams
from fedcrypt.protection.secagg.hospital import SecAggHospital, raw_ed25519
from fedcrypt.protection.secagg.primitives import DOMAIN, hkdf

SCHEME = "secagg"
FORMAT = 1
KIND_REGISTRY = "registry-public"
KIND_IDENTITY = "identity-secret"
KIND_GROUP_MASK = "group-mask-secret"
SECRET_KINDS = (KIND_IDENTITY, KIND_GROUP_MASK)
REGISTRY_FILE = "registry.pub"
GROUP_MASK_FILE = "group-mask.key"
MAX_HOSPITALS = 4096
"""Most hospitals one registry file may list (keeps its header far below the wire limit)."""
MAX_KEY_FILE_BYTES = 1 << 20


def identity_file(hospital_id: int) -> str:
    """File name of hospital ``hospital_id``'s identity key: ``hospital-<id>.key``."""
    return f"hospital-{hospital_id}.key"


@dataclass(frozen=True)
class Registry:
    """The consortium's public registry: what the server (and every hospital) holds.

    Attributes
    ----------
    consortium : str
        The consortium's random id (32 hex digits).
    keys : mapping of int to Ed25519PublicKey
        ``hospital id -> long-term public key``.
    group_mask : bool
        Whether the consortium uses the group mask (then hospitals hold ``group-mask.key``).
    fingerprint : str
        SHA-256 (hex) of the canonical registry; the secret files name it.
    """

    consortium: str
    keys: Mapping[int, Ed25519PublicKey]
    group_mask: bool
    fingerprint: str

    @property
    def hospital_ids(self) -> tuple[int, ...]:
        """The registered hospital ids, sorted."""
        return tuple(sorted(self.keys))


@dataclass(frozen=True)
class Identity:
    """One hospital's identity key file (SECRET).

    Attributes
    ----------
    consortium : str
        The consortium id.
    registry : str
        Fingerprint of the registry generated with this key.
    hospital_id : int
        The hospital's id.
    signing_key : Ed25519PrivateKey
        Its long-term signing key.
    """

    consortium: str
    registry: str
    hospital_id: int
    signing_key: Ed25519PrivateKey = field(repr=False)


@dataclass(frozen=True)
class GroupMaskKey:
    """The consortium's group-mask key file (SECRET: hospitals only).

    Attributes
    ----------
    consortium : str
        The consortium id.
    registry : str
        Fingerprint of the registry generated with it.
    key : bytes
        The 32-byte key.
    """

    consortium: str
    registry: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class ConsortiumFiles:
    """Paths written by :func:`write_consortium`.

    Attributes
    ----------
    registry : Path
        ``registry.pub`` (public: the server and every hospital).
    group_mask : Path or None
        ``group-mask.key`` (secret: every hospital, never the server); None without the
        group mask.
    identities : dict of int to Path
        ``hospital id -> hospital-<id>.key`` (secret: that hospital only).
    fingerprint : str
        The registry's fingerprint (compare it between sites out of band).
    """

    registry: Path
    group_mask: Path | None
    identities: dict[int, Path]
    fingerprint: str


@dataclass(frozen=True)
class ConsortiumKeys:
    """The bytes of a consortium's key files (:func:`generate_consortium`).

    Attributes
    ----------
    registry : bytes
        The public registry file.
    group_mask : bytes or None
        The group-mask key file (SECRET), if the consortium uses the group mask.
    identities : dict of int to bytes
        Each hospital's identity key file (SECRET).
    """

    registry: bytes
    group_mask: bytes | None = field(repr=False)
    identities: dict[int, bytes] = field(repr=False)


def _canonical(consortium: str, group_mask: bool, hospitals: Mapping[str, str]) -> bytes:
    body = {"consortium": consortium, "group_mask": group_mask, "hospitals": dict(hospitals)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def registry_fingerprint(consortium: str, group_mask: bool, hospitals: Mapping[str, str]) -> str:
    """SHA-256 (hex) of the canonical registry content (see the module docstring)."""
    blob = _canonical(consortium, group_mask, hospitals)
    return hashlib.sha256(DOMAIN + b"registry\x00" + blob).hexdigest()


def key_check(key: bytes) -> str:
    """HKDF key-check value (16 bytes, hex) of a group-mask key: detects corruption."""
    return hkdf(key, info=b"group-mask-key-check\x00")[:16].hex()


def generate_consortium(hospitals: int, *, group_mask: bool = True) -> ConsortiumKeys:
    """Fresh key files for hospitals ``0 .. hospitals - 1`` (their Flower partition ids).

    Parameters
    ----------
    hospitals : int
        Number of hospitals, 2 to :data:`MAX_HOSPITALS`.
    group_mask : bool, optional
        Generate the consortium's group-mask key (default: True).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If ``hospitals`` is out of range.
    """
    if isinstance(hospitals, bool) or not isinstance(hospitals, int):
        raise ConfigError(f"hospitals must be an int, got {hospitals!r}")
    if not 2 <= hospitals <= MAX_HOSPITALS:
        raise ConfigError(
            f"a secagg consortium needs 2 to {MAX_HOSPITALS} hospitals, got {hospitals}"
        )
    consortium = secrets.token_hex(16)
    signing = {i: Ed25519PrivateKey.generate() for i in range(hospitals)}
    public = {str(i): raw_ed25519(k.public_key()).hex() for i, k in signing.items()}
    fp = registry_fingerprint(consortium, group_mask, public)
    base = {"scheme": SCHEME, "format": FORMAT, "consortium": consortium}
    registry = wire.pack(
        {
            **base,
            "kind": KIND_REGISTRY,
            "group_mask": group_mask,
            "hospitals": public,
            "fingerprint": fp,
        },
        [],
    )
    identities = {
        i: wire.pack(
            {
                **base,
                "kind": KIND_IDENTITY,
                "registry": fp,
                "hospital": i,
                "public_key": public[str(i)],
            },
            [k.private_bytes_raw()],
        )
        for i, k in signing.items()
    }
    mask: bytes | None = None
    if group_mask:
        key = secrets.token_bytes(32)
        mask = wire.pack(
            {**base, "kind": KIND_GROUP_MASK, "registry": fp, "check": key_check(key)}, [key]
        )
    return ConsortiumKeys(registry=registry, group_mask=mask, identities=identities)


# -- parsing -----------------------------------------------------------------------------
def _envelope(data: bytes | memoryview) -> wire.Envelope:
    try:
        env = wire.unpack(data, expect_scheme=SCHEME)
    except ProtocolError as exc:
        raise KeyMaterialError(f"not a fedcrypt secagg key file ({exc})") from exc
    h = env.header
    if h.get("kind") not in (KIND_REGISTRY, *SECRET_KINDS):
        raise KeyMaterialError("not a fedcrypt secagg key file: unknown key kind")
    if h.get("format") != FORMAT:
        raise KeyMaterialError(f"unsupported secagg key file format {h.get('format')!r}")
    return env


def _hex(v: Any, nbytes: int, what: str) -> str:
    if not isinstance(v, str) or len(v) != 2 * nbytes or v.strip("0123456789abcdef"):
        raise KeyMaterialError(f"corrupt secagg key file: {what} is invalid")
    return v


def _hexfield(h: Mapping[str, Any], key: str, nbytes: int) -> str:
    return _hex(h.get(key), nbytes, f"field {key!r}")


def _hospital_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_HOSPITAL_ID:
        raise KeyMaterialError("corrupt secagg key file: invalid hospital id")
    return value


def registry_from_bytes(data: bytes | memoryview) -> Registry:
    """Parse and verify a registry file.

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If the bytes are a secret key file (refused before its key is read: the server
        must hold only the registry), or are not a valid registry.
    """
    env = _envelope(data)
    h = env.header
    if h["kind"] in SECRET_KINDS:
        raise KeyMaterialError(
            f"refusing a secret secagg key file ({h['kind']}) where the public registry "
            f"is expected: the server must hold only {REGISTRY_FILE}"
        )
    if env.sections:
        raise KeyMaterialError("corrupt secagg registry: unexpected sections")
    consortium = _hexfield(h, "consortium", 16)
    group_mask = h.get("group_mask")
    hospitals = h.get("hospitals")
    if not isinstance(group_mask, bool) or not isinstance(hospitals, dict):
        raise KeyMaterialError("corrupt secagg registry: invalid fields")
    if not 2 <= len(hospitals) <= MAX_HOSPITALS:
        raise KeyMaterialError(f"corrupt secagg registry: {len(hospitals)} hospitals")
    keys: dict[int, Ed25519PublicKey] = {}
    for sid, pk in hospitals.items():
        if not (isinstance(sid, str) and sid.isdigit() and str(int(sid)) == sid):
            raise KeyMaterialError("corrupt secagg registry: invalid hospital id")
        hid = _hospital_id(int(sid))
        raw = _hex(pk, 32, f"public key of hospital {hid}")
        keys[hid] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw))
    fp = registry_fingerprint(consortium, group_mask, hospitals)
    if h.get("fingerprint") != fp:
        raise KeyMaterialError("corrupt secagg registry: fingerprint does not match its contents")
    return Registry(consortium=consortium, keys=keys, group_mask=group_mask, fingerprint=fp)


def identity_from_bytes(data: bytes | memoryview) -> Identity:
    """Parse and verify a hospital identity key file.

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If the bytes are the registry or the group-mask key, or are not a valid identity.
    """
    env = _envelope(data)
    h = env.header
    if h["kind"] == KIND_REGISTRY:
        raise KeyMaterialError(
            "this is the public registry; a hospital's identity key is its own hospital-<id>.key"
        )
    if h["kind"] != KIND_IDENTITY:
        raise KeyMaterialError("this is the group-mask key, not a hospital identity key")
    consortium = _hexfield(h, "consortium", 16)
    registry = _hexfield(h, "registry", 32)
    hid = _hospital_id(h.get("hospital"))
    public = _hexfield(h, "public_key", 32)
    if len(env.sections) != 1 or len(env.sections[0]) != 32:
        raise KeyMaterialError("corrupt secagg identity key: the key is not 32 bytes")
    key = Ed25519PrivateKey.from_private_bytes(bytes(env.sections[0]))
    if raw_ed25519(key.public_key()).hex() != public:
        raise KeyMaterialError("corrupt secagg identity key: key does not match its public key")
    return Identity(consortium=consortium, registry=registry, hospital_id=hid, signing_key=key)


def group_mask_from_bytes(data: bytes | memoryview) -> GroupMaskKey:
    """Parse and verify a group-mask key file.

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If the bytes are another kind of key file or the key fails its check value.
    """
    env = _envelope(data)
    h = env.header
    if h["kind"] != KIND_GROUP_MASK:
        raise KeyMaterialError(f"this is a {h['kind']} file, not the consortium's group-mask key")
    consortium = _hexfield(h, "consortium", 16)
    registry = _hexfield(h, "registry", 32)
    if len(env.sections) != 1 or len(env.sections[0]) != 32:
        raise KeyMaterialError("corrupt secagg group-mask key: the key is not 32 bytes")
    key = bytes(env.sections[0])
    if h.get("check") != key_check(key):
        raise KeyMaterialError("corrupt secagg group-mask key: check value does not match")
    return GroupMaskKey(consortium=consortium, registry=registry, key=key)


# -- files -------------------------------------------------------------------------------
def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise KeyMaterialError(f"key file not found: {path}") from exc
    except OSError as exc:
        raise KeyMaterialError(f"cannot read key file {path}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyMaterialError(f"{path} is too large to be a secagg key file")
    return data


def check_secret_permissions(path: Path) -> None:
    """Refuse a secret key file that group or others may read or write.

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If ``path``'s mode grants any permission to group or others (wider than 0600).
    """
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KeyMaterialError(
            f"secret key file {path} has permissions {mode:04o}, wider than 0600: "
            f"run `chmod 600 {path}`"
        )


def load_registry(path: str | os.PathLike[str]) -> Registry:
    """Load ``registry.pub`` (the server's only key material).

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If missing, corrupt, or a secret key file.
    """
    return registry_from_bytes(_read(Path(path)))


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load a hospital's identity key file (0600 required).

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If missing, corrupt, another kind of file, or readable by group or others.
    """
    data = _read(Path(path))
    check_secret_permissions(Path(path))
    return identity_from_bytes(data)


def load_group_mask(path: str | os.PathLike[str]) -> GroupMaskKey:
    """Load the consortium's group-mask key file (0600 required).

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If missing, corrupt, another kind of file, or readable by group or others.
    """
    data = _read(Path(path))
    check_secret_permissions(Path(path))
    return group_mask_from_bytes(data)


def _write_new(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    if overwrite and (path.exists() or path.is_symlink()):
        path.unlink()  # recreate so the new mode applies even if the old file was wider
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise KeyMaterialError(f"{path} exists; pass --force to overwrite it") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # os.open's mode is filtered by the umask


def write_consortium(
    out_dir: str | os.PathLike[str],
    *,
    hospitals: int,
    group_mask: bool = True,
    overwrite: bool = False,
) -> ConsortiumFiles:
    """Generate a consortium's key files into ``out_dir`` (created if missing).

    Writes ``registry.pub`` (0644), ``group-mask.key`` (0600, with the group mask) and
    ``hospital-<id>.key`` (0600) for ids ``0 .. hospitals - 1``. Give each hospital its own
    identity file, the group-mask key and the registry; give the server the registry only.

    Parameters
    ----------
    out_dir : path
        Target folder.
    hospitals : int
        Number of hospitals, 2 to :data:`MAX_HOSPITALS`.
    group_mask : bool, optional
        Also generate the consortium's group-mask key (default: True).
    overwrite : bool, optional
        Replace existing files (default: refuse).

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If a target file exists and ``overwrite`` is false (nothing is written then).
    fedcrypt.exceptions.ConfigError
        If ``hospitals`` is out of range.
    """
    keys = generate_consortium(hospitals, group_mask=group_mask)
    out = Path(out_dir)
    targets = {out / REGISTRY_FILE: (keys.registry, 0o644)}
    if keys.group_mask is not None:
        targets[out / GROUP_MASK_FILE] = (keys.group_mask, 0o600)
    for hid, blob in keys.identities.items():
        targets[out / identity_file(hid)] = (blob, 0o600)
    if not overwrite:
        for path in targets:
            if path.exists() or path.is_symlink():
                raise KeyMaterialError(f"{path} exists; pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    for path, (blob, mode) in targets.items():
        _write_new(path, blob, mode=mode, overwrite=overwrite)
    return ConsortiumFiles(
        registry=out / REGISTRY_FILE,
        group_mask=out / GROUP_MASK_FILE if keys.group_mask is not None else None,
        identities={hid: out / identity_file(hid) for hid in keys.identities},
        fingerprint=registry_from_bytes(keys.registry).fingerprint,
    )


def open_hospital(
    *,
    identity: str | os.PathLike[str],
    registry: str | os.PathLike[str],
    params: SecAggParams,
    group_mask: str | os.PathLike[str] | None = None,
    state_file: str | os.PathLike[str] | None = None,
) -> SecAggHospital:
    """A :class:`SecAggHospital` from a site's key files, cross-checked.

    Parameters
    ----------
    identity : path
        This hospital's ``hospital-<id>.key`` (0600).
    registry : path
        The consortium's ``registry.pub`` generated with it.
    params : SecAggParams
        The consortium's parameters (``params.group_mask`` must match the registry).
    group_mask : path, optional
        ``group-mask.key`` (0600); required when the consortium uses the group mask.
    state_file : path, optional
        Passed to :class:`SecAggHospital` (persisted progress).

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If a file is missing, corrupt, too widely readable, of another kind, or the files
        do not belong together (other consortium, other registry, key not registered).
    fedcrypt.exceptions.ConfigError
        If ``params.group_mask`` disagrees with the registry, or the group-mask key is
        missing.
    """
    ident = load_identity(identity)
    reg = load_registry(registry)
    if ident.consortium != reg.consortium or ident.registry != reg.fingerprint:
        raise KeyMaterialError(
            f"{identity} was not generated with this registry (fingerprint {reg.fingerprint})"
        )
    own = reg.keys.get(ident.hospital_id)
    if own is None or raw_ed25519(own) != raw_ed25519(ident.signing_key.public_key()):
        raise KeyMaterialError(f"hospital {ident.hospital_id}'s key is not in the registry")
    if params.group_mask != reg.group_mask:
        raise ConfigError(
            f"the registry says group_mask={reg.group_mask}, the parameters "
            f"group_mask={params.group_mask}"
        )
    key: bytes | None = None
    if reg.group_mask:
        if group_mask is None:
            raise ConfigError(f"this consortium uses the group mask: pass {GROUP_MASK_FILE}")
        gm = load_group_mask(group_mask)
        if gm.consortium != reg.consortium or gm.registry != reg.fingerprint:
            raise KeyMaterialError(f"{group_mask} belongs to another consortium")
        key = gm.key
    return SecAggHospital(
        ident.hospital_id,
        signing_key=ident.signing_key,
        registry=reg.keys,
        params=params,
        consortium_key=key,
        state_file=state_file,
    )
