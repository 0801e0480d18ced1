"""Federations: creation, settings, the public key context, the initial model, rounds."""

from __future__ import annotations

import json
import shlex
import warnings
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from fedcrypt.exceptions import FedcryptError
from fedcrypt.portal.context import Portal
from fedcrypt.portal.errors import ConflictError, InvalidContentError, NotFoundError
from fedcrypt.portal.models import (
    FED_CANCELLED,
    FED_DRAFT,
    FED_FINISHED,
    FED_RUNNING,
    ROUND_AGGREGATED,
    ROUND_AGGREGATING,
    ROUND_CANCELLED,
    ROUND_FAILED,
    ROUND_OPEN,
    Federation,
    Round,
    SecAggAttempt,
    SecAggMember,
    SecAggMessage,
    Upload,
    User,
)
from fedcrypt.portal.schemas import (
    FederationCreate,
    FederationPublic,
    FederationUpdate,
)
from fedcrypt.portal.services.audit import record
from fedcrypt.portal.services.blobs import delete_if_unreferenced
from fedcrypt.portal.storage import PendingBlob
from fedcrypt.protection.base import Scheme, ServerAggregator
from fedcrypt.protection.registry import get_scheme

#: Settings that change at any time.
ALWAYS_EDITABLE = frozenset(
    {"dataset_description", "quorum", "round_deadline_minutes", "num_rounds"}
)
#: How hospitals train: correctable until round 1 has an upload.
TRAINING_SETTINGS = frozenset({"local_epochs", "lr", "batch_size", "local_overrides"})
#: What defines the shared model: correctable until round 1 has an upload; on a running
#: federation a change returns it to draft (the initial model no longer fits).
MODEL_SETTINGS = frozenset(
    {"model", "task", "dataset", "image_size", "protection", "he_preset", "model_size"}
)
#: Settings whose change invalidates the stored public key context.
KEY_SETTINGS = frozenset({"protection", "he_preset"})


def scheme_named(name: str) -> Scheme:
    """The protection mode stored as ``name`` (rows written before the rename say ``ckks``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_scheme(name)


def scheme_of(fed: Federation) -> Scheme:
    """The protection mode of ``fed`` (rows written before the rename say ``ckks``: ``he``)."""
    return scheme_named(fed.protection)


def get_federation(db: Session, federation_id: int) -> Federation:
    """Load a federation.

    Raises
    ------
    fedcrypt.portal.errors.NotFoundError
        If it does not exist.
    """
    fed = db.get(Federation, federation_id)
    if fed is None:
        raise NotFoundError(f"no federation with id {federation_id}")
    return fed


def list_federations(db: Session) -> list[Federation]:
    """Every federation, newest first."""
    return list(db.scalars(select(Federation).order_by(Federation.id.desc())))


def latest_round(db: Session, fed: Federation) -> Round | None:
    """The federation's highest-numbered round (open, aggregating or aggregated)."""
    return db.scalar(
        select(Round).where(Round.federation_id == fed.id).order_by(Round.number.desc()).limit(1)
    )


def get_round(db: Session, fed: Federation, number: int) -> Round:
    """Load round ``number`` of ``fed``.

    Raises
    ------
    fedcrypt.portal.errors.NotFoundError
        If the round has not been opened.
    """
    rnd = db.scalar(select(Round).where(Round.federation_id == fed.id, Round.number == number))
    if rnd is None:
        raise NotFoundError(f"federation {fed.name!r} has no round {number} (yet)")
    return rnd


def members(db: Session, fed: Federation) -> list[User]:
    """Hospitals taking part in ``fed``: those that have uploaded at least one update, by
    first upload (``secagg``: those enrolled, by enrolment)."""
    if scheme_of(fed).staged:
        return list(
            db.scalars(
                select(User)
                .join(SecAggMember, SecAggMember.user_id == User.id)
                .where(SecAggMember.federation_id == fed.id)
                .order_by(SecAggMember.id)
            )
        )
    first = (
        select(Upload.user_id, func.min(Upload.id).label("first"))
        .join(Round, Round.id == Upload.round_id)
        .where(Round.federation_id == fed.id)
        .group_by(Upload.user_id)
        .subquery()
    )
    return list(
        db.scalars(select(User).join(first, first.c.user_id == User.id).order_by(first.c.first))
    )


