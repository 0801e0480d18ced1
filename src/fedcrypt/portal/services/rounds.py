"""Rounds: views, accepting protected updates (checked on arrival), collecting metrics."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedcrypt.exceptions import FedcryptError, ProtocolError
from fedcrypt.portal.context import Portal
from fedcrypt.portal.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    InvalidContentError,
    PortalError,
)
from fedcrypt.portal.models import (
    FED_CANCELLED,
    FED_DRAFT,
    FED_FINISHED,
    ROUND_ACCEPTING,
    ROUND_AGGREGATED,
    ROUND_OPEN,
    Federation,
    MetricReport,
    Round,
    Upload,
    User,
)
from fedcrypt.portal.schemas import MetricsCreate, MetricsPublic, RoundPublic, UploadPublic
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services import relay_views
from fedcrypt.portal.services.audit import record
from fedcrypt.portal.services.blobs import blob_referenced, delete_if_unreferenced
from fedcrypt.portal.storage import PendingBlob
from fedcrypt.portal.validation import (
    Grid,
    RoundPeer,
    UpdateInfo,
    check_against_federation,
    check_round_grid,
    inspect_file,
)

log = logging.getLogger(__name__)


# --- views ----------------------------------------------------------------------------


def upload_public(up: Upload) -> UploadPublic:
    """The API view of an upload."""
    return UploadPublic(
        id=up.id,
        round=up.round.number,
        hospital_id=up.user_id,
        hospital=up.user.name,
        sha256=up.sha256,
        size=up.size,
        num_examples=up.num_examples,
        version=up.version,
        uploaded_at=up.uploaded_at,
        excluded=up.excluded,
        excluded_reason=up.excluded_reason,
    )


def metrics_public(m: MetricReport) -> MetricsPublic:
    """The API view of a metrics report."""
    return MetricsPublic(
        round=m.round.number,
        hospital_id=m.user_id,
        hospital=m.user.name,
        loss=m.loss,
        accuracy=m.accuracy,
        auc=m.auc,
        num_examples=m.num_examples,
        reported_at=m.reported_at,
    )


def round_public(db: Session, fed: Federation, rnd: Round, *, viewer: User | None) -> RoundPublic:
    """The API view of a round, with its upload count and whether ``viewer`` uploaded."""
    extra: dict[str, Any] = {}
    if feds.scheme_of(fed).staged:
        extra = relay_views.round_summary(db, fed, rnd)
        n, expected = int(extra.pop("num_uploads") or 0), int(extra.pop("expected_uploads"))
    else:
        n, expected = feds.round_counts(db, fed, rnd)
    mine = viewer is not None and any(u.user_id == viewer.id for u in rnd.uploads)
    return RoundPublic(
        **extra,
        num_updates=rnd.num_updates,
        number=rnd.number,
        status=rnd.status,
        opened_at=rnd.opened_at,
        deadline_at=rnd.deadline_at,
        aggregated_at=rnd.aggregated_at,
        quorum=fed.quorum,
        num_uploads=n,
        expected_uploads=expected,
        total_examples=rnd.total_examples,
        aggregate_sha256=rnd.aggregate_sha256,
        aggregate_size=rnd.aggregate_size,
        aggregation_seconds=rnd.aggregation_seconds,
        error=rnd.error,
        failed_at=rnd.failed_at,
        failed_upload_id=rnd.failed_upload_id,
        num_excluded=sum(1 for u in rnd.uploads if u.excluded),
        uploaded_by_me=mine,
    )


# --- uploads --------------------------------------------------------------------------


def round_open_for_upload(
    db: Session, fed: Federation, number: int, *, user_id: int | None = None
) -> Round:
    """Return round ``number`` if it accepts uploads (from ``user_id``, if given).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation is not running, the round is closed or in the future, or the
        admin excluded this hospital's update from the round.
    """
    if feds.scheme_of(fed).staged:
        raise ConflictError(
            f"federation {fed.name!r} uses secagg: there is no single update to upload; "
            "hospitals answer the secure-aggregation stages with 'fedcrypt portal participate'"
        )
    if fed.status == FED_DRAFT:
        raise ConflictError("the federation has not started: its initial model is not published")
    if fed.status == FED_CANCELLED:
        why = f": {fed.cancel_reason}" if fed.cancel_reason else ""
        raise ConflictError(f"the federation was cancelled by the admin{why}")
    current = feds.latest_round(db, fed)
    if fed.status == FED_FINISHED or current is None:
        raise ConflictError(f"round {number} is closed: the federation has finished")
    if number > current.number:
        raise ConflictError(
            f"round {number} has not opened yet; the current round is {current.number}"
        )
    if number < current.number or current.status == ROUND_AGGREGATED:
        raise ConflictError(f"round {number} is closed (already aggregated)")
    if current.status not in ROUND_ACCEPTING:
        raise ConflictError(f"round {number} is closed: it is being aggregated")
    if user_id is not None:
        mine = db.scalar(
            select(Upload).where(Upload.round_id == current.id, Upload.user_id == user_id)
        )
        if mine is not None and mine.excluded:
            raise ConflictError(
                f"the admin excluded this hospital's update from round {number} "
                f"({mine.excluded_reason}); it takes part again from round {number + 1}"
            )
    return current


def precheck_upload(
    portal: Portal, *, federation_id: int, round_number: int, user_id: int | None = None
) -> None:
    """Refuse an upload for a missing federation or a closed/future round before reading it."""
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        round_open_for_upload(db, fed, round_number, user_id=user_id)


def _grid_of(up: Upload) -> Grid | None:
    if up.mode is None or up.table_sha256 is None or up.max_examples is None:
        return None
    return Grid(mode=up.mode, table_sha256=up.table_sha256, max_examples=up.max_examples)


def round_peers(db: Session, round_id: int, *, other_than: int) -> list[RoundPeer]:
    """The round's accepted, not excluded updates of hospitals other than ``other_than``."""
    rows = db.scalars(
        select(Upload)
        .where(
            Upload.round_id == round_id,
            Upload.user_id != other_than,
            Upload.excluded_at.is_(None),
        )
        .order_by(Upload.id)
    )
    return [
        RoundPeer(
            upload_id=u.id, hospital=u.user.name, num_examples=u.num_examples, grid=_grid_of(u)
        )
        for u in rows
    ]


