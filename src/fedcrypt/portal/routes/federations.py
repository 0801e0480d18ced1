"""``/federations``: create, configure, publish the initial model, read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from fedcrypt.portal.context import Portal
from fedcrypt.portal.deps import (
    AdminUser,
    ClientIP,
    CurrentUser,
    FederationId,
    PortalDep,
    SessionDep,
)
from fedcrypt.portal.errors import BadRequestError, ConflictError, NotFoundError
from fedcrypt.portal.models import FED_DRAFT
from fedcrypt.portal.schemas import (
    MAX_MODEL_VALUES,
    FederationCancel,
    FederationCreate,
    FederationPublic,
    FederationUpdate,
    UserPublic,
)
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.streaming import parse_sha256, receive_body, receive_small_body

router = APIRouter(prefix="/federations", tags=["federations"])

#: Largest public ``server.key`` accepted (it is read into memory to be checked).
MAX_SERVER_KEY_BYTES = 64 << 20

BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("", response_model=list[FederationPublic])
def list_federations(
    request: Request, db: SessionDep, _user: CurrentUser
) -> list[FederationPublic]:
    """Every federation, newest first."""
    base = base_url_of(request)
    return [feds.to_public(db, f, base_url=base) for f in feds.list_federations(db)]


def base_url_of(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post("", response_model=FederationPublic, status_code=201)
def create_federation(
    request: Request,
    body: FederationCreate,
    portal: PortalDep,
    db: SessionDep,
    admin: AdminUser,
    ip: ClientIP,
) -> FederationPublic:
    """Create a federation (admin only). It starts once the initial model is published.

    It stores what every hospital trains with: model (a built-in name or a task
    reference), task or dataset, local epochs, learning rate, batch size, image size,
    protection and HE preset, and which of these a hospital may set locally.
    """
    fed = feds.create_federation(portal, db, body, actor=admin, client_ip=ip)
    return feds.to_public(db, fed, base_url=base_url_of(request))


@router.get("/{federation_id}", response_model=FederationPublic)
def read_federation(
    request: Request, federation_id: FederationId, db: SessionDep, _user: CurrentUser
) -> FederationPublic:
    """One federation, with its settings and the command that joins it."""
    return feds.to_public(db, feds.get_federation(db, federation_id), base_url=base_url_of(request))


@router.patch("/{federation_id}", response_model=FederationPublic)
def update_federation(
    request: Request,
    federation_id: FederationId,
    body: FederationUpdate,
    portal: PortalDep,
    db: SessionDep,
    admin: AdminUser,
    ip: ClientIP,
) -> FederationPublic:
    """Correct a federation (admin only).

    Description, quorum, deadline and rounds change at any time; the training and model
    settings until round 1 has an upload (a model change on a running federation returns
    it to ``draft``: publish the initial model again).
    """
    fed = feds.get_federation(db, federation_id)
    fed = feds.update_federation(portal, db, fed, body, actor=admin, client_ip=ip)
    return feds.to_public(db, fed, base_url=base_url_of(request))


@router.post("/{federation_id}/cancel", response_model=FederationPublic)
def cancel_federation(
    request: Request,
    federation_id: FederationId,
    body: FederationCancel,
    portal: PortalDep,
    db: SessionDep,
    admin: AdminUser,
    ip: ClientIP,
) -> FederationPublic:
    """Cancel a federation (admin only): its open round closes and uploads are refused."""
    fed = feds.get_federation(db, federation_id)
    fed = feds.cancel_federation(portal, db, fed, reason=body.reason, actor=admin, client_ip=ip)
    return feds.to_public(db, fed, base_url=base_url_of(request))


@router.get("/{federation_id}/participants", response_model=list[UserPublic])
def read_participants(
    federation_id: FederationId, db: SessionDep, _user: CurrentUser
) -> list[UserPublic]:
    """Hospitals that have uploaded to this federation, in order of first upload."""
    fed = feds.get_federation(db, federation_id)
    return [UserPublic.model_validate(u) for u in feds.members(db, fed)]


@router.put(
    "/{federation_id}/server-key", response_model=FederationPublic, openapi_extra=BINARY_BODY
)
async def put_server_key(
    federation_id: FederationId, request: Request, portal: PortalDep, admin: AdminUser, ip: ClientIP
) -> FederationPublic:
    """Upload an ``he`` federation's public key context (``server.key``; admin only).

    A hospital key (which holds the secret key) is refused with HTTP 422 and not stored.
    """
    limit = min(portal.settings.max_upload_bytes, MAX_SERVER_KEY_BYTES)
    data = await receive_small_body(request, limit=limit)

    def _store() -> FederationPublic:
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            fed = feds.set_server_key(portal, db, fed, data, actor=admin, client_ip=ip)
            return feds.to_public(db, fed, base_url=base_url_of(request))

    return await run_in_threadpool(_store)


@router.put(
    "/{federation_id}/initial-model", response_model=FederationPublic, openapi_extra=BINARY_BODY
)
async def put_initial_model(
    federation_id: FederationId,
    request: Request,
    portal: PortalDep,
    admin: AdminUser,
    ip: ClientIP,
    x_content_sha256: Annotated[str | None, Header()] = None,
    x_model_size: Annotated[int | None, Header(ge=1, le=MAX_MODEL_VALUES)] = None,
) -> FederationPublic:
    """Publish the initial model (a ``state_dict`` file) and open round 1 (admin only).

    The portal stores it as an opaque blob and never unpickles it; hospitals load it with
    ``torch.load(..., weights_only=True)``. ``X-Model-Size`` (number of values in the
    flattened model) lets the portal reject updates of the wrong size from round 1.
    """
    claimed = parse_sha256(x_content_sha256)
    await run_in_threadpool(_check_draft, portal, federation_id)
    pending = await receive_body(request, portal.store, limit=portal.settings.max_upload_bytes)

    def _store() -> FederationPublic:
        digest = pending.finish()
        if digest != claimed:
            pending.discard()
            raise BadRequestError(
                f"checksum mismatch: the received body has SHA-256 {digest}, but "
                f"X-Content-SHA256 says {claimed}; nothing was stored"
            )
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            fed = feds.publish_initial_model(
                portal, db, fed, pending, model_size=x_model_size, actor=admin, client_ip=ip
            )
            return feds.to_public(db, fed, base_url=base_url_of(request))

    try:
        return await run_in_threadpool(_store)
    finally:
        pending.discard()


def _check_draft(portal: Portal, federation_id: int) -> None:
    with portal.session() as db:
        fed = feds.get_federation(db, federation_id)
        if fed.status != FED_DRAFT:
            raise ConflictError("the initial model is already published")


@router.get("/{federation_id}/initial-model", response_class=FileResponse)
def get_initial_model(
    federation_id: FederationId, portal: PortalDep, db: SessionDep, _user: CurrentUser
) -> FileResponse:
    """Download the initial model (a ``state_dict``; load it with ``weights_only=True``)."""
    fed = feds.get_federation(db, federation_id)
    if fed.initial_model_sha256 is None:
        raise NotFoundError("the initial model has not been published yet")
    return FileResponse(
        portal.store.path(fed.initial_model_sha256),
        media_type="application/octet-stream",
        filename=f"{fed.name}-initial.pt",
        headers={"X-Content-SHA256": fed.initial_model_sha256},
    )