def is_member(db: Session, fed: Federation, user: User) -> bool:
    """Whether ``user`` has uploaded to ``fed`` (``secagg``: is enrolled in it)."""
    if scheme_of(fed).staged:
        enrolled = select(SecAggMember.id).where(
            SecAggMember.federation_id == fed.id, SecAggMember.user_id == user.id
        )
        return db.scalar(enrolled.limit(1)) is not None
    q = (
        select(Upload.id)
        .join(Round, Round.id == Upload.round_id)
        .where(Round.federation_id == fed.id, Upload.user_id == user.id)
        .limit(1)
    )
    return db.scalar(q) is not None


def to_public(db: Session, fed: Federation, *, base_url: str | None = None) -> FederationPublic:
    """The API view of a federation, with its current round and the join command."""
    out = FederationPublic.model_validate(fed)
    rnd = latest_round(db, fed)
    out.current_round = rnd.number if rnd is not None else None
    out.join_command = join_command(fed, base_url=base_url)
    return out


def join_command(fed: Federation, *, base_url: str | None = None) -> str:
    """The exact command a hospital runs to take part (its token comes from the environment).

    The training settings come from the federation itself; the command names only what
    is the hospital's own: the portal, its key files (``he``: the consortium's
    ``hospital.key``; ``secagg``: its own ``hospital-<id>.key`` and the consortium's
    ``group-mask.key``), where its data is, and the folder for its records.
    """
    parts = ["fedcrypt", "portal", "participate", shlex.quote(fed.name)]
    if base_url:
        parts += ["--url", shlex.quote(base_url)]
    parts += ["--rounds", str(fed.num_rounds)]
    scheme = scheme_of(fed)
    if scheme.key_pair:
        parts += ["--key", "hospital.key"]
    if scheme.staged:
        parts += ["--key", "hospital-ID.key"]
        params = json.loads(fed.secagg_params) if fed.secagg_params else {}
        if params.get("group_mask", True):
            parts += ["--group-mask-key", "group-mask.key"]
    if fed.task is None and fed.dataset not in (None, "wdbc"):
        parts += ["--data-dir", "DATA_DIR"]
    parts += ["--out", "hospital-out"]
    return " ".join(parts)


def settings_summary(fed: Federation) -> str:
    """The federation's training settings in one line (audit log, CLI)."""
    what = f"task={fed.task}" if fed.task else f"dataset={fed.dataset or '-'}"
    local = fed.local_overrides or "none"
    return (
        f"model={fed.model} {what} epochs={fed.local_epochs} lr={fed.lr or 'default'} "
        f"batch={fed.batch_size} image={fed.image_size or '-'} protection={fed.protection} "
        f"preset={fed.he_preset or '-'} local-overrides={local}"
    )


def create_federation(
    portal: Portal, db: Session, data: FederationCreate, *, actor: User, client_ip: str
) -> Federation:
    """Create a federation in ``draft`` state (no rounds until the model is published).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the name is taken.
    """
    if db.scalar(select(Federation.id).where(Federation.name == data.name)) is not None:
        raise ConflictError(f"a federation named {data.name!r} already exists")
    now = portal.clock()
    fed = Federation(
        name=data.name,
        model=data.model,
        task=data.task,
        dataset=data.dataset,
        local_epochs=data.local_epochs,
        lr=data.lr,
        batch_size=data.batch_size,
        image_size=data.image_size,
        local_overrides=",".join(data.local_overrides),
        dataset_description=data.dataset_description,
        protection=data.protection,
        he_preset=data.he_preset,
        quorum=data.quorum,
        round_deadline_minutes=data.round_deadline_minutes,
        num_rounds=data.num_rounds,
        model_size=data.model_size,
        status=FED_DRAFT,
        created_at=now,
    )
    db.add(fed)
    db.flush()
    record(
        db,
        at=now,
        actor=actor,
        action="federation.create",
        target=fed.name,
        detail=(
            f"{settings_summary(fed)} quorum={fed.quorum} rounds={fed.num_rounds} "
            f"deadline={fed.round_deadline_minutes:g} min"
        ),
        client_ip=client_ip,
    )
    db.commit()
    return fed


def round_one_started(db: Session, fed: Federation) -> bool:
    """Whether any hospital has uploaded to the federation (round 1 has begun); under
    ``secagg``, whether any hospital has joined a session."""
    if scheme_of(fed).staged:
        joined = (
            select(SecAggMessage.id)
            .join(SecAggAttempt, SecAggAttempt.id == SecAggMessage.attempt_id)
            .where(SecAggAttempt.federation_id == fed.id)
        )
        return db.scalar(joined.limit(1)) is not None
    q = (
        select(Upload.id)
        .join(Round, Round.id == Upload.round_id)
        .where(Round.federation_id == fed.id)
    )
    return db.scalar(q.limit(1)) is not None


