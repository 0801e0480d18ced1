"""``/hospitals``: registration (public) and the admin's approval decisions."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from fedcrypt.portal.deps import AdminUser, ClientIP, HospitalId, PortalDep, SessionDep
from fedcrypt.portal.models import STATUS_APPROVED, STATUS_REJECTED, STATUS_SUSPENDED
from fedcrypt.portal.schemas import HospitalCreate, UserPublic
from fedcrypt.portal.services import accounts

router = APIRouter(prefix="/hospitals", tags=["hospitals"])

_DECISIONS = {"approve": STATUS_APPROVED, "reject": STATUS_REJECTED, "suspend": STATUS_SUSPENDED}


@router.post("", response_model=UserPublic, status_code=201)
def register(body: HospitalCreate, portal: PortalDep, db: SessionDep, ip: ClientIP) -> UserPublic:
    """Register a hospital; it stays ``pending`` until the admin approves it."""
    return UserPublic.model_validate(accounts.register_hospital(portal, db, body, client_ip=ip))


@router.get("", response_model=list[UserPublic])
def list_hospitals(
    db: SessionDep,
    _admin: AdminUser,
    status: Literal["pending", "approved", "rejected", "suspended"] | None = None,
) -> list[UserPublic]:
    """Hospital accounts (admin only), optionally filtered by status."""
    return [UserPublic.model_validate(u) for u in accounts.list_hospitals(db, status=status)]


@router.post("/{hospital_id}/{decision}", response_model=UserPublic)
def decide(
    hospital_id: HospitalId,
    decision: Literal["approve", "reject", "suspend"],
    portal: PortalDep,
    db: SessionDep,
    admin: AdminUser,
    ip: ClientIP,
) -> UserPublic:
    """Approve, reject or suspend a hospital (admin only); reject/suspend revoke its tokens."""
    user = accounts.set_hospital_status(
        portal, db, hospital_id=hospital_id, status=_DECISIONS[decision], actor=admin, client_ip=ip
    )
    return UserPublic.model_validate(user)
