"""``/docs`` and ``/redoc`` from installed files: they work without internet access.

FastAPI's defaults load Swagger UI and ReDoc from a CDN, which leaves the pages blank
on a hospital network without internet access. The assets come from the
``fastapi-offline`` package (Swagger UI 5 and ReDoc, MIT licensed) and are served under
:data:`ASSETS_URL`; without that package ``/docs`` is a plain page that links
``/openapi.json``.
"""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")


def assets_dir() -> Path | None:
    """The folder holding the Swagger UI and ReDoc files, or ``None`` if not installed."""
    try:
        root = Path(str(resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    if all((root / name).is_file() for name in ASSET_FILES):
        return root
    return None


def _fallback(app: FastAPI) -> HTMLResponse:
    title = html.escape(app.title)
    return HTMLResponse(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title} – API</title></head><body>"
        f"<h1>{title}: JSON API</h1>"
        "<p>The interactive API browser is not installed on this server "
        "(<code>pip install fastapi-offline</code>). The machine-readable description "
        f"is at <a href='{app.openapi_url}'>{app.openapi_url}</a>.</p></body></html>"
    )


def install(app: FastAPI) -> None:
    """Add ``/docs`` (Swagger UI) and ``/redoc`` to ``app``, served without a CDN."""
    folder = assets_dir()
    openapi_url = app.openapi_url or "/openapi.json"
    if folder is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=str(folder)), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        if folder is None:
            return _fallback(app)
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} – API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        if folder is None:
            return _fallback(app)
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} – API",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url="/static/favicon.svg",
            with_google_fonts=False,
        )
