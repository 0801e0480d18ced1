"""The secagg relay: a round's five protocol stages, relayed between hospitals that poll.

A ``secagg`` federation holds only the consortium's public ``registry.pub``. Each round
runs one secure-aggregation *session* (an attempt, :class:`~fedcrypt.portal.models.
SecAggAttempt`) of Bonawitz et al. 2017's malicious-server protocol
(:class:`~fedcrypt.protection.secagg.SecAggServer`):

1. ``join``: enrolled hospitals check in. The session starts when at least the quorum
   joined and every enrolled hospital has, or the round deadline passed (or the admin
   forces it). It invites exactly the hospitals that joined, with threshold
   :func:`~fedcrypt.portal.secagg.round_threshold` (the quorum, raised to the secure
   minimum).
2. ``advertise`` ... ``unmask``: the relay holds one opaque request per invited
   hospital; hospitals poll, download theirs, answer with a signed reply. A stage
   closes when every hospital asked has answered, when its deadline (the federation's
   round deadline, per stage) passes, or when the admin closes it; who did not answer
   has dropped out. Each reply is checked by the protocol on arrival; a refused one
   (bad signature, replay, another session, late, malformed) is answered with a 4xx
   that names the hospital, recorded, and the hospital counts as dropped out unless a
   valid reply follows before the stage closes.
3. The unmask stage yields the aggregate (masked with the consortium's group mask: the
   portal cannot read it), published like any other; the next round opens. With fewer
   than ``t`` hospitals left at some stage the session fails: the round becomes
   ``failed`` with the reason, and a new session (a new protocol round number, so no
   hospital joins one twice) collects check-ins again.

Restarts: the live :class:`SecAggServer` of a running session is kept in memory
(``Portal.relays``); every request and reply is also in the blob store and the
database. After a restart the relay rebuilds the server by replaying the session's
accepted replies through a fresh one with the same configuration (nonce included), with
its clock set to when each reply arrived and each stage opened; the rebuilt requests
must equal the stored ones. The session's messages are deleted when it ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedcrypt.exceptions import FedcryptError, ProtocolError
from fedcrypt.portal.context import Portal
from fedcrypt.portal.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    InvalidContentError,
    NotFoundError,
    PortalError,
)
from fedcrypt.portal.models import (
    ATTEMPT_ABANDONED,
    ATTEMPT_DONE,
    ATTEMPT_FAILED,
    ATTEMPT_JOIN,
    FED_CANCELLED,
    FED_RUNNING,
    MSG_ANSWERED,
    MSG_ASKED,
    MSG_DROPPED,
    MSG_JOINED,
    ROUND_AGGREGATED,
    ROUND_CANCELLED,
    ROUND_FAILED,
    ROUND_OPEN,
    Federation,
    Round,
    SecAggAttempt,
    SecAggMember,
    SecAggMessage,
    User,
)
from fedcrypt.portal.schemas import (
    SecAggReplyPublic,
    SecAggTurn,
)
from fedcrypt.portal.secagg import (
    MAX_REFUSALS_PER_STAGE,
    reply_limit,
    round_threshold,
)
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services.audit import record
from fedcrypt.portal.services.blobs import delete_if_unreferenced
from fedcrypt.portal.services.secagg_members import (
    list_members,
    member_of,
    params_of,
    registry_of,
    require_secagg,
)
from fedcrypt.portal.storage import PendingBlob
from fedcrypt.protection.secagg import (
    STAGES,
    DeadlineError,
    ReplayError,
    RoundConfig,
    SecAggServer,
    SessionMismatchError,
    SignatureError,
)

log = logging.getLogger(__name__)


SERVER_ACTOR = "portal"
#: Stages of a session that is still running (its messages are kept).
ACTIVE = (ATTEMPT_JOIN, *STAGES)


# --- the live protocol server -----------------------------------------------------------


@dataclass
class RelayClock:
    """Seconds since the epoch by the portal's clock, or a fixed time while replaying.

    The protocol server's stage deadlines are read from this clock, so they follow the
    portal's (injectable) clock and survive restarts.
    """

    wall: Callable[[], datetime]
    fixed: float | None = None

    def __call__(self) -> float:
        """The current time in seconds (the fixed one, if set)."""
        return self.fixed if self.fixed is not None else self.wall().timestamp()


@dataclass
class LiveSession:
    """A running session's protocol server, kept in memory between requests."""

    attempt_id: int
    session: str
    server: SecAggServer
    clock: RelayClock


