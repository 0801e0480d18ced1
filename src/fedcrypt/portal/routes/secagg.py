"""``secagg`` federations: the public registry, enrolment, and the stage relay of a round."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from fedcrypt.portal.deps import (
    AdminUser,
    ClientIP,
    CurrentUser,
    FederationId,
    HospitalUser,
    PortalDep,
    RoundNumber,
    SessionDep,
)
from fedcrypt.portal.errors import NotFoundError, PortalError, TooLargeError
from fedcrypt.portal.routes.federations import BINARY_BODY, base_url_of
from fedcrypt.portal.schemas import (
    FederationPublic,
    SecAggAttemptPublic,
    SecAggEnrol,
    SecAggMemberPublic,
    SecAggReplyPublic,
    SecAggTurn,
)
from fedcrypt.portal.services import aggregation as agg
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services import relay, relay_views, secagg_members
from fedcrypt.portal.services import rounds as round_svc
from fedcrypt.portal.streaming import parse_sha256, receive_body, receive_small_body

router = APIRouter(prefix="/federations/{federation_id}", tags=["secagg"])

STAGE_HEADER = "X-Secagg-Stage"


@router.put("/registry", response_model=FederationPublic, openapi_extra=BINARY_BODY)
async def put_registry(
    federation_id: FederationId, request: Request, portal: PortalDep, admin: AdminUser, ip: ClientIP
) -> FederationPublic:
    """Upload a ``secagg`` federation's public ``registry.pub`` (admin only).

    It fixes the consortium's parameters (stored with the federation). A secret
    ``hospital-<i>.key`` or ``group-mask.key`` is refused with HTTP 422 and not stored.
    """
    data = await receive_small_body(request, limit=secagg_members.MAX_REGISTRY_BYTES)

    def _store() -> FederationPublic:
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            fed = secagg_members.set_registry(portal, db, fed, data, actor=admin, client_ip=ip)
            return feds.to_public(db, fed, base_url=base_url_of(request))

    return await run_in_threadpool(_store)


@router.get("/registry", response_class=FileResponse)
def get_registry(
    federation_id: FederationId, portal: PortalDep, db: SessionDep, _user: CurrentUser
) -> FileResponse:
    """Download the federation's public ``registry.pub``.

    A hospital may use it instead of its own copy: ``fedcrypt portal participate``
    checks it against the registry fingerprint its ``hospital-<i>.key`` names.
    """
    fed = feds.get_federation(db, federation_id)
    secagg_members.require_secagg(fed)
    if fed.server_key_sha256 is None:
        raise NotFoundError("the registry has not been uploaded yet")
    return FileResponse(
        portal.store.path(fed.server_key_sha256),
        media_type="application/octet-stream",
        filename="registry.pub",
        headers={"X-Content-SHA256": fed.server_key_sha256},
    )


@router.post(
    "/secagg/members",
    response_model=SecAggMemberPublic,
    status_code=201,
    responses={
        200: {"description": "Already enrolled as this hospital"},
        403: {"description": "Not signed by that hospital's registered key"},
        409: {"description": "The account or the hospital id is enrolled otherwise"},
        422: {"description": "The id is not in the registry"},
    },
)
def enrol(
    federation_id: FederationId,
    body: SecAggEnrol,
    response: Response,
    portal: PortalDep,
    db: SessionDep,
    user: HospitalUser,
    ip: ClientIP,
) -> SecAggMemberPublic:
    """Enrol this hospital account as one hospital of the federation's registry.

    ``signature`` is the hospital's Ed25519 signature of the enrolment message
    (:func:`fedcrypt.portal.secagg.enrolment_message`: registry fingerprint, federation,
    account, hospital id) with its ``hospital-<i>.key``: proof that the account holds it.
    """
    fed = feds.get_federation(db, federation_id)
    member, created = secagg_members.enrol(
        portal,
        db,
        fed,
        user,
        hospital_id=body.hospital_id,
        signature=body.signature,
        client_ip=ip,
    )
    if not created:
        response.status_code = 200
    return secagg_members.member_public(member)


@router.get("/secagg/members", response_model=list[SecAggMemberPublic])
def list_members(
    federation_id: FederationId, db: SessionDep, _user: CurrentUser
) -> list[SecAggMemberPublic]:
    """The hospitals enrolled in the federation, with their registry ids."""
    fed = feds.get_federation(db, federation_id)
    secagg_members.require_secagg(fed)
    return [secagg_members.member_public(m) for m in secagg_members.list_members(db, fed)]


@router.get("/rounds/{number}/secagg", response_model=list[SecAggAttemptPublic])
def round_sessions(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    _user: CurrentUser,
) -> list[SecAggAttemptPublic]:
    """The round's secure-aggregation sessions: stage progress, who dropped out and why."""
    agg.maybe_aggregate(portal, federation_id)
    fed = feds.get_federation(db, federation_id)
    secagg_members.require_secagg(fed)
    db.expire_all()
    return relay_views.round_progress(db, feds.get_round(db, fed, number))


