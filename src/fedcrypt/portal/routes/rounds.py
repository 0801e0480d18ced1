"""``/federations/{id}/rounds``: state, protected uploads, the aggregate, metrics."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select

from fedcrypt.portal.deps import (
    AdminUser,
    ClientIP,
    CurrentUser,
    FederationId,
    HospitalUser,
    PortalDep,
    RoundNumber,
    SessionDep,
    UploadId,
)
from fedcrypt.portal.errors import ConflictError, NotFoundError, PortalError
from fedcrypt.portal.models import ROUND_AGGREGATED, MetricReport, Upload
from fedcrypt.portal.routes.federations import BINARY_BODY
from fedcrypt.portal.schemas import (
    MetricsCreate,
    MetricsPublic,
    RoundPublic,
    UploadExclude,
    UploadPublic,
)
from fedcrypt.portal.services import aggregation as agg
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services import rounds as svc
from fedcrypt.portal.streaming import parse_sha256, receive_body

router = APIRouter(prefix="/federations/{federation_id}/rounds", tags=["rounds"])


@router.get("", response_model=list[RoundPublic])
def list_rounds(
    federation_id: FederationId, portal: PortalDep, db: SessionDep, user: CurrentUser
) -> list[RoundPublic]:
    """Every round of the federation, oldest first."""
    agg.maybe_aggregate(portal, federation_id)
    fed = feds.get_federation(db, federation_id)
    db.expire_all()
    return [svc.round_public(db, fed, r, viewer=user) for r in fed.rounds]


@router.get("/{number}", response_model=RoundPublic)
def read_round(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    user: CurrentUser,
) -> RoundPublic:
    """One round's state (``open``, ``aggregating`` or ``aggregated``).

    Reading it also aggregates the round if its deadline has passed with the quorum met.
    """
    agg.maybe_aggregate(portal, federation_id)
    fed = feds.get_federation(db, federation_id)
    return svc.round_public(db, fed, feds.get_round(db, fed, number), viewer=user)


@router.put(
    "/{number}/update",
    response_model=UploadPublic,
    openapi_extra=BINARY_BODY,
    responses={
        400: {"description": "Missing or wrong X-Content-SHA256"},
        409: {"description": "The round is closed or has not opened yet"},
        413: {"description": "Larger than the portal's upload limit"},
        422: {"description": "Malformed, other key context, or wrong model size"},
    },
)
async def upload_update(
    federation_id: FederationId,
    number: RoundNumber,
    request: Request,
    background: BackgroundTasks,
    portal: PortalDep,
    user: HospitalUser,
    ip: ClientIP,
    x_content_sha256: Annotated[str | None, Header()] = None,
) -> UploadPublic:
    """Upload this hospital's protected update for a round (replaces an earlier one).

    The raw body is a fedcrypt protected message (``application/octet-stream``) streamed
    to disk; ``X-Content-SHA256`` must be the hex SHA-256 of the body. The example count
    is read from the message header. When the round becomes due, it is aggregated
    after the response is sent.
    """
    t0 = time.perf_counter()
    try:
        claimed = parse_sha256(x_content_sha256)
        await run_in_threadpool(
            svc.precheck_upload,
            portal,
            federation_id=federation_id,
            round_number=number,
            user_id=user.id,
        )
        pending = await receive_body(request, portal.store, limit=portal.settings.max_upload_bytes)
    except PortalError as exc:
        await run_in_threadpool(
            svc.record_rejection,
            portal,
            user_id=user.id,
            target=f"federation {federation_id} round {number}",
            reason=exc.message,
            client_ip=ip,
        )
        raise
    out = await run_in_threadpool(
        svc.accept_upload,
        portal,
        federation_id=federation_id,
        round_number=number,
        user_id=user.id,
        pending=pending,
        claimed_sha256=claimed,
        client_ip=ip,
        elapsed_s=time.perf_counter() - t0,
    )
    background.add_task(agg.maybe_aggregate, portal, federation_id)
    return out


@router.get("/{number}/update", response_class=FileResponse)
def download_own_update(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    user: HospitalUser,
) -> FileResponse:
    """Download the update this hospital uploaded for the round."""
    fed = feds.get_federation(db, federation_id)
    rnd = feds.get_round(db, fed, number)
    up = db.scalar(select(Upload).where(Upload.round_id == rnd.id, Upload.user_id == user.id))
    if up is None:
        raise NotFoundError(f"you have not uploaded an update for round {number}")
    return FileResponse(
        portal.store.path(up.sha256),
        media_type="application/octet-stream",
        filename=f"{fed.name}-round{number}-update.fcry",
        headers={"X-Content-SHA256": up.sha256},
    )


@router.get("/{number}/uploads", response_model=list[UploadPublic])
def list_uploads(
    federation_id: FederationId, number: RoundNumber, db: SessionDep, _user: CurrentUser
) -> list[UploadPublic]:
    """Upload metadata of the round (who, when, size, examples); never the contents."""
    fed = feds.get_federation(db, federation_id)
    rnd = feds.get_round(db, fed, number)
    return [svc.upload_public(u) for u in rnd.uploads]


@router.post("/{number}/uploads/{upload_id}/exclude", response_model=UploadPublic)
def exclude_upload(
    federation_id: FederationId,
    number: RoundNumber,
    upload_id: UploadId,
    body: UploadExclude,
    portal: PortalDep,
    db: SessionDep,
    admin: AdminUser,
    ip: ClientIP,
) -> UploadPublic:
    """Leave an update out of the round's aggregate (admin only), e.g. the one a failed
    aggregation named. The round reopens and aggregates when it is due (or when forced);
    the hospital cannot upload again in this round."""
    fed = feds.get_federation(db, federation_id)
    up = agg.exclude_upload(
        portal,
        db,
        fed,
        round_number=number,
        upload_id=upload_id,
        reason=body.reason,
        actor=admin,
        client_ip=ip,
    )
    out = svc.upload_public(up)
    agg.maybe_aggregate(portal, federation_id)
    return out


@router.post("/{number}/aggregate", response_model=RoundPublic)
def force_aggregate(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    admin: AdminUser,
    ip: ClientIP,
) -> RoundPublic:
    """Aggregate the open (or failed) round now if the quorum is met (admin only).

    A failed aggregation answers 200 with the round ``failed``, its ``error`` and
    ``failed_upload_id``: exclude that upload and aggregate again.
    """
    fed = feds.get_federation(db, federation_id)
    rnd = feds.get_round(db, fed, number)
    if rnd.status == ROUND_AGGREGATED:
        raise ConflictError(f"round {number} is already aggregated")
    agg.maybe_aggregate(portal, federation_id, force=True, actor=admin, client_ip=ip)
    db.expire_all()
    return svc.round_public(db, fed, feds.get_round(db, fed, number), viewer=admin)


@router.get("/{number}/aggregate", response_class=FileResponse)
def download_aggregate(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    _user: CurrentUser,
) -> Response:
    """Download the round's protected aggregate (HTTP 409 until it exists).

    Under ``ckks`` it is a ciphertext: only hospitals holding the key can decrypt it.
    """
    agg.maybe_aggregate(portal, federation_id)
    fed = feds.get_federation(db, federation_id)
    rnd = feds.get_round(db, fed, number)
    db.refresh(rnd)
    if rnd.status != ROUND_AGGREGATED or rnd.aggregate_sha256 is None:
        raise ConflictError(f"round {number} has not been aggregated yet")
    return FileResponse(
        portal.store.path(rnd.aggregate_sha256),
        media_type="application/octet-stream",
        filename=f"{fed.name}-round{number}-aggregate.fcry",
        headers={"X-Content-SHA256": rnd.aggregate_sha256},
    )


@router.post("/{number}/metrics", response_model=MetricsPublic, status_code=201)
def report_metrics(
    federation_id: FederationId,
    number: RoundNumber,
    body: MetricsCreate,
    portal: PortalDep,
    db: SessionDep,
    user: HospitalUser,
    ip: ClientIP,
) -> MetricsPublic:
    """Report metrics measured locally on the round's decrypted global model (replaces)."""
    fed = feds.get_federation(db, federation_id)
    return svc.report_metrics(
        portal, db, fed, round_number=number, user=user, data=body, client_ip=ip
    )


@router.get("/{number}/metrics", response_model=list[MetricsPublic])
def list_metrics(
    federation_id: FederationId, number: RoundNumber, db: SessionDep, _user: CurrentUser
) -> list[MetricsPublic]:
    """Every hospital's metrics for the round."""
    fed = feds.get_federation(db, federation_id)
    rnd = feds.get_round(db, fed, number)
    rows = db.scalars(
        select(MetricReport).where(MetricReport.round_id == rnd.id).order_by(MetricReport.id)
    )
    return [svc.metrics_public(m) for m in rows]
