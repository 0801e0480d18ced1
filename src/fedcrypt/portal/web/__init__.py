"""Server-rendered pages (Jinja2, no JavaScript): sign-in, registration, admin, federations."""

from __future__ import annotations

from fastapi import APIRouter

from fedcrypt.portal.web import accounts, admin, federations

web_router = APIRouter(include_in_schema=False)
web_router.include_router(accounts.router)
web_router.include_router(admin.router)
web_router.include_router(federations.router)