def update_federation(
    portal: Portal,
    db: Session,
    fed: Federation,
    data: FederationUpdate,
    *,
    actor: User,
    client_ip: str,
) -> Federation:
    """Correct a federation's settings (see :class:`~fedcrypt.portal.schemas.FederationUpdate`).

    The description, quorum, deadline and number of rounds change at any time. The
    training and model settings change only until round 1 has an upload; a change of
    the model settings of a running federation returns it to ``draft``: round 1 is
    removed, the initial model must be published again, and the server key too if the
    protection or preset changed.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation has finished or was cancelled, a setting can no longer change,
        ``num_rounds`` is below the current round, or the result is inconsistent.
    """
    if fed.status in (FED_FINISHED, FED_CANCELLED):
        raise ConflictError(f"the federation is {fed.status}; its settings are final")
    changes: dict[str, Any] = {
        k: v for k, v in data.model_dump(exclude_unset=True).items() if getattr(fed, k) != v
    }
    if "local_overrides" in changes:
        changes["local_overrides"] = ",".join(changes["local_overrides"] or [])
        if changes["local_overrides"] == fed.local_overrides:
            del changes["local_overrides"]
    if changes.get("protection") is not None and (
        scheme_named(changes["protection"]).name == scheme_of(fed).name
    ):
        del changes["protection"]  # "he" for a row that says "ckks": the same mode
    for key in (
        "quorum",
        "round_deadline_minutes",
        "num_rounds",
        "model",
        "local_epochs",
        "batch_size",
        "protection",
        "dataset_description",
    ):
        if key in changes and changes[key] is None:
            raise ConflictError(f"{key} cannot be cleared")
    fixed = set(changes) - ALWAYS_EDITABLE
    if fixed and round_one_started(db, fed):
        raise ConflictError(
            f"{', '.join(sorted(fixed))} cannot change once round 1 has an upload; cancel "
            "the federation and create a new one"
        )
    rnd = latest_round(db, fed)
    if "num_rounds" in changes and rnd is not None and changes["num_rounds"] < rnd.number:
        raise ConflictError(f"num_rounds cannot be below the current round ({rnd.number})")
    merged = {k: getattr(fed, k) for k in ("task", "dataset", "protection", "he_preset")}
    merged.update({k: v for k, v in changes.items() if k in merged})
    if merged["task"] is not None and merged["dataset"] is not None:
        raise ConflictError("give a task (which brings its own data) or a dataset, not both")
    if not scheme_named(str(merged["protection"])).key_pair and merged["he_preset"]:
        raise ConflictError("an HE preset applies to protection 'he' only")
    quorum = changes.get("quorum", fed.quorum)
    if scheme_named(str(merged["protection"])).staged and quorum < 2:
        raise ConflictError("a secagg round needs at least 2 hospitals: quorum must be >= 2")
    old_blobs = (fed.initial_model_sha256, fed.server_key_sha256)
    reverted = ""
    if fed.status == FED_RUNNING and set(changes) & MODEL_SETTINGS:
        reverted = _back_to_draft(portal, db, fed, drop_key=bool(set(changes) & KEY_SETTINGS))
    elif fed.status == FED_DRAFT and set(changes) & KEY_SETTINGS and fed.server_key_sha256:
        _drop_server_key(portal, db, fed)
        reverted = "; the server key was removed (upload it again)"
    for key, value in changes.items():
        setattr(fed, key, value)
    record(
        db,
        at=portal.clock(),
        actor=actor,
        action="federation.update",
        target=fed.name,
        detail=", ".join(f"{k}={v}" for k, v in changes.items()) + reverted,
        client_ip=client_ip,
    )
    db.commit()
    delete_if_unreferenced(portal, *old_blobs)
    return fed


def _drop_server_key(portal: Portal, db: Session, fed: Federation) -> None:
    """Forget the public key file (``server.key`` or ``registry.pub``) and what hangs on it."""
    if fed.server_key_sha256 is not None:
        portal.aggregators.pop(fed.server_key_sha256, None)
        portal.registries.pop(fed.server_key_sha256, None)
    fed.server_key_sha256 = None
    fed.server_key_size = None
    fed.key_fingerprint = None
    fed.secagg_params = None
    db.execute(delete(SecAggMember).where(SecAggMember.federation_id == fed.id))


