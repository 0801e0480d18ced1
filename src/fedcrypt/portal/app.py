"""The FastAPI application factory: JSON API, pages, static files, error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedcrypt import __version__
from fedcrypt.portal import docs
from fedcrypt.portal.config import PortalSettings
from fedcrypt.portal.context import Portal
from fedcrypt.portal.deps import SESSION_COOKIE, LoginRequiredError
from fedcrypt.portal.errors import NotAuthenticatedError, PortalError, RateLimitedError
from fedcrypt.portal.models import User
from fedcrypt.portal.proxy import ForwardedHeadersMiddleware, TrustedProxies
from fedcrypt.portal.routes import api_router
from fedcrypt.portal.services import accounts
from fedcrypt.portal.services import aggregation as round_service
from fedcrypt.portal.web import web_router
from fedcrypt.portal.web.common import redirect, render

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_PREFIX = "/api/v1"

_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
#: The API browsers run their bundled scripts (served by this portal, never a CDN).
_DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


class SecurityHeadersMiddleware:
    """Add defensive headers to every response (a strict CSP on the portal's pages)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Wrap ``send`` to add the headers to ``http.response.start``."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        is_docs = path in (docs.DOCS_URL, docs.REDOC_URL)

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                ]
                csp = _DOCS_CSP if is_docs else _PAGE_CSP
                headers.append((b"content-security-policy", csp.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, _send)


async def _ticker(portal: Portal, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(round_service.tick, portal)
        except Exception:  # keep the ticker alive; the error is logged
            log.exception("round deadline check failed")


def create_app(
    settings: PortalSettings,
    *,
    clock: Callable[[], datetime] | None = None,
    monotonic: Callable[[], float] | None = None,
) -> FastAPI:
    """Build the portal application.

    Opens the database (upgrading its schema with Alembic), reopens rounds whose
    aggregation a crash interrupted, and deletes partial uploads and orphan blobs.
    While serving, a background task checks round deadlines every
    ``settings.tick_interval_s`` seconds. ``X-Forwarded-For`` is believed only from
    ``settings.forwarded_allow_ips``. ``/docs`` (Swagger UI) and ``/redoc`` are served
    from installed files, without a CDN.

    Parameters
    ----------
    settings : PortalSettings
        Server configuration.
    clock : callable, optional
        Current aware UTC time, for tests that move past deadlines (default: system).
    monotonic : callable, optional
        Seconds clock of the sign-in rate limiter (default: :func:`time.monotonic`).
    """
    portal = Portal.open(settings, clock=clock, monotonic=monotonic)
    round_service.recover(portal)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = (
            asyncio.create_task(_ticker(portal, settings.tick_interval_s))
            if settings.tick_interval_s > 0
            else None
        )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            portal.close()

    app = FastAPI(
        title="fedcrypt consortium portal",
        version=__version__,
        description=(
            "Hospitals upload protected (homomorphically encrypted) model updates; the portal "
            "aggregates them without decrypting and publishes the protected aggregate. "
            "Authenticate with `Authorization: Bearer <token>` (POST /api/v1/auth/token)."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.portal = portal
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    docs.install(app)
    app.include_router(api_router, prefix=API_PREFIX)
    app.include_router(web_router)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(
        ForwardedHeadersMiddleware, proxies=TrustedProxies(settings.forwarded_allow_ips)
    )

    @app.exception_handler(PortalError)
    async def _portal_error(request: Request, exc: PortalError) -> Response:
        headers: dict[str, str] = {}
        if isinstance(exc, NotAuthenticatedError):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RateLimitedError):
            headers["Retry-After"] = str(int(exc.retry_after) + 1)
        if request.url.path.startswith(API_PREFIX):
            return JSONResponse(
                {"detail": exc.message}, status_code=exc.status_code, headers=headers
            )
        user = await run_in_threadpool(_page_user, portal, request.cookies.get(SESSION_COOKIE))
        return render(
            request,
            "error.html",
            {"message": exc.message, "status": exc.status_code},
            user=user,
            status_code=exc.status_code,
        )

    @app.exception_handler(LoginRequiredError)
    async def _login_required(_request: Request, exc: LoginRequiredError) -> Response:
        return redirect(f"/login?next={exc.next_path}")

    return app


def _page_user(portal: Portal, cookie: str | None) -> User | None:
    with portal.session() as db:
        user = accounts.user_for_session(portal, db, cookie)
        if user is not None:
            db.expunge(user)
        return user