def record_rejection(
    portal: Portal, *, user_id: int, target: str, reason: str, client_ip: str
) -> None:
    """Write an ``update.reject`` audit event in its own transaction."""
    with portal.session() as db:
        record(
            db,
            at=portal.clock(),
            actor=db.get(User, user_id),
            action="update.reject",
            target=target,
            detail=reason,
            client_ip=client_ip,
        )
        db.commit()


def accept_upload(
    portal: Portal,
    *,
    federation_id: int,
    round_number: int,
    user_id: int,
    pending: PendingBlob,
    claimed_sha256: str,
    client_ip: str,
    elapsed_s: float | None = None,
) -> UploadPublic:
    """Validate a streamed update and make it the hospital's update for the round.

    The order guarantees that nothing is half written: the body is already on disk in
    ``tmp/`` (fsynced); it is checked on arrival (checksum, framing, every count within
    its bound, scheme, key context, model size, for packed updates the round's mode,
    step table and example capacity, and for ``he`` a trial deserialization), renamed
    into the blob store, and only then referenced from the database in one transaction.
    A re-upload replaces the earlier row in that same transaction; the earlier blob is
    deleted afterwards. If the transaction fails, the new blob is deleted (no orphan).

    Raises
    ------
    fedcrypt.portal.errors.PortalError
        ``BadRequestError`` for a checksum mismatch, ``InvalidContentError`` for a
        malformed file, a count out of bounds, or one from another key context, model
        shape or quantization grid, ``ConflictError`` for a closed or future round.
    """
    target = f"federation {federation_id} round {round_number}"
    try:
        return _accept(
            portal,
            federation_id=federation_id,
            round_number=round_number,
            user_id=user_id,
            pending=pending,
            claimed_sha256=claimed_sha256,
            client_ip=client_ip,
            elapsed_s=elapsed_s,
        )
    except PortalError as exc:
        pending.discard()
        record_rejection(
            portal, user_id=user_id, target=target, reason=exc.message, client_ip=client_ip
        )
        raise
    except BaseException:
        pending.discard()
        raise