def _back_to_draft(portal: Portal, db: Session, fed: Federation, *, drop_key: bool) -> str:
    """Undo publishing (round 1 has no upload): the federation is a draft again."""
    db.execute(delete(SecAggAttempt).where(SecAggAttempt.federation_id == fed.id))
    db.execute(delete(Round).where(Round.federation_id == fed.id))
    fed.status = FED_DRAFT
    fed.initial_model_sha256 = None
    fed.initial_model_size = None
    if drop_key:
        _drop_server_key(portal, db, fed)
    return "; back to draft: publish the initial model again" + (
        " and the server key" if drop_key else ""
    )


def cancel_federation(
    portal: Portal, db: Session, fed: Federation, *, reason: str, actor: User, client_ip: str
) -> Federation:
    """Cancel a federation: its open round closes, uploads are refused, its data stays.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation has finished or is already cancelled.
    """
    with portal.aggregation_lock:
        db.refresh(fed)
        if fed.status in (FED_FINISHED, FED_CANCELLED):
            raise ConflictError(f"the federation is already {fed.status}")
        now = portal.clock()
        db.execute(
            update(Round)
            .where(
                Round.federation_id == fed.id,
                Round.status.in_((ROUND_OPEN, ROUND_FAILED, ROUND_AGGREGATING)),
            )
            .values(status=ROUND_CANCELLED)
        )
        fed.status = FED_CANCELLED
        fed.cancelled_at = now
        fed.cancel_reason = reason.strip() or None
        blobs: list[str] = []
        if scheme_of(fed).staged:
            from fedcrypt.portal.services import relay  # relay imports this module

            blobs = relay.abandon(portal, db, fed, now)
        record(
            db,
            at=now,
            actor=actor,
            action="federation.cancel",
            target=fed.name,
            detail=reason.strip(),
            client_ip=client_ip,
        )
        db.commit()
    delete_if_unreferenced(portal, *blobs)
    return fed


def load_aggregator(portal: Portal, fed: Federation) -> ServerAggregator:
    """The server half of the federation's scheme (public key material only).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If a ``ckks`` federation has no public key context yet.
    fedcrypt.portal.errors.InvalidContentError
        If the stored key cannot be loaded.
    """
    if not scheme_of(fed).key_pair:
        return scheme_of(fed).server_aggregator()
    if fed.server_key_sha256 is None:
        raise ConflictError("this he federation has no public key context (server.key) yet")
    cached = portal.aggregators.get(fed.server_key_sha256)
    if cached is not None:
        return cached
    agg = aggregator_from_key(portal.store.read_bytes(fed.server_key_sha256))
    portal.aggregators[fed.server_key_sha256] = agg
    return agg


def aggregator_from_key(data: bytes) -> ServerAggregator:
    """Load the server half of ``ckks`` from a public ``server.key``'s bytes.

    Raises
    ------
    fedcrypt.portal.errors.InvalidContentError
        If ckks is unavailable, or the bytes are not a public server key (a hospital key
        holding the secret key is refused by
        :func:`fedcrypt.protection.he.keys.server_from_bytes`).
    """
    try:
        from fedcrypt.protection.he.keys import server_from_bytes
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InvalidContentError(f"ckks is not available on this server: {exc}") from exc
    try:
        agg = server_from_bytes(data)
    except FedcryptError as exc:
        raise InvalidContentError(f"not a usable public server key: {exc}") from exc
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidContentError(f"not a usable public server key: {exc}") from exc
    return agg


