"""Admin pages: the hospital approval queue and the audit log."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request, Response
from sqlalchemy import func, select

from fedcrypt.portal.deps import ClientIP, PortalDep, SessionDep, WebAdmin
from fedcrypt.portal.models import (
    STATUS_APPROVED,
    STATUS_PENDING,
    STATUS_REJECTED,
    STATUS_SUSPENDED,
    AuditEvent,
)
from fedcrypt.portal.services import accounts
from fedcrypt.portal.web.common import check_csrf, redirect, render

router = APIRouter()

AUDIT_PAGE = 100
_DECISIONS = {"approve": STATUS_APPROVED, "reject": STATUS_REJECTED, "suspend": STATUS_SUSPENDED}


@router.get("/admin/hospitals")
def approval_queue(request: Request, db: SessionDep, admin: WebAdmin) -> Response:
    """Pending registrations first, then every other hospital."""
    hospitals = accounts.list_hospitals(db)
    pending = [h for h in hospitals if h.status == STATUS_PENDING]
    others = [h for h in hospitals if h.status != STATUS_PENDING]
    return render(request, "hospitals.html", {"pending": pending, "others": others}, user=admin)


@router.post("/admin/hospitals/{hospital_id}/{decision}")
def decide(
    request: Request,
    hospital_id: int,
    decision: Literal["approve", "reject", "suspend"],
    portal: PortalDep,
    db: SessionDep,
    admin: WebAdmin,
    ip: ClientIP,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Approve, reject or suspend a hospital."""
    check_csrf(request, csrf_token)
    accounts.set_hospital_status(
        portal, db, hospital_id=hospital_id, status=_DECISIONS[decision], actor=admin, client_ip=ip
    )
    return redirect("/admin/hospitals")


@router.get("/audit")
def audit_log(
    request: Request,
    db: SessionDep,
    admin: WebAdmin,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    action: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    """Who did what, when, from where: newest first, 100 per page."""
    q = select(AuditEvent)
    count_q = select(func.count(AuditEvent.id))
    if action:
        q = q.where(AuditEvent.action == action)
        count_q = count_q.where(AuditEvent.action == action)
    total = db.scalar(count_q) or 0
    events = list(
        db.scalars(
            q.order_by(AuditEvent.id.desc()).offset((page - 1) * AUDIT_PAGE).limit(AUDIT_PAGE)
        )
    )
    actions = list(db.scalars(select(AuditEvent.action).distinct().order_by(AuditEvent.action)))
    return render(
        request,
        "audit.html",
        {
            "events": events,
            "page": page,
            "pages": max(1, -(-total // AUDIT_PAGE)),
            "total": total,
            "action": action,
            "actions": actions,
        },
        user=admin,
    )
