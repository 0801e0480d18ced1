"""Rounds: accept protected updates, aggregate them without decrypting, collect metrics."""

from __future__ import annotations

import logging
import time

from sqlalchemy import exists, or_, select, update
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
    FED_DRAFT,
    FED_FINISHED,
    FED_RUNNING,
    ROUND_AGGREGATED,
    ROUND_AGGREGATING,
    ROUND_OPEN,
    Federation,
    MetricReport,
    Round,
    Upload,
    User,
)
from fedcrypt.portal.schemas import MetricsCreate, MetricsPublic, RoundPublic, UploadPublic
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services.audit import record
from fedcrypt.portal.storage import PendingBlob
from fedcrypt.portal.validation import check_against_federation, inspect_file

log = logging.getLogger(__name__)

SERVER_ACTOR = "portal"


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
    n, expected = feds.round_counts(db, fed, rnd)
    mine = viewer is not None and any(u.user_id == viewer.id for u in rnd.uploads)
    return RoundPublic(
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
        uploaded_by_me=mine,
    )


# --- uploads --------------------------------------------------------------------------


def round_open_for_upload(db: Session, fed: Federation, number: int) -> Round:
    """Return round ``number`` if it accepts uploads.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the federation is not running, or the round is closed or in the future.
    """
    if fed.status == FED_DRAFT:
        raise ConflictError("the federation has not started: its initial model is not published")
    current = feds.latest_round(db, fed)
    if fed.status == FED_FINISHED or current is None:
        raise ConflictError(f"round {number} is closed: the federation has finished")
    if number > current.number:
        raise ConflictError(
            f"round {number} has not opened yet; the current round is {current.number}"
        )
    if number < current.number or current.status == ROUND_AGGREGATED:
        raise ConflictError(f"round {number} is closed (already aggregated)")
    if current.status != ROUND_OPEN:
        raise ConflictError(f"round {number} is closed: it is being aggregated")
    return current


def precheck_upload(portal: Portal, *, federation_id: int, round_number: int) -> None:
    """Refuse an upload for a missing federation or a closed/future round before reading it."""
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        round_open_for_upload(db, fed, round_number)


def _blob_referenced(db: Session, sha: str) -> bool:
    return bool(
        db.scalar(
            select(
                or_(
                    exists().where(Upload.sha256 == sha),
                    exists().where(Round.aggregate_sha256 == sha),
                    exists().where(Federation.initial_model_sha256 == sha),
                    exists().where(Federation.server_key_sha256 == sha),
                )
            )
        )
    )


