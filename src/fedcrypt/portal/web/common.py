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
from fedcrypt.portal.errors import ForbiddenError
from fedcrypt.portal.models import User
from fedcrypt.portal.security import csrf_token, csrf_valid

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


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    user: User | None,
    status_code: int = 200,
) -> HTMLResponse:
    """Render a template with ``user`` and a fresh CSRF form token.

    The CSRF nonce lives in an HttpOnly cookie; forms carry its HMAC under the server
    secret (signed double-submit). A nonce is created on the first page a browser sees.
    """
    portal = _portal(request)
    nonce = request.cookies.get(CSRF_COOKIE)
    fresh = not nonce or len(nonce) > 100
    if fresh:
        nonce = secrets.token_urlsafe(32)
    assert nonce is not None
    ctx: dict[str, Any] = {
        "user": user,
        "csrf_token": csrf_token(portal.settings.secret_key.get_secret_value(), nonce),
    }
    ctx.update(context or {})
    response = templates.TemplateResponse(request, name, ctx, status_code=status_code)
    if fresh:
        response.set_cookie(
            CSRF_COOKIE,
            nonce,
            httponly=True,
            samesite="lax",
            secure=portal.settings.cookie_secure,
            path="/",
        )
    return response


def check_csrf(request: Request, token: str) -> None:
    """Refuse a form whose token does not match the browser's CSRF cookie.

    Raises
    ------
    fedcrypt.portal.errors.ForbiddenError
        If the check fails (HTTP 403).
    """
    portal = _portal(request)
    if not csrf_valid(
        portal.settings.secret_key.get_secret_value(), request.cookies.get(CSRF_COOKIE), token
    ):
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