@router.post("/rounds/{number}/secagg/join", response_model=SecAggTurn)
def join(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    user: HospitalUser,
    ip: ClientIP,
) -> SecAggTurn:
    """Check this hospital in for the round's session (HTTP 409 once it has started)."""
    return relay.join(
        portal, federation_id=federation_id, round_number=number, user=user, client_ip=ip
    )


@router.get("/rounds/{number}/secagg/turn", response_model=SecAggTurn)
def read_turn(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    user: HospitalUser,
) -> SecAggTurn:
    """What this hospital should do now: enrol, join, answer a request, wait or follow.

    Reading it also moves the round on when a stage is due (deadline passed).
    """
    agg.maybe_aggregate(portal, federation_id)
    fed = feds.get_federation(db, federation_id)
    db.expire_all()
    return relay.turn(db, fed, number, user)


@router.get("/rounds/{number}/secagg/request", response_class=FileResponse)
def read_request(
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    user: HospitalUser,
) -> FileResponse:
    """Download the protocol request awaiting this hospital's answer (HTTP 409 if none).

    The stage is in ``X-Secagg-Stage``; the body is an opaque ``secagg`` message.
    """
    fed = feds.get_federation(db, federation_id)
    sha, stage = relay.request_for(db, fed, number, user)
    relay.ensure_request_blob(portal, sha)
    return FileResponse(
        portal.store.path(sha),
        media_type="application/octet-stream",
        filename=f"{fed.name}-round{number}-{stage}-request.fcry",
        headers={"X-Content-SHA256": sha, STAGE_HEADER: stage},
    )


@router.put(
    "/rounds/{number}/secagg/reply",
    response_model=SecAggReplyPublic,
    openapi_extra=BINARY_BODY,
    responses={
        400: {"description": "Missing or wrong X-Content-SHA256"},
        403: {"description": "Not signed by this hospital's registered key"},
        409: {"description": "Replayed, another session, after the deadline, or stage closed"},
        413: {"description": "Larger than the stage's bound"},
        422: {"description": "Malformed, another request answered, or another hospital's"},
    },
)
async def put_reply(
    federation_id: FederationId,
    number: RoundNumber,
    request: Request,
    portal: PortalDep,
    user: HospitalUser,
    ip: ClientIP,
    x_content_sha256: Annotated[str | None, Header()] = None,
) -> SecAggReplyPublic:
    """Answer the running stage with this hospital's signed reply (raw body).

    The protocol checks it on arrival; a refusal names the hospital and the reason, and
    the hospital counts as dropped out unless a valid reply follows before the stage
    closes. The last awaited reply closes the stage.
    """
    try:
        claimed = parse_sha256(x_content_sha256)
        stage, limit = await run_in_threadpool(
            relay.precheck_reply,
            portal,
            federation_id=federation_id,
            round_number=number,
            user=user,
        )
        try:
            pending = await receive_body(request, portal.store, limit=limit)
        except TooLargeError:
            raise TooLargeError(
                f"a {stage} reply of this session is at most {limit} bytes; nothing was stored"
            ) from None
    except PortalError as exc:
        await run_in_threadpool(
            round_svc.record_rejection,
            portal,
            user_id=user.id,
            target=f"federation {federation_id} round {number} secagg",
            reason=exc.message,
            client_ip=ip,
        )
        raise
    return await run_in_threadpool(
        relay.accept_reply,
        portal,
        federation_id=federation_id,
        round_number=number,
        user=user,
        pending=pending,
        claimed_sha256=claimed,
        client_ip=ip,
    )
