"""Rendering pages with a CSRF token, checking submitted forms, formatting helpers."""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from fedcrypt.portal.context import Portal
from fedcrypt.portal.deps import SESSION_COOKIE
from fedcrypt.portal.errors import ForbiddenError
from fedcrypt.portal.models import User
from fedcrypt.portal.security import csrf_token, csrf_valid
from fedcrypt.portal.services import accounts

CSRF_COOKIE = "fedcrypt_csrf"
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"


def human_bytes(n: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def fmt_time(dt: datetime | None) -> str:
    """A UTC timestamp as ``2026-11-22 14:03:05 UTC``."""
    if dt is None:
        return "–"
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_metric(x: float | None) -> str:
    """A metric with 4 decimals, or a dash."""
    return "–" if x is None else f"{x:.4f}"


templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
templates.env.filters["bytes"] = human_bytes
templates.env.filters["time"] = fmt_time
templates.env.filters["metric"] = fmt_metric


def _portal(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


def _session_binding(request: Request) -> str | None:
    """``"session:<key id>"`` of the browser's valid session, else ``None``."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    portal = _portal(request)
    with portal.session() as db:
        row = accounts.active_session(portal, db, cookie)
        return f"session:{row.key_id}" if row is not None else None


def _valid_nonce(value: str | None) -> str | None:
    return value if value and len(value) <= 100 else None


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    user: User | None,
    status_code: int = 200,
) -> HTMLResponse:
    """Render a template with ``user`` and a CSRF form token bound to the session.

    A signed-in browser's forms carry an HMAC (server secret) of its session's id, so a
    token is worthless outside that session. Before sign-in, forms carry the HMAC of an
    HttpOnly nonce cookie (signed double-submit), created on the first page a browser
    sees.
    """
    portal = _portal(request)
    binding = _session_binding(request)
    fresh: str | None = None
    if binding is None:
        nonce = _valid_nonce(request.cookies.get(CSRF_COOKIE))
        if nonce is None:
            nonce = fresh = secrets.token_urlsafe(32)
        binding = f"nonce:{nonce}"
    ctx: dict[str, Any] = {
        "user": user,
        "csrf_token": csrf_token(portal.settings.secret_key.get_secret_value(), binding),
    }
    ctx.update(context or {})
    response = templates.TemplateResponse(request, name, ctx, status_code=status_code)
    if fresh is not None:
        response.set_cookie(
            CSRF_COOKIE,
            fresh,
            httponly=True,
            samesite="lax",
            secure=portal.settings.cookie_secure,
            path="/",
        )
    return response


def check_csrf(request: Request, token: str) -> None:
    """Refuse a form whose token is not bound to this browser's session (or nonce).

    Raises
    ------
    fedcrypt.portal.errors.ForbiddenError
        If the check fails (HTTP 403).
    """
    portal = _portal(request)
    binding = _session_binding(request)
    if binding is None:
        nonce = _valid_nonce(request.cookies.get(CSRF_COOKIE))
        binding = f"nonce:{nonce}" if nonce else None
    if not csrf_valid(portal.settings.secret_key.get_secret_value(), binding, token):
        raise ForbiddenError(
            "the form was not sent from this portal's page or has expired (CSRF check "
            "failed); reload the page and try again"
        )


def redirect(path: str) -> RedirectResponse:
    """A 303 redirect (after a successful form post)."""
    return RedirectResponse(path, status_code=303)


def safe_next(value: str | None) -> str:
    """A local path to continue to after sign-in (never another site)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/federations"