def _delete_if_unreferenced(portal: Portal, sha: str) -> None:
    with portal.blob_lock, portal.session() as db:
        if not _blob_referenced(db, sha):
            portal.store.delete(sha)


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
    ``tmp/`` (fsynced); it is checked (checksum, framing, scheme, key context, model
    size, and for ``ckks`` a trial deserialization), renamed into the blob store, and
    only then referenced from the database in one transaction. A re-upload replaces the
    earlier row in that same transaction; the earlier blob is deleted afterwards.

    Raises
    ------
    fedcrypt.portal.errors.PortalError
        ``BadRequestError`` for a checksum mismatch, ``InvalidContentError`` for a
        malformed file or one from another key context or model shape,
        ``ConflictError`` for a closed or future round.
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
    digest = pending.finish()
    if digest != claimed_sha256:
        raise BadRequestError(
            f"checksum mismatch: the received body has SHA-256 {digest}, but "
            f"X-Content-SHA256 says {claimed_sha256}; nothing was stored"
        )
    if pending.size == 0:
        raise InvalidContentError("malformed protected message: the body is empty")
    try:
        info = inspect_file(pending.path)
    except ProtocolError as exc:
        raise InvalidContentError(str(exc)) from exc
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        rnd = round_open_for_upload(db, fed, round_number)
        round_id = rnd.id
        try:
            check_against_federation(
                info,
                protection=feds.scheme_of(fed).name,
                model_size=fed.model_size,
                key_fingerprint=fed.key_fingerprint,
            )
        except ProtocolError as exc:
            raise InvalidContentError(str(exc)) from exc
        aggregator = (
            feds.load_aggregator(portal, fed)
            if feds.scheme_of(fed).key_files and portal.settings.validate_ciphertexts
            else None
        )
    if aggregator is not None:
        try:
            aggregator.aggregate([pending.path.read_bytes()])
        except FedcryptError as exc:
            raise InvalidContentError(f"the update does not fit the federation: {exc}") from exc
    now = portal.clock()
    old_sha: str | None = None
    with portal.blob_lock:
        sha = portal.store.commit(pending)
        with portal.session() as db:
            claimed = db.execute(
                update(Round)
                .where(Round.id == round_id, Round.status == ROUND_OPEN)
                .values(upload_seq=Round.upload_seq + 1, error=None)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                db.rollback()
                raise ConflictError(f"round {round_number} closed while the update was uploading")
            fed = feds.get_federation(db, federation_id)
            if fed.model_size is None:
                fed.model_size = info.size
            elif info.size is not None and info.size != fed.model_size:
                db.rollback()
                raise InvalidContentError(
                    f"wrong model size: the update has {info.size} values, this federation's "
                    f"model has {fed.model_size}"
                )
            user = db.get(User, user_id)
            assert user is not None
            existing = db.scalar(
                select(Upload).where(Upload.round_id == round_id, Upload.user_id == user_id)
            )
            if existing is not None:
                old_sha = existing.sha256
                existing.sha256 = sha
                existing.size = pending.size
                existing.num_examples = info.num_examples
                existing.version += 1
                existing.uploaded_at = now
                existing.upload_seconds = elapsed_s
                row = existing
                action = "update.replace"
            else:
                row = Upload(
                    round_id=round_id,
                    user_id=user_id,
                    sha256=sha,
                    size=pending.size,
                    num_examples=info.num_examples,
                    version=1,
                    uploaded_at=now,
                    upload_seconds=elapsed_s,
                )
                db.add(row)
                action = "update.upload"
            record(
                db,
                at=now,
                actor=user,
                action=action,
                target=f"{fed.name} round {round_number}",
                detail=(f"{pending.size} bytes, {info.num_examples} examples, sha256 {sha[:16]}…"),
                client_ip=client_ip,
            )
            try:
                db.commit()
            except IntegrityError as exc:  # a concurrent first upload by the same hospital
                db.rollback()
                raise ConflictError("another upload from this hospital is in progress") from exc
            out = upload_public(row)
    if old_sha is not None and old_sha != sha:
        _delete_if_unreferenced(portal, old_sha)
    return out


# --- aggregation ----------------------------------------------------------------------


def maybe_aggregate(
    portal: Portal,
    federation_id: int,
    *,
    force: bool = False,
    actor: User | None = None,
    client_ip: str = "",
) -> bool:
    """Aggregate the federation's open round if it is due; return whether it was.

    A round is due when at least ``quorum`` hospitals uploaded and either every member
    of the federation (every hospital that ever uploaded to it) has uploaded, the
    deadline has passed, or the admin forces it. The round is claimed with a
    conditional ``UPDATE`` (``open`` -> ``aggregating``), so concurrent triggers and
    uploads cannot interleave. The server only adds protected updates
    (:class:`~fedcrypt.protection.base.ServerAggregator`); it never decrypts.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        Only when ``force`` is set and the quorum is not met.
    """
    with portal.aggregation_lock:
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            rnd = feds.latest_round(db, fed)
            if fed.status != FED_RUNNING or rnd is None or rnd.status != ROUND_OPEN:
                if force:
                    raise ConflictError("the federation has no open round")
                return False
            n, expected = feds.round_counts(db, fed, rnd)
            now = portal.clock()
            if n < fed.quorum:
                if force:
                    raise ConflictError(
                        f"the quorum is not met: {n} of {fed.quorum} required updates"
                    )
                return False
            due = force or n >= expected or now >= rnd.deadline_at
            if not due or (rnd.error is not None and not force):
                return False
            claimed = db.execute(
                update(Round)
                .where(Round.id == rnd.id, Round.status == ROUND_OPEN)
                .values(status=ROUND_AGGREGATING)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                db.rollback()
                return False
            db.commit()
            round_id, number = rnd.id, rnd.number
            uploads = list(
                db.scalars(select(Upload).where(Upload.round_id == round_id).order_by(Upload.id))
            )
            shas = [u.sha256 for u in uploads]
            total_examples = sum(u.num_examples for u in uploads)
            try:
                aggregator = feds.load_aggregator(portal, fed)
            except PortalError as exc:
                _fail_round(portal, round_id, f"cannot load the aggregator: {exc.message}")
                return False
        t0 = time.perf_counter()
        try:
            blob = aggregator.aggregate([portal.store.read_bytes(s) for s in shas])
        except (FedcryptError, OSError, ValueError) as exc:
            log.warning("aggregation of round %s failed: %s", number, exc)
            _fail_round(portal, round_id, f"aggregation failed: {exc}")
            return False
        seconds = time.perf_counter() - t0
        sha = portal.store.put_bytes(blob)
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            rnd_row = db.get(Round, round_id)
            assert rnd_row is not None
            now = portal.clock()
            rnd_row.status = ROUND_AGGREGATED
            rnd_row.aggregated_at = now
            rnd_row.aggregate_sha256 = sha
            rnd_row.aggregate_size = len(blob)
            rnd_row.num_updates = len(shas)
            rnd_row.total_examples = total_examples
            rnd_row.aggregation_seconds = seconds
            rnd_row.error = None
            if number >= fed.num_rounds:
                fed.status = FED_FINISHED
                nxt = "federation finished"
            else:
                db.add(feds.open_round(fed, number + 1, now))
                nxt = f"round {number + 1} opened"
            record(
                db,
                at=now,
                actor=actor,
                actor_label=SERVER_ACTOR,
                action="round.aggregate",
                target=f"{fed.name} round {number}",
                detail=(
                    f"{len(shas)} updates, {total_examples} examples, {len(blob)} bytes, "
                    f"{seconds:.2f} s{' (forced)' if force else ''}; {nxt}"
                ),
                client_ip=client_ip,
            )
            db.commit()
        return True


def _fail_round(portal: Portal, round_id: int, message: str) -> None:
    with portal.session() as db:
        rnd = db.get(Round, round_id)
        assert rnd is not None
        rnd.status = ROUND_OPEN
        rnd.error = message
        record(
            db,
            at=portal.clock(),
            actor=None,
            actor_label=SERVER_ACTOR,
            action="round.aggregate_failed",
            target=f"round {rnd.number}",
            detail=message,
        )
        db.commit()


def tick(portal: Portal) -> int:
    """Aggregate every round that is due (deadline checks); return how many were."""
    with portal.session() as db:
        ids = feds.running_federation_ids(db)
    done = 0
    for fid in ids:
        try:
            done += maybe_aggregate(portal, fid)
        except PortalError as exc:  # pragma: no cover - defensive
            log.warning("round check of federation %s failed: %s", fid, exc)
    return done


def recover(portal: Portal) -> None:
    """After a restart: reopen rounds whose aggregation was interrupted, drop partial files."""
    with portal.session() as db:
        db.execute(update(Round).where(Round.status == ROUND_AGGREGATING).values(status=ROUND_OPEN))
        db.commit()
    removed = portal.store.clear_tmp()
    if removed:
        log.info("removed %d partial uploads", removed)


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
