"""secagg federations' public registry, parameters and enrolled hospitals.

The portal holds only the consortium's ``registry.pub`` (public keys): it checks a
hospital's enrolment (an Ed25519 proof of possession, :mod:`fedcrypt.portal.secagg`)
with it and binds the account to that hospital id, so every stage reply is authenticated
by the API token and by the hospital's registered key.
"""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedcrypt.exceptions import FedcryptError, KeyMaterialError
from fedcrypt.portal.context import Portal
from fedcrypt.portal.errors import (
    ConflictError,
    ForbiddenError,
    InvalidContentError,
)
from fedcrypt.portal.models import (
    FED_RUNNING,
    Federation,
    SecAggMember,
    User,
)
from fedcrypt.portal.schemas import (
    MAX_ID,
    SecAggMemberPublic,
)
from fedcrypt.portal.secagg import (
    default_params,
    params_from_json,
    params_to_text,
    verify_enrolment,
)
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services.audit import record
from fedcrypt.portal.services.blobs import delete_if_unreferenced
from fedcrypt.protection.secagg import SecAggParams
from fedcrypt.protection.secagg.keys import Registry, registry_from_bytes

#: Largest ``registry.pub`` accepted (the loader's own limit).
MAX_REGISTRY_BYTES = 1 << 20


# --- the federation's registry and parameters --------------------------------------------


def params_of(fed: Federation) -> SecAggParams:
    """The federation's :class:`SecAggParams` (stored with its registry).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation has no registry yet.
    """
    if fed.secagg_params is None:
        raise ConflictError("this secagg federation has no registry (registry.pub) yet")
    return params_from_json(json.loads(fed.secagg_params))


def registry_of(portal: Portal, fed: Federation) -> Registry:
    """The federation's public registry (parsed once per process).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation has no registry yet.
    """
    sha = fed.server_key_sha256
    if sha is None:
        raise ConflictError("this secagg federation has no registry (registry.pub) yet")
    cached = portal.registries.get(sha)
    if cached is None:
        cached = registry_from_bytes(portal.store.read_bytes(sha))
        portal.registries[sha] = cached
    return cached


def parse_registry(data: bytes) -> Registry:
    """Check a ``registry.pub`` upload.

    Raises
    ------
    fedcrypt.portal.errors.InvalidContentError
        If it is not a valid public registry (a secret ``hospital-<i>.key`` or
        ``group-mask.key`` is refused before its key is read), is too large, or names a
        hospital id above 2^31 - 1.
    """
    if len(data) > MAX_REGISTRY_BYTES:
        raise InvalidContentError("the registry exceeds the size limit of a registry.pub file")
    try:
        reg = registry_from_bytes(data)
    except KeyMaterialError as exc:
        raise InvalidContentError(f"not a usable secagg registry: {exc}") from exc
    if max(reg.keys) > MAX_ID:
        raise InvalidContentError(f"the registry names hospital ids above {MAX_ID}")
    return reg


def set_registry(
    portal: Portal, db: Session, fed: Federation, data: bytes, *, actor: User, client_ip: str
) -> Federation:
    """Store a ``secagg`` federation's public ``registry.pub`` and fix its parameters.

    The parameters are :func:`~fedcrypt.portal.secagg.default_params` for the registry's
    size and group-mask choice; hospitals read them from the federation and refuse a
    session with other ones.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation is not ``secagg`` or already running.
    fedcrypt.portal.errors.InvalidContentError
        If the file is not a public registry (see :func:`parse_registry`).
    """
    if not feds.scheme_of(fed).staged:
        raise ConflictError(f"a {feds.scheme_of(fed).name} federation takes no registry")
    if fed.status != "draft":
        raise ConflictError("the registry cannot change once the federation is running")
    reg = parse_registry(data)
    try:
        params = default_params(hospitals=len(reg.keys), group_mask=reg.group_mask)
    except FedcryptError as exc:
        raise InvalidContentError(f"the registry does not fit secagg's bounds: {exc}") from exc
    old = fed.server_key_sha256
    sha = portal.store.put_bytes(data)
    portal.registries[sha] = reg
    fed.server_key_sha256 = sha
    fed.server_key_size = len(data)
    fed.key_fingerprint = reg.fingerprint
    fed.secagg_params = params_to_text(params)
    record(
        db,
        at=portal.clock(),
        actor=actor,
        action="federation.registry",
        target=fed.name,
        detail=(
            f"fingerprint {reg.fingerprint[:16]}…, {len(reg.keys)} hospitals, group mask "
            f"{'on' if reg.group_mask else 'OFF'}, {len(data)} bytes"
        ),
        client_ip=client_ip,
    )
    db.commit()
    if old is not None and old != sha:
        delete_if_unreferenced(portal, old)
    return fed


