"""``/audit``: the audit log (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from fedcrypt.portal.deps import AdminUser, SessionDep
from fedcrypt.portal.models import AuditEvent
from fedcrypt.portal.schemas import AuditEventPublic

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=list[AuditEventPublic])
def read_audit(
    db: SessionDep,
    _admin: AdminUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1 << 31)] = 0,
    action: Annotated[str | None, Query(max_length=64)] = None,
) -> list[AuditEventPublic]:
    """Audit events, newest first, optionally filtered by action (e.g. ``update.reject``)."""
    q = select(AuditEvent)
    if action:
        q = q.where(AuditEvent.action == action)
    rows = db.scalars(q.order_by(AuditEvent.id.desc()).offset(offset).limit(limit))
    return [AuditEventPublic.model_validate(r) for r in rows]