def _inspect(pending: PendingBlob, claimed_sha256: str) -> UpdateInfo:
    digest = pending.finish()
    if digest != claimed_sha256:
        raise BadRequestError(
            f"checksum mismatch: the received body has SHA-256 {digest}, but "
            f"X-Content-SHA256 says {claimed_sha256}; nothing was stored"
        )
    if pending.size == 0:
        raise InvalidContentError("malformed protected message: the body is empty")
    try:
        return inspect_file(pending.path)
    except ProtocolError as exc:
        raise InvalidContentError(str(exc)) from exc


def _packed(fed: Federation) -> bool | None:
    """Whether the federation's HE preset packs quantized values (None: not known)."""
    if not feds.scheme_of(fed).key_pair or not fed.he_preset:
        return None
    from fedcrypt.protection.he.params import get_preset

    try:
        return get_preset(fed.he_preset).is_packed
    except ValueError:  # a preset this version does not know: leave it to the aggregator
        return None


def _check_fits(db: Session, fed: Federation, rnd: Round, info: UpdateInfo, user_id: int) -> None:
    """The arrival checks that need the database: federation, then the round's grid."""
    try:
        check_against_federation(
            info,
            scheme=feds.scheme_of(fed),
            model_size=fed.model_size,
            key_fingerprint=fed.key_fingerprint,
        )
        check_round_grid(
            info,
            round_number=rnd.number,
            peers=round_peers(db, rnd.id, other_than=user_id),
            packed=_packed(fed),
        )
    except ProtocolError as exc:
        raise InvalidContentError(str(exc)) from exc


def _accept(
    portal: Portal,
    *,
    federation_id: int,
    round_number: int,
    user_id: int,
    pending: PendingBlob,
    claimed_sha256: str,
    client_ip: str,
    elapsed_s: float | None,
) -> UploadPublic:
    info = _inspect(pending, claimed_sha256)
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        rnd = round_open_for_upload(db, fed, round_number, user_id=user_id)
        _check_fits(db, fed, rnd, info, user_id)
        aggregator = (
            feds.load_aggregator(portal, fed)
            if feds.scheme_of(fed).key_pair and portal.settings.validate_ciphertexts
            else None
        )
    if aggregator is not None:
        with portal.validation_slots:  # each trial holds the whole file in memory
            try:
                aggregator.aggregate([pending.path.read_bytes()])
            except FedcryptError as exc:
                raise InvalidContentError(f"the update does not fit the federation: {exc}") from exc
    now = portal.clock()
    old_sha: str | None = None
    with portal.blob_lock, portal.session() as db:
        # checked again under the lock: another update may have fixed the round's grid
        fed = feds.get_federation(db, federation_id)
        rnd = round_open_for_upload(db, fed, round_number, user_id=user_id)
        _check_fits(db, fed, rnd, info, user_id)
        sha = portal.store.commit(pending)
        try:
            out, old_sha = _store_row(
                db,
                fed,
                rnd,
                info,
                user_id=user_id,
                sha=sha,
                size=pending.size,
                now=now,
                client_ip=client_ip,
                elapsed_s=elapsed_s,
            )
        except BaseException:
            db.rollback()
            if not blob_referenced(db, sha):
                portal.store.delete(sha)
            raise
    if old_sha is not None and old_sha != sha:
        delete_if_unreferenced(portal, old_sha)
    return out