class RelayStateError(FedcryptError):
    """The relay could not rebuild a session's state from its stored messages."""


def _ts(dt: datetime) -> float:
    return dt.timestamp()


def _from_ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# --- sessions -----------------------------------------------------------------------------


def current_attempt(db: Session, rnd: Round) -> SecAggAttempt | None:
    """The round's latest session, if any."""
    return db.scalar(
        select(SecAggAttempt)
        .where(SecAggAttempt.round_id == rnd.id)
        .order_by(SecAggAttempt.id.desc())
        .limit(1)
    )


def attempts_of(db: Session, rnd: Round) -> list[SecAggAttempt]:
    """Every session of the round, oldest first."""
    return list(
        db.scalars(
            select(SecAggAttempt).where(SecAggAttempt.round_id == rnd.id).order_by(SecAggAttempt.id)
        )
    )


def _new_attempt(fed: Federation, rnd: Round, now: datetime, *, first: bool) -> SecAggAttempt:
    deadline = rnd.deadline_at if first else now + timedelta(minutes=fed.round_deadline_minutes)
    return SecAggAttempt(
        federation_id=fed.id,
        round_id=rnd.id,
        stage=ATTEMPT_JOIN,
        opened_at=now,
        stage_deadline_at=max(deadline, now),
        stage_timeout_s=fed.round_deadline_minutes * 60.0,
        server_seconds=0.0,
    )


def _ensure_attempt(db: Session, fed: Federation, rnd: Round, now: datetime) -> SecAggAttempt:
    """The round's running session, or a new one collecting check-ins."""
    att = current_attempt(db, rnd)
    if att is not None and att.stage in ACTIVE:
        return att
    att = _new_attempt(fed, rnd, now, first=att is None)
    db.add(att)
    db.flush()
    return att


def messages(db: Session, att: SecAggAttempt, stage: str | None = None) -> list[SecAggMessage]:
    q = select(SecAggMessage).where(SecAggMessage.attempt_id == att.id)
    if stage is not None:
        q = q.where(SecAggMessage.stage == stage)
    return list(db.scalars(q.order_by(SecAggMessage.id)))


def _message(
    db: Session, att: SecAggAttempt, member: SecAggMember, stage: str
) -> SecAggMessage | None:
    return db.scalar(
        select(SecAggMessage).where(
            SecAggMessage.attempt_id == att.id,
            SecAggMessage.member_id == member.id,
            SecAggMessage.stage == stage,
        )
    )


def _message_blobs(rows: Iterable[SecAggMessage]) -> list[str]:
    out: list[str] = []
    for m in rows:
        out += [s for s in (m.request_sha256, m.reply_sha256) if s is not None]
    return out


def _drop_live(portal: Portal, attempt_id: int) -> None:
    portal.relays.pop(attempt_id, None)


def _config_of(att: SecAggAttempt) -> RoundConfig:
    assert att.config is not None
    return RoundConfig.from_json(json.loads(att.config))


def _live(portal: Portal, db: Session, fed: Federation, att: SecAggAttempt) -> LiveSession:
    """The session's protocol server: the one in memory, or rebuilt from its messages.

    Raises
    ------
    RelayStateError
        If the stored messages do not rebuild the same session.
    """
    config = _config_of(att)
    live = portal.relays.get(att.id)
    if (
        isinstance(live, LiveSession)
        and live.session == config.session
        and live.server.stage == att.stage
    ):
        return live
    _drop_live(portal, att.id)
    live = _replay(portal, db, fed, att, config)
    portal.relays[att.id] = live
    log.info("secagg relay: rebuilt the session of attempt %d at stage %s", att.id, att.stage)
    return live


