"""What the pages and the API show of a secagg round: sessions, stages, who dropped out."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from fedcrypt.portal.models import (
    ATTEMPT_DONE,
    ATTEMPT_JOIN,
    MSG_ANSWERED,
    MSG_DROPPED,
    MSG_JOINED,
    ROUND_AGGREGATED,
    Federation,
    Round,
    SecAggAttempt,
    SecAggMessage,
)
from fedcrypt.portal.schemas import (
    SecAggAttemptPublic,
    SecAggHospitalProgress,
    SecAggStageProgress,
)
from fedcrypt.portal.services.relay import ACTIVE, attempts_of, current_attempt, messages
from fedcrypt.portal.services.secagg_members import list_members
from fedcrypt.protection.secagg import STAGES


def attempt_public(db: Session, att: SecAggAttempt) -> SecAggAttemptPublic:
    """A session's stage progress and where each hospital stands."""
    rows = messages(db, att)
    stages: list[SecAggStageProgress] = []
    for stage in (ATTEMPT_JOIN, *STAGES):
        mine = [m for m in rows if m.stage == stage]
        if not mine:
            continue
        stages.append(
            SecAggStageProgress(
                stage=stage,
                asked=len(mine),
                answered=sum(m.status in (MSG_ANSWERED, MSG_JOINED) for m in mine),
                dropped=sum(m.status == MSG_DROPPED for m in mine),
                opened_at=min(m.asked_at for m in mine),
            )
        )
    hospitals: list[SecAggHospitalProgress] = []
    by_member: dict[int, list[SecAggMessage]] = {}
    for m in rows:
        by_member.setdefault(m.member_id, []).append(m)
    order = {s: i for i, s in enumerate((ATTEMPT_JOIN, *STAGES))}
    survivors: set[int] = set()
    if att.stage == ATTEMPT_DONE:
        survivors = {
            m.member_id for m in rows if m.stage == "masked_input" and m.status == MSG_ANSWERED
        }
    for member_rows in by_member.values():
        member_rows.sort(key=lambda m: order.get(m.stage, 99))
        last = member_rows[-1]
        dropped = next((m for m in member_rows if m.status == MSG_DROPPED), None)
        if dropped is not None:
            status, stage, reason = MSG_DROPPED, dropped.stage, dropped.error
        elif last.member_id in survivors:
            status, stage, reason = "contributed", last.stage, None
        else:
            status, stage, reason = last.status, last.stage, last.error
        hospitals.append(
            SecAggHospitalProgress(
                hospital_id=last.member.hospital_id,
                user_id=last.member.user_id,
                hospital=last.member.user.name,
                status=status,
                stage=stage,
                reason=reason,
                bytes_up=sum(m.reply_size or 0 for m in member_rows),
                bytes_down=sum(m.request_size or 0 for m in member_rows),
            )
        )
    hospitals.sort(key=lambda h: h.hospital_id)
    return SecAggAttemptPublic(
        attempt=att.id,
        protocol_round=att.protocol_round,
        stage=att.stage,
        threshold=att.threshold,
        invited=att.num_invited,
        opened_at=att.opened_at,
        started_at=att.started_at,
        closed_at=att.closed_at,
        stage_deadline_at=att.stage_deadline_at,
        server_seconds=att.server_seconds,
        error=att.error,
        stages=stages,
        hospitals=hospitals,
    )


def round_progress(db: Session, rnd: Round) -> list[SecAggAttemptPublic]:
    """Every session of the round, oldest first, with its stage progress."""
    return [attempt_public(db, a) for a in attempts_of(db, rnd)]


def round_summary(db: Session, fed: Federation, rnd: Round) -> dict[str, Any]:
    """The secagg fields of a round's API view (:class:`~fedcrypt.portal.schemas.RoundPublic`)."""
    att = current_attempt(db, rnd)
    enrolled = len(list_members(db, fed))
    if att is None:
        return {"stage": None, "num_uploads": 0, "expected_uploads": max(enrolled, fed.quorum)}
    rows = messages(db, att)
    joined = sum(m.stage == ATTEMPT_JOIN for m in rows)
    masked = sum(m.stage == "masked_input" and m.status == MSG_ANSWERED for m in rows)
    return {
        "stage": att.stage,
        "stage_deadline_at": att.stage_deadline_at if att.stage in ACTIVE else None,
        "protocol_round": att.protocol_round,
        "num_joined": joined,
        "num_uploads": rnd.num_updates if rnd.status == ROUND_AGGREGATED else masked,
        "expected_uploads": att.num_invited if att.num_invited else max(enrolled, fed.quorum),
    }