def set_server_key(
    portal: Portal, db: Session, fed: Federation, data: bytes, *, actor: User, client_ip: str
) -> Federation:
    """Store a ``ckks`` federation's public key context (``server.key``).

    The bytes are checked with :func:`fedcrypt.protection.he.keys.server_from_bytes`, which
    refuses a file that holds a secret key: the portal never stores a hospital key.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation is not ``ckks`` or already running.
    fedcrypt.portal.errors.InvalidContentError
        If the file is not a public server key (or is a secret hospital key).
    """
    if not scheme_of(fed).key_pair:
        raise ConflictError(f"a {scheme_of(fed).name} federation takes no server key")
    if fed.status != FED_DRAFT:
        raise ConflictError("the key context cannot change once the federation is running")
    agg = aggregator_from_key(data)
    fingerprint = getattr(agg, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise InvalidContentError("the server key has no key-context fingerprint")
    preset = getattr(getattr(agg, "preset", None), "name", None)
    if isinstance(preset, str):
        if fed.he_preset is not None and fed.he_preset != preset:
            raise InvalidContentError(
                f"the server key uses the CKKS preset {preset!r}, but the federation was "
                f"created with {fed.he_preset!r}"
            )
        fed.he_preset = preset
    sha = portal.store.put_bytes(data)
    portal.aggregators[sha] = agg
    fed.server_key_sha256 = sha
    fed.server_key_size = len(data)
    fed.key_fingerprint = fingerprint
    record(
        db,
        at=portal.clock(),
        actor=actor,
        action="federation.server_key",
        target=fed.name,
        detail=f"fingerprint {fingerprint[:16]}…, {len(data)} bytes",
        client_ip=client_ip,
    )
    db.commit()
    return fed


def open_round(fed: Federation, number: int, now: datetime) -> Round:
    """A new open round ``number`` whose deadline follows from the federation."""
    return Round(
        federation_id=fed.id,
        number=number,
        status=ROUND_OPEN,
        opened_at=now,
        deadline_at=now + timedelta(minutes=fed.round_deadline_minutes),
    )


def publish_initial_model(
    portal: Portal,
    db: Session,
    fed: Federation,
    pending: PendingBlob,
    *,
    model_size: int | None,
    actor: User,
    client_ip: str,
) -> Federation:
    """Store the initial model (an opaque blob, never unpickled) and open round 1.

    Parameters
    ----------
    pending : PendingBlob
        The streamed file (committed to the store here, discarded on error).
    model_size : int, optional
        Number of values ``P`` in the flattened model; if ``None`` the first accepted
        upload fixes it.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation is already running, is ``he`` without a server key, or
        ``secagg`` without a registry or a model size.
    """
    if fed.status != FED_DRAFT:
        pending.discard()
        raise ConflictError("the initial model is already published")
    if scheme_of(fed).key_pair and fed.server_key_sha256 is None:
        pending.discard()
        raise ConflictError("upload the federation's public server.key before the initial model")
    if scheme_of(fed).staged:
        if fed.server_key_sha256 is None:
            pending.discard()
            raise ConflictError(
                "upload the federation's public registry.pub before the initial model"
            )
        if model_size is None and fed.model_size is None:
            pending.discard()
            raise ConflictError(
                "a secagg federation needs its model size (X-Model-Size, or model_size at "
                "creation): every session fixes the length of the masked vectors"
            )
    if pending.size == 0:
        pending.discard()
        raise InvalidContentError("the initial model file is empty")
    sha = portal.store.commit(pending)
    now = portal.clock()
    fed.initial_model_sha256 = sha
    fed.initial_model_size = pending.size
    if model_size is not None:
        fed.model_size = model_size
    fed.status = FED_RUNNING
    db.add(open_round(fed, 1, now))
    record(
        db,
        at=now,
        actor=actor,
        action="federation.publish_model",
        target=fed.name,
        detail=f"{pending.size} bytes, sha256 {sha[:16]}…; round 1 opened",
        client_ip=client_ip,
    )
    db.commit()
    return fed


def round_counts(db: Session, fed: Federation, rnd: Round) -> tuple[int, int]:
    """``(updates in this round, hospitals expected)`` for the aggregation rule.

    Excluded updates do not count. Expected is the number of federation members
    (hospitals that ever uploaded) less those excluded from this round (they cannot
    upload again in it), at least the quorum.
    """
    rows = list(db.execute(select(Upload.excluded_at).where(Upload.round_id == rnd.id)).scalars())
    n = sum(1 for x in rows if x is None)
    excluded = len(rows) - n
    expected = max(len(members(db, fed)) - excluded, fed.quorum)
    return n, expected


def is_finished(fed: Federation, rnd: Round | None) -> bool:
    """Whether the federation's last round has been aggregated."""
    return rnd is not None and rnd.status == ROUND_AGGREGATED and rnd.number >= fed.num_rounds


def running_federation_ids(db: Session) -> list[int]:
    """Ids of running federations (those that can have an open round)."""
    return list(db.scalars(select(Federation.id).where(Federation.status == FED_RUNNING)))