def _replay(
    portal: Portal, db: Session, fed: Federation, att: SecAggAttempt, config: RoundConfig
) -> LiveSession:
    clock = RelayClock(portal.clock)
    server = SecAggServer(
        config,
        registry=registry_of(portal, fed).keys,
        clock=clock,
        stage_timeout=att.stage_timeout_s,
    )
    rows = messages(db, att)
    by_stage: dict[str, list[SecAggMessage]] = {s: [] for s in STAGES}
    for m in rows:
        if m.stage in by_stage:
            by_stage[m.stage].append(m)
    members = {m.member_id: m.member.hospital_id for m in rows}
    try:
        assert att.started_at is not None
        clock.fixed = _ts(att.started_at)
        requests = server.request_advertise()
        for i, stage in enumerate(STAGES):
            asked = by_stage[stage]
            stored = {members[m.member_id]: m.request_sha256 for m in asked}
            made = {h: hashlib.sha256(r).hexdigest() for h, r in requests.items()}
            if stored != made:
                raise RelayStateError(f"the rebuilt {stage} requests differ from the stored ones")
            answered = sorted(
                (m for m in asked if m.status == MSG_ANSWERED and m.reply_sha256),
                key=lambda m: (m.replied_at or att.started_at, m.id),
            )
            for m in answered:
                assert m.replied_at is not None and m.reply_sha256 is not None
                clock.fixed = _ts(m.replied_at)
                server.submit(members[m.member_id], portal.store.read_bytes(m.reply_sha256))
            if stage == att.stage:
                break
            nxt = by_stage[STAGES[i + 1]]
            if not nxt:
                raise RelayStateError(f"no {STAGES[i + 1]} requests are stored")
            clock.fixed = _ts(nxt[0].asked_at)
            requests = getattr(server, f"receive_{stage}")()
    except (FedcryptError, OSError, ValueError, AssertionError) as exc:
        raise RelayStateError(
            f"cannot rebuild the secagg session from its stored messages: {exc}"
        ) from exc
    finally:
        clock.fixed = None
    return LiveSession(attempt_id=att.id, session=config.session, server=server, clock=clock)


def _store_requests(
    portal: Portal,
    db: Session,
    att: SecAggAttempt,
    stage: str,
    requests: dict[int, bytes],
    members: dict[int, SecAggMember],
    now: datetime,
) -> None:
    """Keep each hospital's request of ``stage`` (one blob per distinct request)."""
    shas: dict[bytes, str] = {}
    with portal.blob_lock:
        for hid, req in sorted(requests.items()):
            sha = shas.get(req)
            if sha is None:
                sha = shas[req] = portal.store.put_bytes(req)
            db.add(
                SecAggMessage(
                    attempt_id=att.id,
                    member_id=members[hid].id,
                    stage=stage,
                    status=MSG_ASKED,
                    asked_at=now,
                    request_sha256=sha,
                    request_size=len(req),
                    refusals=0,
                )
            )


def _members_by_hospital(db: Session, fed: Federation) -> dict[int, SecAggMember]:
    return {m.hospital_id: m for m in list_members(db, fed)}


# --- advancing a round ----------------------------------------------------------------------


def advance(
    portal: Portal,
    federation_id: int,
    *,
    force: bool = False,
    actor: User | None = None,
    client_ip: str = "",
) -> bool:
    """Move the federation's open secagg round on if it is due; return whether it moved.

    Starts the session of a round collecting check-ins (quorum met, and every enrolled
    hospital joined or the deadline passed), or closes the running stage (every hospital
    asked answered, or its deadline passed). ``force`` (the admin) starts the session
    with the hospitals that joined, or closes the stage now.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        Only with ``force``: the federation has no open round, or too few hospitals
        joined.
    """
    with portal.aggregation_lock:
        return _advance_locked(portal, federation_id, force=force, actor=actor, client_ip=client_ip)


