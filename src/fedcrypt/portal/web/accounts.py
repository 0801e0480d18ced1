"""Pages for signing in and out, registering a hospital, and the account's API token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from pydantic import ValidationError
from sqlalchemy import select

from fedcrypt.portal.deps import (
    SESSION_COOKIE,
    ClientIP,
    PortalDep,
    SessionDep,
    WebUser,
    WebUserOptional,
)
from fedcrypt.portal.errors import (
    ForbiddenError,
    NotAuthenticatedError,
    PortalError,
    RateLimitedError,
)
from fedcrypt.portal.models import ApiToken
from fedcrypt.portal.schemas import PASSWORD_MIN, HospitalCreate
from fedcrypt.portal.services import accounts
from fedcrypt.portal.web.common import check_csrf, redirect, render, safe_next

router = APIRouter()

FormStr = Annotated[str, Form(max_length=4000)]


@router.get("/")
def home(user: WebUserOptional) -> Response:
    """Send visitors to the federations (signed in) or the sign-in page."""
    return redirect("/federations" if user else "/login")


@router.get("/login")
def login_page(request: Request, user: WebUserOptional, next: str = "/federations") -> Response:
    """The sign-in form."""
    return render(request, "login.html", {"next": safe_next(next), "email": ""}, user=user)


@router.post("/login")
def login_submit(
    request: Request,
    portal: PortalDep,
    db: SessionDep,
    ip: ClientIP,
    email: FormStr = "",
    password: FormStr = "",
    next: FormStr = "/federations",
    csrf_token: FormStr = "",
) -> Response:
    """Check the credentials (rate limited) and start a session."""
    check_csrf(request, csrf_token)
    try:
        user = accounts.authenticate(portal, db, email=email, password=password, client_ip=ip)
    except (NotAuthenticatedError, ForbiddenError, RateLimitedError) as exc:
        return render(
            request,
            "login.html",
            {"error": exc.message, "next": safe_next(next), "email": email},
            user=None,
            status_code=exc.status_code,
        )
    value = accounts.create_web_session(portal, db, user, client_ip=ip)
    response = redirect(safe_next(next))
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=int(portal.settings.session_ttl_hours * 3600),
        httponly=True,
        samesite="lax",
        secure=portal.settings.cookie_secure,
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request, db: SessionDep, csrf_token: FormStr = "") -> Response:
    """End the session."""
    check_csrf(request, csrf_token)
    accounts.end_web_session(db, request.cookies.get(SESSION_COOKIE))
    response = redirect("/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/register")
def register_page(request: Request, user: WebUserOptional) -> Response:
    """The hospital registration form."""
    return render(request, "register.html", {"form": {}, "password_min": PASSWORD_MIN}, user=user)


@router.post("/register")
def register_submit(
    request: Request,
    portal: PortalDep,
    db: SessionDep,
    ip: ClientIP,
    name: FormStr = "",
    email: FormStr = "",
    password: FormStr = "",
    password_confirm: FormStr = "",
    csrf_token: FormStr = "",
) -> Response:
    """Create a pending hospital account."""
    check_csrf(request, csrf_token)
    form = {"name": name, "email": email}
    errors: list[str] = []
    if password != password_confirm:
        errors.append("the two passwords differ")
    data: HospitalCreate | None = None
    try:
        data = HospitalCreate(name=name, email=email, password=password)  # type: ignore[arg-type]
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(x) for x in err["loc"])
            errors.append(f"{field}: {err['msg']}")
    if data is not None and not errors:
        try:
            user = accounts.register_hospital(portal, db, data, client_ip=ip)
        except PortalError as exc:
            errors.append(exc.message)
        else:
            return render(request, "registered.html", {"hospital": user}, user=None)
    return render(
        request,
        "register.html",
        {"form": form, "errors": errors, "password_min": PASSWORD_MIN},
        user=None,
        status_code=422,
    )


@router.get("/account")
def account_page(request: Request, db: SessionDep, user: WebUser) -> Response:
    """The account's details and its API token status."""
    token = db.scalar(
        select(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .order_by(ApiToken.id.desc())
        .limit(1)
    )
    return render(request, "account.html", {"token": token}, user=user)


@router.post("/account/token")
def account_new_token(
    request: Request,
    portal: PortalDep,
    db: SessionDep,
    user: WebUser,
    ip: ClientIP,
    csrf_token: FormStr = "",
) -> Response:
    """Issue a new API token (revoking the previous one) and show it once."""
    check_csrf(request, csrf_token)
    fresh = db.merge(user)
    value, row = accounts.issue_api_token(portal, db, fresh, client_ip=ip)
    response = render(
        request,
        "token.html",
        {"token_value": value, "token": row, "base_url": str(request.base_url).rstrip("/")},
        user=user,
    )
    response.headers["Cache-Control"] = "no-store"
    return response
