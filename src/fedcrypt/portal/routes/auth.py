"""``/auth``: exchange e-mail and password for an API token (rate limited)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from fedcrypt.portal.deps import ClientIP, PortalDep, SessionDep
from fedcrypt.portal.schemas import TokenPublic, TokenRequest, UserPublic
from fedcrypt.portal.services import accounts

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/token", response_model=TokenPublic, status_code=201)
def issue_token(
    body: TokenRequest, response: Response, portal: PortalDep, db: SessionDep, ip: ClientIP
) -> TokenPublic:
    """Issue a new API token for an approved account (the previous one is revoked).

    The token is shown once (``Cache-Control: no-store``); the portal stores only its
    SHA-256. Failed attempts are rate limited per account and client address, and per
    client address (HTTP 429).
    """
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    user = accounts.authenticate(
        portal, db, email=body.email, password=body.password.get_secret_value(), client_ip=ip
    )
    value, row = accounts.issue_api_token(portal, db, user, client_ip=ip)
    return TokenPublic(token=value, expires_at=row.expires_at, user=UserPublic.model_validate(user))