def _advance_locked(
    portal: Portal, federation_id: int, *, force: bool, actor: User | None, client_ip: str
) -> bool:
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        rnd = feds.latest_round(db, fed)
        if fed.status != FED_RUNNING or rnd is None or rnd.status not in (ROUND_OPEN, ROUND_FAILED):
            if force:
                raise ConflictError("the federation has no open round")
            return False
        now = portal.clock()
        att = _ensure_attempt(db, fed, rnd, now)
        if att.stage == ATTEMPT_JOIN:
            started = _maybe_start(
                portal, db, fed, rnd, att, now, force=force, actor=actor, client_ip=client_ip
            )
            if not started:
                db.commit()  # a new session may have been opened
            return started
        try:
            live = _live(portal, db, fed, att)
        except RelayStateError as exc:
            _fail(portal, db, fed, rnd, att, now, str(exc))
            return True
        if live.server.awaiting and now < att.stage_deadline_at and not force:
            return False
        if force:
            record(
                db,
                at=now,
                actor=actor,
                action="round.secagg_close_stage",
                target=f"{fed.name} round {rnd.number}",
                detail=f"closed stage {att.stage} with {len(live.server.awaiting)} hospital(s) "
                "still to answer",
                client_ip=client_ip,
            )
        _close_stage(portal, db, fed, rnd, att, live, now, forced=force)
        return True


def _maybe_start(
    portal: Portal,
    db: Session,
    fed: Federation,
    rnd: Round,
    att: SecAggAttempt,
    now: datetime,
    *,
    force: bool,
    actor: User | None,
    client_ip: str,
) -> bool:
    joined = [m for m in messages(db, att, ATTEMPT_JOIN) if m.status == MSG_JOINED]
    n = len(joined)
    enrolled = len(list_members(db, fed))
    need = max(fed.quorum, 2)
    if n < need:
        if force:
            raise ConflictError(
                f"the quorum is not met: {n} of {need} required hospitals joined round {rnd.number}"
            )
        return False
    if not (force or n >= enrolled or now >= att.stage_deadline_at):
        return False
    params = params_of(fed)
    reg = registry_of(portal, fed)
    if fed.model_size is None:
        _fail(portal, db, fed, rnd, att, now, "the federation's model size is unknown")
        return True
    ids = sorted(m.member.hospital_id for m in joined)
    last = db.scalar(
        select(func.max(SecAggAttempt.protocol_round)).where(SecAggAttempt.federation_id == fed.id)
    )
    protocol_round = (last or 0) + 1
    t = round_threshold(invited=n, quorum=fed.quorum, params=params)
    clock = RelayClock(portal.clock, fixed=_ts(now))
    try:
        config = RoundConfig(
            round=protocol_round,
            hospital_ids=tuple(ids),
            vector_size=int(fed.model_size),
            params=params,
            threshold=t,
        )
        server = SecAggServer(
            config, registry=reg.keys, clock=clock, stage_timeout=att.stage_timeout_s
        )
        t0 = time.perf_counter()
        requests = server.request_advertise()
        seconds = time.perf_counter() - t0
    except FedcryptError as exc:
        _fail(portal, db, fed, rnd, att, now, f"cannot start the session: {exc}")
        return True
    finally:
        clock.fixed = None
    assert server.deadline is not None
    att.protocol_round = protocol_round
    att.config = json.dumps(config.to_json(), sort_keys=True, separators=(",", ":"))
    att.threshold = t
    att.num_invited = n
    att.started_at = now
    att.stage = "advertise"
    att.stage_deadline_at = _from_ts(server.deadline)
    att.server_seconds = seconds
    members = _members_by_hospital(db, fed)
    _store_requests(portal, db, att, "advertise", requests, members, now)
    if rnd.status == ROUND_FAILED:
        rnd.status = ROUND_OPEN
        rnd.error = None
        rnd.failed_at = None
    record(
        db,
        at=now,
        actor=actor if force else None,
        actor_label=SERVER_ACTOR,
        action="round.secagg_start",
        target=f"{fed.name} round {rnd.number}",
        detail=(
            f"session of protocol round {protocol_round}: {n} hospitals {ids}, threshold "
            f"{t}{' (forced)' if force else ''}"
        ),
        client_ip=client_ip,
    )
    try:
        db.commit()
    except BaseException:
        db.rollback()
        raise
    portal.relays[att.id] = LiveSession(
        attempt_id=att.id, session=config.session, server=server, clock=clock
    )
    return True