def require_secagg(fed: Federation) -> None:
    if not feds.scheme_of(fed).staged:
        raise ConflictError(
            f"federation {fed.name!r} uses {feds.scheme_of(fed).name}: it has no secagg relay"
        )


# --- members ----------------------------------------------------------------------------


def member_of(db: Session, fed: Federation, user_id: int) -> SecAggMember | None:
    """The enrolment of account ``user_id`` in ``fed``, if any."""
    return db.scalar(
        select(SecAggMember).where(
            SecAggMember.federation_id == fed.id, SecAggMember.user_id == user_id
        )
    )


def member_public(m: SecAggMember) -> SecAggMemberPublic:
    """The API view of an enrolment."""
    return SecAggMemberPublic(
        hospital_id=m.hospital_id,
        user_id=m.user_id,
        hospital=m.user.name,
        enrolled_at=m.enrolled_at,
    )


def list_members(db: Session, fed: Federation) -> list[SecAggMember]:
    """The federation's enrolled hospitals, in order of enrolment."""
    return list(
        db.scalars(
            select(SecAggMember)
            .where(SecAggMember.federation_id == fed.id)
            .order_by(SecAggMember.id)
        )
    )


def enrol(
    portal: Portal,
    db: Session,
    fed: Federation,
    user: User,
    *,
    hospital_id: int,
    signature: str,
    client_ip: str,
) -> tuple[SecAggMember, bool]:
    """Enrol ``user`` as hospital ``hospital_id`` of the registry; return it and whether new.

    Idempotent for the same account and id.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation is not a running ``secagg`` one, the account is enrolled as
        another hospital, or the hospital by another account.
    fedcrypt.portal.errors.InvalidContentError
        If ``hospital_id`` is not in the registry.
    fedcrypt.portal.errors.ForbiddenError
        If the signature is not that hospital's enrolment for this account (see
        :mod:`fedcrypt.portal.secagg`).
    """
    require_secagg(fed)
    if fed.status != FED_RUNNING:
        raise ConflictError(
            f"federation {fed.name!r} is {fed.status}: hospitals enrol while it runs"
        )
    reg = registry_of(portal, fed)
    key = reg.keys.get(hospital_id)
    if key is None:
        ids = reg.hospital_ids
        raise InvalidContentError(
            f"hospital {hospital_id} is not in the federation's registry (hospitals "
            f"{ids[0]}..{ids[-1]}, fingerprint {reg.fingerprint[:16]}…)"
        )
    if not verify_enrolment(
        key,
        signature,
        registry_fingerprint=reg.fingerprint,
        federation_id=fed.id,
        account_id=user.id,
        hospital_id=hospital_id,
    ):
        raise ForbiddenError(
            f"the enrolment is not signed by hospital {hospital_id}'s registered key: sign "
            f"it with hospital-{hospital_id}.key of the registry {reg.fingerprint[:16]}…"
        )
    mine = member_of(db, fed, user.id)
    if mine is not None:
        if mine.hospital_id == hospital_id:
            return mine, False
        raise ConflictError(
            f"this account is already enrolled in {fed.name!r} as hospital {mine.hospital_id}"
        )
    taken = db.scalar(
        select(SecAggMember).where(
            SecAggMember.federation_id == fed.id, SecAggMember.hospital_id == hospital_id
        )
    )
    if taken is not None:
        raise ConflictError(
            f"hospital {hospital_id} of the registry is already enrolled by another account "
            f"({taken.user.name})"
        )
    now = portal.clock()
    row = SecAggMember(
        federation_id=fed.id, user_id=user.id, hospital_id=hospital_id, enrolled_at=now
    )
    db.add(row)
    record(
        db,
        at=now,
        actor=user,
        action="secagg.enrol",
        target=fed.name,
        detail=f"as hospital {hospital_id} of the registry {reg.fingerprint[:16]}…",
        client_ip=client_ip,
    )
    try:
        db.commit()
    except IntegrityError as exc:
        db.rollback()
        raise ConflictError("another enrolment for this hospital arrived at the same time") from exc
    db.refresh(row)
    return row, True
