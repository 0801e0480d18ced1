"""FastAPI dependencies as ``Annotated`` aliases: ``PortalDep``, ``SessionDep``, ``CurrentUser``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from fedcrypt.portal.context import Portal
from fedcrypt.portal.errors import ForbiddenError, NotAuthenticatedError
from fedcrypt.portal.models import ROLE_HOSPITAL, User
from fedcrypt.portal.schemas import MAX_ID
from fedcrypt.portal.services import accounts

SESSION_COOKIE = "fedcrypt_session"

#: Path parameters, bounded so that no number reaches the database unchecked.
FederationId = Annotated[int, Path(ge=1, le=MAX_ID, description="The federation's id.")]
RoundNumber = Annotated[int, Path(ge=1, le=MAX_ID, description="The round number (from 1).")]
UploadId = Annotated[int, Path(ge=1, le=MAX_ID, description="The upload's id.")]
HospitalId = Annotated[int, Path(ge=1, le=MAX_ID, description="The hospital account's id.")]

_bearer = HTTPBearer(auto_error=False, description="An API token from POST /api/v1/auth/token")


def get_portal(request: Request) -> Portal:
    """The portal state attached to the application."""
    portal: Portal = request.app.state.portal
    return portal


PortalDep = Annotated[Portal, Depends(get_portal)]


def get_db(portal: PortalDep) -> Iterator[Session]:
    """A database session for one request."""
    with portal.session() as db:
        yield db


SessionDep = Annotated[Session, Depends(get_db)]


def get_client_ip(request: Request) -> str:
    """The caller's address (audit log, rate limits).

    The TCP peer, or what a trusted proxy (``--forwarded-allow-ips``) put in
    ``X-Forwarded-For``: :class:`fedcrypt.portal.proxy.ForwardedHeadersMiddleware`
    has already rewritten it. A spoofed header from anyone else is ignored.
    """
    return request.client.host if request.client else "unknown"


ClientIP = Annotated[str, Depends(get_client_ip)]


def get_current_user(
    portal: PortalDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The approved account behind the ``Authorization: Bearer`` API token.

    Uses its own short database session, so a long upload does not hold a connection.

    Raises
    ------
    fedcrypt.portal.errors.NotAuthenticatedError
        If the token is missing, unknown, revoked or expired (HTTP 401).
    fedcrypt.portal.errors.ForbiddenError
        If the account is pending, rejected or suspended (HTTP 403).
    """
    if creds is None or not creds.credentials:
        raise NotAuthenticatedError("missing API token: send 'Authorization: Bearer <token>'")
    with portal.session() as db:
        user = accounts.user_for_token(portal, db, creds.credentials)
        db.expunge(user)
        return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_admin(user: CurrentUser) -> User:
    """The current user, who must be the consortium admin (else HTTP 403)."""
    if not user.is_admin:
        raise ForbiddenError("only the consortium admin can do this")
    return user


AdminUser = Annotated[User, Depends(get_admin)]


def get_hospital(user: CurrentUser) -> User:
    """The current user, who must be an approved hospital (else HTTP 403)."""
    if user.role != ROLE_HOSPITAL:
        raise ForbiddenError("only hospital accounts can do this")
    return user


HospitalUser = Annotated[User, Depends(get_hospital)]


class LoginRequiredError(Exception):
    """A page needs a signed-in user; the app redirects to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def get_web_user_optional(request: Request, portal: PortalDep) -> User | None:
    """The approved account behind the session cookie, or ``None``."""
    with portal.session() as db:
        user = accounts.user_for_session(portal, db, request.cookies.get(SESSION_COOKIE))
        if user is not None:
            db.expunge(user)
        return user


WebUserOptional = Annotated[User | None, Depends(get_web_user_optional)]


def get_web_user(request: Request, user: WebUserOptional) -> User:
    """The signed-in account; otherwise redirect to the sign-in page."""
    if user is None:
        raise LoginRequiredError(request.url.path)
    return user


WebUser = Annotated[User, Depends(get_web_user)]


def get_web_admin(user: WebUser) -> User:
    """The signed-in consortium admin (else HTTP 403)."""
    if not user.is_admin:
        raise ForbiddenError("only the consortium admin can see this page")
    return user


WebAdmin = Annotated[User, Depends(get_web_admin)]