def _mark_dropped(
    db: Session, att: SecAggAttempt, stage: str, *, forced: bool
) -> list[SecAggMessage]:
    dropped = []
    for m in messages(db, att, stage):
        if m.status == MSG_ASKED:
            m.status = MSG_DROPPED
            why = "the admin closed the stage" if forced else "no valid answer by the deadline"
            m.error = f"{m.error}; {why}" if m.error else why
            dropped.append(m)
    return dropped


def _close_stage(
    portal: Portal,
    db: Session,
    fed: Federation,
    rnd: Round,
    att: SecAggAttempt,
    live: LiveSession,
    now: datetime,
    *,
    forced: bool,
) -> None:
    """Close the running stage: make the next stage's requests, or publish the aggregate."""
    stage = att.stage
    server = live.server
    dropped = _mark_dropped(db, att, stage, forced=forced)
    live.clock.fixed = _ts(now)
    t0 = time.perf_counter()
    try:
        out = getattr(server, f"receive_{stage}")()
    except FedcryptError as exc:
        db.flush()
        _fail(portal, db, fed, rnd, att, now, f"stage {stage}: {exc}")
        return
    finally:
        live.clock.fixed = None
    att.server_seconds += time.perf_counter() - t0
    if dropped:
        log.warning(
            "secagg relay: %s round %d stage %s closed; dropped out: %s",
            fed.name,
            rnd.number,
            stage,
            ", ".join(str(m.member.hospital_id) for m in dropped),
        )
    if stage == STAGES[-1]:
        _publish(portal, db, fed, rnd, att, live, out, now)
        return
    nxt = STAGES[STAGES.index(stage) + 1]
    _store_requests(portal, db, att, nxt, out, _members_by_hospital(db, fed), now)
    att.stage = nxt
    assert server.deadline is not None
    att.stage_deadline_at = _from_ts(server.deadline)
    try:
        db.commit()
    except BaseException:
        db.rollback()
        _drop_live(portal, att.id)
        raise


def _publish(
    portal: Portal,
    db: Session,
    fed: Federation,
    rnd: Round,
    att: SecAggAttempt,
    live: LiveSession,
    aggregate: bytes,
    now: datetime,
) -> None:
    from fedcrypt.portal.services.aggregation import finish_round

    survivors = list(live.server.survivors)
    blobs = _message_blobs(messages(db, att))
    with portal.blob_lock:
        sha = portal.store.put_bytes(aggregate)
    att.stage = ATTEMPT_DONE
    att.closed_at = now
    try:
        finish_round(
            db,
            fed,
            rnd,
            now=now,
            sha=sha,
            size=len(aggregate),
            num_updates=len(survivors),
            total_examples=None,
            seconds=att.server_seconds,
            actor=None,
            client_ip="",
            detail=(
                f"secagg session of protocol round {att.protocol_round}: {len(survivors)} "
                f"masked updates {survivors} (threshold {att.threshold}), "
                f"{len(live.server.signers)} consistency signatures"
            ),
        )
        db.commit()
    except BaseException:
        db.rollback()
        _drop_live(portal, att.id)
        delete_if_unreferenced(portal, sha)
        raise
    _drop_live(portal, att.id)
    delete_if_unreferenced(portal, *blobs)


def _fail(
    portal: Portal,
    db: Session,
    fed: Federation,
    rnd: Round,
    att: SecAggAttempt,
    now: datetime,
    reason: str,
) -> None:
    """End the session as failed; the round becomes ``failed`` and a new session opens."""
    blobs = _message_blobs(messages(db, att))
    for m in messages(db, att):
        if m.status == MSG_ASKED:
            m.status = MSG_DROPPED
            m.error = m.error or "the session failed before it answered"
    stage = att.stage
    att.stage = ATTEMPT_FAILED
    att.closed_at = now
    att.error = reason
    rnd.status = ROUND_FAILED
    rnd.failed_at = now
    rnd.failed_upload_id = None
    rnd.error = (
        f"secure aggregation failed (session of protocol round {att.protocol_round or '-'}, "
        f"stage {stage}): {reason}. A new session starts when enough hospitals join "
        "again (participating hospitals rejoin by themselves)"
    )
    db.add(_new_attempt(fed, rnd, now, first=False))
    record(
        db,
        at=now,
        actor=None,
        actor_label=SERVER_ACTOR,
        action="round.secagg_failed",
        target=f"{fed.name} round {rnd.number}",
        detail=rnd.error,
    )
    log.warning("secagg relay: %s round %d: %s", fed.name, rnd.number, rnd.error)
    db.commit()
    _drop_live(portal, att.id)
    delete_if_unreferenced(portal, *blobs)


