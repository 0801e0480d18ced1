"""Which stored blobs the database references, and removing those it does not (orphans)."""

from __future__ import annotations

import logging

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from fedcrypt.portal.context import Portal
from fedcrypt.portal.models import (
    ATTEMPT_JOIN,
    Federation,
    Round,
    SecAggAttempt,
    SecAggMessage,
    Upload,
)
from fedcrypt.protection.secagg import STAGES

#: Stages of a secagg session whose stored messages are still needed.
_RUNNING = (ATTEMPT_JOIN, *STAGES)

log = logging.getLogger(__name__)


def blob_referenced(db: Session, sha: str) -> bool:
    """Whether any upload, aggregate, initial model, public key file or request or reply
    of a running secagg session is the blob ``sha``."""
    running = (
        select(SecAggMessage.id)
        .join(SecAggAttempt, SecAggAttempt.id == SecAggMessage.attempt_id)
        .where(
            SecAggAttempt.stage.in_(_RUNNING),
            or_(SecAggMessage.request_sha256 == sha, SecAggMessage.reply_sha256 == sha),
        )
    )
    return bool(
        db.scalar(
            select(
                or_(
                    exists().where(Upload.sha256 == sha),
                    exists().where(Round.aggregate_sha256 == sha),
                    exists().where(Federation.initial_model_sha256 == sha),
                    exists().where(Federation.server_key_sha256 == sha),
                    running.exists(),
                )
            )
        )
    )


def delete_if_unreferenced(portal: Portal, *shas: str | None) -> None:
    """Delete each blob that no row references any more (under the blob lock)."""
    with portal.blob_lock, portal.session() as db:
        for sha in shas:
            if sha is not None and not blob_referenced(db, sha):
                portal.store.delete(sha)


def referenced_blobs(db: Session) -> set[str]:
    """Every blob hash the database references."""
    out: set[str] = set()
    for column in (
        Upload.sha256,
        Round.aggregate_sha256,
        Federation.initial_model_sha256,
        Federation.server_key_sha256,
    ):
        out.update(s for s in db.scalars(select(column).distinct()) if s is not None)
    for column in (SecAggMessage.request_sha256, SecAggMessage.reply_sha256):
        q = (
            select(column)
            .join(SecAggAttempt, SecAggAttempt.id == SecAggMessage.attempt_id)
            .where(SecAggAttempt.stage.in_(_RUNNING))
            .distinct()
        )
        out.update(s for s in db.scalars(q) if s is not None)
    return out


def sweep_orphans(portal: Portal) -> int:
    """Delete every blob in the store that no row references; return how many.

    Run at startup (before requests are served) and safe at any time: it holds the blob
    lock, under which uploads move a blob into place and reference it in one step.
    """
    removed = 0
    with portal.blob_lock, portal.session() as db:
        keep = referenced_blobs(db)
        for sha in portal.store.list_blobs():
            if sha not in keep:
                portal.store.delete(sha)
                removed += 1
    if removed:
        log.info("removed %d orphan blobs", removed)
    return removed