def _store_row(
    db: Session,
    fed: Federation,
    rnd: Round,
    info: UpdateInfo,
    *,
    user_id: int,
    sha: str,
    size: int,
    now: datetime,
    client_ip: str,
    elapsed_s: float | None,
) -> tuple[UploadPublic, str | None]:
    """Reference the stored blob from the hospital's row for the round (one transaction)."""
    claimed = db.execute(
        update(Round)
        .where(Round.id == rnd.id, Round.status.in_(ROUND_ACCEPTING))
        .values(
            upload_seq=Round.upload_seq + 1,
            status=ROUND_OPEN,
            error=None,
            failed_at=None,
            failed_upload_id=None,
        )
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise ConflictError(f"round {rnd.number} closed while the update was uploading")
    if fed.model_size is None:
        fed.model_size = info.size
    user = db.get(User, user_id)
    assert user is not None
    grid = info.grid
    values = {
        "sha256": sha,
        "size": size,
        "num_examples": info.num_examples,
        "uploaded_at": now,
        "upload_seconds": elapsed_s,
        "mode": grid.mode if grid else None,
        "table_sha256": grid.table_sha256 if grid else None,
        "max_examples": grid.max_examples if grid else None,
    }
    existing = db.scalar(select(Upload).where(Upload.round_id == rnd.id, Upload.user_id == user_id))
    old_sha: str | None = None
    if existing is not None:
        old_sha = existing.sha256
        for key, value in values.items():
            setattr(existing, key, value)
        existing.version += 1
        row = existing
        action = "update.replace"
    else:
        row = Upload(round_id=rnd.id, user_id=user_id, version=1, **values)
        db.add(row)
        action = "update.upload"
    record(
        db,
        at=now,
        actor=user,
        action=action,
        target=f"{fed.name} round {rnd.number}",
        detail=(
            f"{size} bytes, {info.num_examples} examples, sha256 {sha[:16]}…"
            + (f", {grid.mode}" if grid else "")
        ),
        client_ip=client_ip,
    )
    try:
        db.commit()
    except IntegrityError as exc:  # a concurrent first upload by the same hospital
        raise ConflictError("another upload from this hospital is in progress") from exc
    return upload_public(row), old_sha


# --- metrics --------------------------------------------------------------------------


def report_metrics(
    portal: Portal,
    db: Session,
    fed: Federation,
    *,
    round_number: int,
    user: User,
    data: MetricsCreate,
    client_ip: str,
) -> MetricsPublic:
    """Store (or replace) ``user``'s metrics for an aggregated round.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the round has no aggregate yet.
    fedcrypt.portal.errors.ForbiddenError
        If ``user`` never took part in the federation.
    """
    rnd = feds.get_round(db, fed, round_number)
    if rnd.status != ROUND_AGGREGATED:
        raise ConflictError(f"round {round_number} has no aggregate yet; report after it")
    if not feds.is_member(db, fed, user):
        raise ForbiddenError("only hospitals that took part in this federation can report metrics")
    now = portal.clock()
    row = db.scalar(
        select(MetricReport).where(MetricReport.round_id == rnd.id, MetricReport.user_id == user.id)
    )
    if row is None:
        row = MetricReport(round_id=rnd.id, user_id=user.id, reported_at=now, **data.model_dump())
        db.add(row)
    else:
        for key, value in data.model_dump().items():
            setattr(row, key, value)
        row.reported_at = now
    record(
        db,
        at=now,
        actor=user,
        action="metrics.report",
        target=f"{fed.name} round {round_number}",
        detail=(
            f"loss={data.loss:.4f} accuracy={data.accuracy:.4f} "
            f"auc={'-' if data.auc is None else f'{data.auc:.4f}'} n={data.num_examples}"
        ),
        client_ip=client_ip,
    )
    db.commit()
    db.refresh(row)
    return metrics_public(row)