# --- a hospital's side ----------------------------------------------------------------------


def _open_round(db: Session, fed: Federation, number: int) -> Round:
    rnd = feds.get_round(db, fed, number)
    if fed.status == FED_CANCELLED or rnd.status == ROUND_CANCELLED:
        raise ConflictError(f"round {number} was cancelled by the admin")
    if rnd.status == ROUND_AGGREGATED:
        raise ConflictError(f"round {number} is closed (already aggregated)")
    return rnd


def _member(db: Session, fed: Federation, user: User) -> SecAggMember:
    m = member_of(db, fed, user.id)
    if m is None:
        raise ForbiddenError(
            f"this account is not enrolled in {fed.name!r}: enrol first (fedcrypt portal "
            "participate does it with your hospital-<i>.key)"
        )
    return m


def join(
    portal: Portal, *, federation_id: int, round_number: int, user: User, client_ip: str
) -> SecAggTurn:
    """Check ``user``'s hospital in for round ``round_number``'s session (idempotent).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the round is not the open one, or its session started without this hospital.
    fedcrypt.portal.errors.ForbiddenError
        If the account is not enrolled.
    """
    with portal.aggregation_lock, portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        require_secagg(fed)
        rnd = _open_round(db, fed, round_number)
        latest = feds.latest_round(db, fed)
        if fed.status != FED_RUNNING or latest is None or latest.id != rnd.id:
            raise ConflictError(f"round {round_number} is not the federation's open round")
        member = _member(db, fed, user)
        now = portal.clock()
        att = _ensure_attempt(db, fed, rnd, now)
        if att.stage != ATTEMPT_JOIN:
            db.commit()
            raise ConflictError(
                f"round {round_number}'s secure-aggregation session started without hospital "
                f"{member.hospital_id}: it follows the global model from the round's "
                "aggregate and takes part again from the next round"
            )
        if _message(db, att, member, ATTEMPT_JOIN) is None:
            db.add(
                SecAggMessage(
                    attempt_id=att.id,
                    member_id=member.id,
                    stage=ATTEMPT_JOIN,
                    status=MSG_JOINED,
                    asked_at=now,
                    refusals=0,
                )
            )
            record(
                db,
                at=now,
                actor=user,
                action="secagg.join",
                target=f"{fed.name} round {round_number}",
                detail=f"hospital {member.hospital_id}",
                client_ip=client_ip,
            )
        db.commit()
        _advance_locked(portal, federation_id, force=False, actor=None, client_ip="")
        db.expire_all()
        return turn(db, fed, round_number, user)


def turn(db: Session, fed: Federation, number: int, user: User) -> SecAggTurn:
    """What ``user``'s hospital should do now in round ``number`` (see :class:`SecAggTurn`)."""
    require_secagg(fed)
    rnd = feds.get_round(db, fed, number)

    def out(action: str, detail: str, att: SecAggAttempt | None = None, **kw: Any) -> SecAggTurn:
        if att is not None:
            kw.update(
                attempt=att.id,
                protocol_round=att.protocol_round,
                stage=att.stage,
                stage_deadline_at=att.stage_deadline_at,
            )
        return SecAggTurn(round=number, round_status=rnd.status, action=action, detail=detail, **kw)

    if rnd.status == ROUND_AGGREGATED:
        return out("aggregated", "download the aggregate")
    if fed.status == FED_CANCELLED or rnd.status == ROUND_CANCELLED:
        return out("closed", "the round was cancelled")
    member = member_of(db, fed, user.id)
    if member is None:
        return out("enrol", "enrol in the federation first")
    att = current_attempt(db, rnd)
    if att is None or att.stage not in ACTIVE:
        return out("join", "check in for the round's session")
    if att.stage == ATTEMPT_JOIN:
        if _message(db, att, member, ATTEMPT_JOIN) is None:
            return out("join", "check in for the session", att)
        return out("wait", "joined; the session starts with the quorum", att)
    row = _message(db, att, member, att.stage)
    if row is not None and row.status == MSG_ASKED:
        return out(
            "answer",
            f"answer the {att.stage} request",
            att,
            request_sha256=row.request_sha256,
            request_size=row.request_size,
        )
    if row is not None and row.status == MSG_ANSWERED:
        return out("wait", f"answered {att.stage}; waiting for the others", att)
    last = db.scalar(
        select(SecAggMessage)
        .where(SecAggMessage.attempt_id == att.id, SecAggMessage.member_id == member.id)
        .order_by(SecAggMessage.id.desc())
        .limit(1)
    )
    why = (
        f"dropped out at stage {last.stage} ({last.error})"
        if last is not None and last.status == MSG_DROPPED
        else "not invited to the running session"
    )
    return out("follow", f"{why}: follow from the round's aggregate", att)


