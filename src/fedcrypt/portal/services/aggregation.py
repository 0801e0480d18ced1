"""Aggregating a round without decrypting; failures leave it recoverable, never wedged."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedcrypt.portal.context import Portal
from fedcrypt.portal.errors import ConflictError, NotFoundError, PortalError
from fedcrypt.portal.models import (
    FED_FINISHED,
    FED_RUNNING,
    ROUND_ACCEPTING,
    ROUND_AGGREGATED,
    ROUND_AGGREGATING,
    ROUND_FAILED,
    ROUND_OPEN,
    Federation,
    Round,
    Upload,
    User,
)
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services.audit import record
from fedcrypt.portal.services.blobs import sweep_orphans
from fedcrypt.portal.validation import MAX_EXAMPLES
from fedcrypt.protection.base import ServerAggregator

log = logging.getLogger(__name__)

SERVER_ACTOR = "portal"


@dataclass(frozen=True)
class _Part:
    upload_id: int
    hospital: str
    sha256: str
    size: int
    num_examples: int


class RoundAggregationError(Exception):
    """Aggregation failed; ``upload`` names the update it blames, when one is to blame."""

    def __init__(self, reason: str, upload: _Part | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.upload = upload

    def message(self) -> str:
        """The reason shown on the round, naming the upload."""
        if self.upload is None:
            return f"aggregation failed: {self.reason}"
        return (
            f"aggregation failed at upload {self.upload.upload_id} ({self.upload.hospital}): "
            f"{self.reason}; exclude it (or let the hospital upload again) and aggregate"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 500 else text[:500] + "…"


def fold(portal: Portal, aggregator: ServerAggregator, parts: Sequence[_Part]) -> bytes:
    """Add the round's updates in batches of at most ``aggregate_batch_bytes``.

    Each batch is added to the running aggregate (itself a protected message), so
    memory stays near one batch plus the aggregate however many hospitals took part.
    Addition of protected updates is associative and exact (ciphertexts modulo ``q``,
    float64 sums in the same order), so the result equals one call over every update.
    When a batch fails, its updates are added one at a time to find the one to blame.

    Raises
    ------
    RoundAggregationError
        Naming the update that could not be added (or none, if no single one is to
        blame).
    """
    budget = portal.settings.aggregate_batch_bytes
    acc: bytes | None = None
    i = 0
    while i < len(parts):
        batch: list[_Part] = [parts[i]]
        used = parts[i].size + (len(acc) if acc is not None else 0)
        i += 1
        while i < len(parts) and used + parts[i].size <= budget:
            batch.append(parts[i])
            used += parts[i].size
            i += 1
        blobs = [portal.store.read_bytes(p.sha256) for p in batch]
        try:
            acc = aggregator.aggregate(([acc] if acc is not None else []) + blobs)
        except Exception as exc:
            del blobs
            acc = _one_by_one(portal, aggregator, acc, batch, exc)
    if acc is None:
        raise RoundAggregationError("no updates to aggregate", None)
    return acc


def _one_by_one(
    portal: Portal,
    aggregator: ServerAggregator,
    acc: bytes | None,
    batch: Sequence[_Part],
    first_error: BaseException,
) -> bytes:
    for part in batch:
        blob = portal.store.read_bytes(part.sha256)
        try:
            acc = aggregator.aggregate(([acc] if acc is not None else []) + [blob])
        except Exception as exc:
            alone = (
                "it does not aggregate on its own"
                if acc is None
                else ("it does not add to the updates before it")
            )
            raise RoundAggregationError(f"{_describe(exc)} ({alone})", part) from exc
    raise RoundAggregationError(_describe(first_error), None) from first_error


def maybe_aggregate(
    portal: Portal,
    federation_id: int,
    *,
    force: bool = False,
    actor: User | None = None,
    client_ip: str = "",
) -> bool:
    """Aggregate the federation's open round if it is due; return whether it was.

    A round is due when at least ``quorum`` hospitals uploaded and either every
    expected hospital has uploaded, the deadline has passed, or the admin forces it. The
    round is claimed with a conditional ``UPDATE`` (``open`` -> ``aggregating``), so
    concurrent triggers and uploads cannot interleave. The server only adds protected
    updates (:class:`~fedcrypt.protection.base.ServerAggregator`); it never decrypts.

    Any failure (a malformed update, a grid mismatch, a count the database refuses, an
    I/O error) moves the round to ``failed`` with the reason and the blamed upload; it
    takes uploads again, the admin can exclude the upload and aggregate (``force``) —
    it is never left ``aggregating``. A failed round is retried only when forced or
    when a new upload arrives.

    A ``secagg`` federation's round is relayed stage by stage instead
    (:func:`fedcrypt.portal.services.relay.advance`: ``force`` starts its session or
    closes the running stage).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        Only when ``force`` is set and there is no open round or the quorum is not met.
    """
    with portal.session() as db:
        staged = feds.scheme_of(feds.get_federation(db, federation_id)).staged
    if staged:
        from fedcrypt.portal.services import relay  # relay imports this module

        return relay.advance(portal, federation_id, force=force, actor=actor, client_ip=client_ip)
    with portal.aggregation_lock:
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            rnd = feds.latest_round(db, fed)
            claimable = (ROUND_OPEN, ROUND_FAILED) if force else (ROUND_OPEN,)
            if fed.status != FED_RUNNING or rnd is None or rnd.status not in claimable:
                if force:
                    raise ConflictError("the federation has no open round")
                return False
            n, expected = feds.round_counts(db, fed, rnd)
            if n < fed.quorum:
                if force:
                    raise ConflictError(
                        f"the quorum is not met: {n} of {fed.quorum} required updates"
                    )
                return False
            if not (force or n >= expected or portal.clock() >= rnd.deadline_at):
                return False
            claimed = db.execute(
                update(Round)
                .where(Round.id == rnd.id, Round.status.in_(claimable))
                .values(status=ROUND_AGGREGATING)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                db.rollback()
                return False
            db.commit()
            round_id, number = rnd.id, rnd.number
            parts = _parts(db, round_id)
        try:
            _check_counts(parts)
            _aggregate_claimed(
                portal,
                federation_id,
                round_id=round_id,
                number=number,
                parts=parts,
                force=force,
                actor=actor,
                client_ip=client_ip,
            )
        except RoundAggregationError as exc:
            log.warning("aggregation of round %s failed: %s", number, exc.message())
            _fail_round(portal, round_id, exc.message(), exc.upload)
            return False
        except Exception as exc:  # never leave the round 'aggregating'
            log.exception("aggregation of round %s failed", number)
            _fail_round(portal, round_id, f"aggregation failed: {_describe(exc)}", None)
            return False
        return True


def _parts(db: Session, round_id: int) -> list[_Part]:
    rows = db.execute(
        select(Upload.id, User.name, Upload.sha256, Upload.size, Upload.num_examples)
        .join(User, User.id == Upload.user_id)
        .where(Upload.round_id == round_id, Upload.excluded_at.is_(None))
        .order_by(Upload.id)
    ).all()
    return [
        _Part(upload_id=i, hospital=h, sha256=s, size=z, num_examples=n) for i, h, s, z, n in rows
    ]


def _check_counts(parts: Sequence[_Part]) -> None:
    """Refuse a stored count above the upload bound (rows from before the bound existed)."""
    for part in parts:
        if not 1 <= part.num_examples <= MAX_EXAMPLES:
            raise RoundAggregationError(
                f"its num_examples {part.num_examples} is outside 1..{MAX_EXAMPLES}", part
            )


def _aggregate_claimed(
    portal: Portal,
    federation_id: int,
    *,
    round_id: int,
    number: int,
    parts: list[_Part],
    force: bool,
    actor: User | None,
    client_ip: str,
) -> None:
    total_examples = sum(p.num_examples for p in parts)
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        try:
            aggregator = feds.load_aggregator(portal, fed)
        except PortalError as exc:
            raise RoundAggregationError(f"cannot load the aggregator: {exc.message}", None) from exc
    t0 = time.perf_counter()
    blob = fold(portal, aggregator, parts)
    seconds = time.perf_counter() - t0
    with portal.blob_lock:
        sha = portal.store.put_bytes(blob)
        try:
            _publish(
                portal,
                federation_id,
                round_id=round_id,
                number=number,
                sha=sha,
                size=len(blob),
                num_updates=len(parts),
                total_examples=total_examples,
                seconds=seconds,
                force=force,
                actor=actor,
                client_ip=client_ip,
            )
        except BaseException:
            with portal.session() as db:
                if db.scalar(select(Round.id).where(Round.aggregate_sha256 == sha)) is None:
                    portal.store.delete(sha)
            raise


def _publish(
    portal: Portal,
    federation_id: int,
    *,
    round_id: int,
    number: int,
    sha: str,
    size: int,
    num_updates: int,
    total_examples: int,
    seconds: float,
    force: bool,
    actor: User | None,
    client_ip: str,
) -> None:
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        rnd = db.get(Round, round_id)
        assert rnd is not None
        if rnd.status != ROUND_AGGREGATING:  # cancelled meanwhile
            raise RoundAggregationError(f"the round became {rnd.status} during aggregation", None)
        finish_round(
            db,
            fed,
            rnd,
            now=portal.clock(),
            sha=sha,
            size=size,
            num_updates=num_updates,
            total_examples=total_examples,
            seconds=seconds,
            actor=actor,
            client_ip=client_ip,
            detail=(
                f"{num_updates} updates, {total_examples} examples" + (" (forced)" if force else "")
            ),
        )
        db.commit()


def finish_round(
    db: Session,
    fed: Federation,
    rnd: Round,
    *,
    now: datetime,
    sha: str,
    size: int,
    num_updates: int,
    total_examples: int | None,
    seconds: float,
    actor: User | None,
    client_ip: str,
    detail: str,
) -> None:
    """Record round ``rnd``'s aggregate and open the next round (or finish); no commit.

    Parameters
    ----------
    sha, size : str, int
        The stored aggregate blob and its size in bytes.
    num_updates : int
        Hospitals whose updates it holds.
    total_examples : int or None
        Their example count (None under secagg: it is masked with the updates).
    seconds : float
        Server time the aggregation took.
    detail : str
        What the audit event says about how it was made.
    """
    rnd.status = ROUND_AGGREGATED
    rnd.aggregated_at = now
    rnd.aggregate_sha256 = sha
    rnd.aggregate_size = size
    rnd.num_updates = num_updates
    rnd.total_examples = total_examples
    rnd.aggregation_seconds = seconds
    rnd.error = None
    rnd.failed_at = None
    rnd.failed_upload_id = None
    if rnd.number >= fed.num_rounds:
        fed.status = FED_FINISHED
        nxt = "federation finished"
    else:
        db.add(feds.open_round(fed, rnd.number + 1, now))
        nxt = f"round {rnd.number + 1} opened"
    record(
        db,
        at=now,
        actor=actor,
        actor_label=SERVER_ACTOR,
        action="round.aggregate",
        target=f"{fed.name} round {rnd.number}",
        detail=f"{detail}, {size} bytes, {seconds:.2f} s; {nxt}",
        client_ip=client_ip,
    )


def _fail_round(portal: Portal, round_id: int, message: str, upload: _Part | None) -> None:
    with portal.session() as db:
        rnd = db.get(Round, round_id)
        if rnd is None:  # pragma: no cover - the federation was deleted
            return
        if rnd.status == ROUND_AGGREGATING:
            rnd.status = ROUND_FAILED
        rnd.error = message
        rnd.failed_at = portal.clock()
        rnd.failed_upload_id = upload.upload_id if upload is not None else None
        fed = db.get(Federation, rnd.federation_id)
        record(
            db,
            at=portal.clock(),
            actor=None,
            actor_label=SERVER_ACTOR,
            action="round.aggregate_failed",
            target=f"{fed.name if fed else '?'} round {rnd.number}",
            detail=message,
        )
        db.commit()


def exclude_upload(
    portal: Portal,
    db: Session,
    fed: Federation,
    *,
    round_number: int,
    upload_id: int,
    reason: str,
    actor: User,
    client_ip: str,
) -> Upload:
    """Leave an update out of its round's aggregate (admin); the round reopens.

    The row and its blob stay on record (the admin can still download it); the
    hospital cannot upload again in this round. The round is then aggregated as soon
    as it is due again (every other expected hospital has uploaded, or the deadline).

    Raises
    ------
    fedcrypt.portal.errors.NotFoundError
        If the round has no such upload.
    fedcrypt.portal.errors.ConflictError
        If the round no longer takes uploads, or the upload is already excluded.
    """
    with portal.aggregation_lock:
        rnd = feds.get_round(db, fed, round_number)
        db.refresh(rnd)
        up = db.get(Upload, upload_id)
        if up is None or up.round_id != rnd.id:
            raise NotFoundError(f"round {round_number} has no upload {upload_id}")
        if rnd.status not in ROUND_ACCEPTING:
            raise ConflictError(f"round {round_number} is {rnd.status}; nothing can be excluded")
        if up.excluded:
            raise ConflictError(f"upload {upload_id} is already excluded")
        now = portal.clock()
        up.excluded_at = now
        up.excluded_reason = reason.strip()
        rnd.status = ROUND_OPEN
        rnd.error = None
        rnd.failed_at = None
        rnd.failed_upload_id = None
        record(
            db,
            at=now,
            actor=actor,
            action="update.exclude",
            target=f"{fed.name} round {round_number}",
            detail=f"upload {upload_id} of {up.user.name}: {reason.strip()}",
            client_ip=client_ip,
        )
        db.commit()
    return up


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
    """After a restart: reopen interrupted aggregations, drop partial and orphan files."""
    with portal.session() as db:
        db.execute(update(Round).where(Round.status == ROUND_AGGREGATING).values(status=ROUND_OPEN))
        db.commit()
    removed = portal.store.clear_tmp()
    if removed:
        log.info("removed %d partial uploads", removed)
    sweep_orphans(portal)
