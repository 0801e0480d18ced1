"""The JSON API under ``/api/v1``, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from fedcrypt.portal.routes import (
    audit,
    auth,
    federations,
    hospitals,
    rounds,
    secagg,
    uploads,
    users,
)

api_router = APIRouter()
api_router.include_router(auth.router)
api_router.include_router(users.router)
api_router.include_router(hospitals.router)
api_router.include_router(federations.router)
api_router.include_router(rounds.router)
api_router.include_router(secagg.router)
api_router.include_router(uploads.router)
api_router.include_router(audit.router)