def request_for(db: Session, fed: Federation, number: int, user: User) -> tuple[str, str]:
    """The blob (sha256) and stage of the request awaiting ``user``'s hospital.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If no request awaits this hospital's answer now.
    """
    t = turn(db, fed, number, user)
    if t.action != "answer" or t.request_sha256 is None or t.stage is None:
        raise ConflictError(f"no secagg request awaits this hospital in round {number}: {t.detail}")
    return t.request_sha256, t.stage


def precheck_reply(
    portal: Portal, *, federation_id: int, round_number: int, user: User
) -> tuple[str, int]:
    """Refuse a reply before reading it; return the running stage and its byte limit.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the round's session is not in a protocol stage, or this hospital's replies
        were refused too often in this stage.
    fedcrypt.portal.errors.ForbiddenError
        If the account is not enrolled.
    """
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        require_secagg(fed)
        rnd = _open_round(db, fed, round_number)
        member = _member(db, fed, user)
        att = current_attempt(db, rnd)
        if att is None or att.stage not in STAGES:
            raise ConflictError(
                f"round {round_number} has no running secure-aggregation stage to answer"
            )
        row = _message(db, att, member, att.stage)
        if row is not None and row.refusals >= MAX_REFUSALS_PER_STAGE:
            raise ConflictError(
                f"hospital {member.hospital_id}: {row.refusals} replies to stage {att.stage} "
                "were refused; no more are read in this stage"
            )
        limit = reply_limit(att.stage, _config_of(att))
        return att.stage, min(limit, portal.settings.max_upload_bytes)


def _refusal(exc: ProtocolError, message: str) -> PortalError:
    if isinstance(exc, SignatureError):
        return ForbiddenError(message)
    if isinstance(exc, ReplayError | SessionMismatchError | DeadlineError):
        return ConflictError(message)
    return InvalidContentError(message)


def accept_reply(
    portal: Portal,
    *,
    federation_id: int,
    round_number: int,
    user: User,
    pending: PendingBlob,
    claimed_sha256: str,
    client_ip: str,
) -> SecAggReplyPublic:
    """Check a hospital's reply with the protocol and keep it; close the stage if complete.

    The reply is submitted to the session's protocol server as coming from the account's
    enrolled hospital (the token authenticates the account, the reply's Ed25519
    signature the hospital). A refusal is recorded (audit ``secagg.reject``) and raised;
    the hospital may still send a valid reply before the stage closes.

    Raises
    ------
    fedcrypt.portal.errors.PortalError
        ``BadRequestError`` for a checksum mismatch; ``ForbiddenError`` for a reply not
        signed by this hospital's registered key (e.g. by an unregistered key);
        ``ConflictError`` for a replayed reply (another round or stage, a second
        answer), one for another session, one after the stage's deadline, or when the
        stage closed; ``InvalidContentError`` for a malformed reply, one that answers a
        request other than the one sent, or one signed by another hospital.
    """
    try:
        digest = pending.finish()
        if digest != claimed_sha256:
            raise BadRequestError(
                f"checksum mismatch: the received body has SHA-256 {digest}, but "
                f"X-Content-SHA256 says {claimed_sha256}; nothing was stored"
            )
        with portal.aggregation_lock:
            return _accept_locked(
                portal,
                federation_id=federation_id,
                round_number=round_number,
                user=user,
                pending=pending,
                client_ip=client_ip,
            )
    finally:
        pending.discard()


def _accept_locked(
    portal: Portal,
    *,
    federation_id: int,
    round_number: int,
    user: User,
    pending: PendingBlob,
    client_ip: str,
) -> SecAggReplyPublic:
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        require_secagg(fed)
        rnd = _open_round(db, fed, round_number)
        member = _member(db, fed, user)
        hid = member.hospital_id
        att = current_attempt(db, rnd)
        if att is None or att.stage not in STAGES:
            raise ConflictError(
                f"round {round_number} has no running secure-aggregation stage to answer"
            )
        stage = att.stage
        now = portal.clock()
        row = _message(db, att, member, stage)
        if row is None:
            raise _late_or_uninvited(db, att, member)
        try:
            live = _live(portal, db, fed, att)
        except RelayStateError as exc:
            _fail(portal, db, fed, rnd, att, now, str(exc))
            raise ConflictError(f"the round's session failed: {exc}") from exc
        data = pending.path.read_bytes()
        live.clock.fixed = _ts(now)
        try:
            live.server.submit(hid, data)
        except ProtocolError as exc:
            message = (
                f"secagg {stage} reply of hospital {hid} ({user.name}) refused: {exc} "
                f"[{type(exc).__name__}]"
            )
            row.refusals += 1
            row.error = f"{type(exc).__name__}: {exc}"[:2000]
            record(
                db,
                at=now,
                actor=user,
                action="secagg.reject",
                target=f"{fed.name} round {round_number}",
                detail=message,
                client_ip=client_ip,
            )
            db.commit()
            raise _refusal(exc, message) from exc
        finally:
            live.clock.fixed = None
        try:
            with portal.blob_lock:
                sha = portal.store.commit(pending)
                row.status = MSG_ANSWERED
                row.reply_sha256 = sha
                row.reply_size = len(data)
                row.replied_at = now
                db.commit()
        except BaseException:
            db.rollback()
            _drop_live(portal, att.id)  # rebuilt from the database on the next request
            raise
        closed = not live.server.awaiting
        if closed:
            _close_stage(portal, db, fed, rnd, att, live, now, forced=False)
        return SecAggReplyPublic(
            round=round_number,
            stage=stage,
            hospital_id=hid,
            size=len(data),
            sha256=sha,
            stage_closed=closed,
        )


def _late_or_uninvited(db: Session, att: SecAggAttempt, member: SecAggMember) -> PortalError:
    """The error for a reply from a hospital not asked in the running stage."""
    rows = [m for m in messages(db, att) if m.member_id == member.id]
    dropped = next((m for m in rows if m.status == MSG_DROPPED), None)
    hid = member.hospital_id
    if dropped is not None:
        return ConflictError(
            f"secagg reply of hospital {hid} ({member.user.name}) refused: the {dropped.stage} "
            f"stage of this session closed without its answer ({dropped.error}); it dropped "
            "out and follows from the round's aggregate [DeadlineError]"
        )
    return ConflictError(
        f"secagg reply of hospital {hid} ({member.user.name}) refused: it is not in stage "
        f"{att.stage} of the running session (not invited)"
    )


def abandon(portal: Portal, db: Session, fed: Federation, now: datetime) -> list[str]:
    """Mark the federation's running sessions abandoned (cancelled); return their blobs.

    The caller commits, then deletes the returned blobs with
    :func:`~fedcrypt.portal.services.blobs.delete_if_unreferenced`.
    """
    blobs: list[str] = []
    for att in db.scalars(
        select(SecAggAttempt).where(
            SecAggAttempt.federation_id == fed.id, SecAggAttempt.stage.in_(ACTIVE)
        )
    ):
        blobs += _message_blobs(messages(db, att))
        att.stage = ATTEMPT_ABANDONED
        att.closed_at = now
        _drop_live(portal, att.id)
    return blobs


def ensure_request_blob(portal: Portal, sha: str) -> None:
    """Raise 404 if a request blob is missing (it is deleted when its session ends)."""
    if not portal.store.exists(sha):
        raise NotFoundError("the request is no longer stored: its session has ended")
