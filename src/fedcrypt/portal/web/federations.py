"""Federation pages: the list, the admin's creation form, one federation, its metrics plot."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import select

from fedcrypt.portal.deps import ClientIP, PortalDep, SessionDep, WebAdmin, WebUser
from fedcrypt.portal.errors import InvalidContentError, PortalError
from fedcrypt.portal.models import FED_DRAFT, MetricReport, Round, User
from fedcrypt.portal.plots import MetricPoint, metrics_png, summarize
from fedcrypt.portal.schemas import FederationCreate
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services import rounds as svc
from fedcrypt.portal.storage import PendingBlob
from fedcrypt.portal.streaming import receive_form_file
from fedcrypt.portal.web.common import check_csrf, redirect, render
from fedcrypt.protection.he.params import PRESETS
from fedcrypt.protection.registry import get_scheme

router = APIRouter()

FormStr = Annotated[str, Form(max_length=4000)]
FormFile = Annotated[UploadFile | None, File()]

MODEL_SUGGESTIONS = ("mlp", "cnn", "mobilenetv2")
PRESET_SUGGESTIONS: tuple[str, ...] = tuple(PRESETS)


@router.get("/federations")
def federation_list(request: Request, portal: PortalDep, db: SessionDep, user: WebUser) -> Response:
    """Every federation with its state and current round."""
    svc.tick(portal)
    rows = []
    for fed in feds.list_federations(db):
        rnd = feds.latest_round(db, fed)
        rows.append({"fed": fed, "round": rnd, "participants": len(feds.members(db, fed))})
    return render(request, "federations.html", {"rows": rows}, user=user)


def _new_form_context(form: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    return {
        "form": form,
        "errors": errors,
        "models": MODEL_SUGGESTIONS,
        "presets": PRESET_SUGGESTIONS,
    }


@router.get("/federations/new")
def federation_new(request: Request, admin: WebAdmin) -> Response:
    """The admin's form for creating a federation."""
    defaults = {
        "protection": "he",
        "quorum": "3",
        "round_deadline_minutes": "60",
        "num_rounds": "2",
        "model": "mlp",
    }
    return render(request, "federation_new.html", _new_form_context(defaults, []), user=admin)


@router.post("/federations/new")
async def federation_create(
    request: Request,
    portal: PortalDep,
    admin: WebAdmin,
    ip: ClientIP,
    name: FormStr = "",
    model: FormStr = "",
    dataset_description: FormStr = "",
    protection: FormStr = "he",
    he_preset: FormStr = "",
    quorum: FormStr = "",
    round_deadline_minutes: FormStr = "",
    num_rounds: FormStr = "",
    model_size: FormStr = "",
    csrf_token: FormStr = "",
    initial_model: FormFile = None,
    server_key: FormFile = None,
) -> Response:
    """Create a federation, store its public key and initial model, and open round 1."""
    check_csrf(request, csrf_token)
    form = {
        "name": name,
        "model": model,
        "dataset_description": dataset_description,
        "protection": protection,
        "he_preset": he_preset,
        "quorum": quorum,
        "round_deadline_minutes": round_deadline_minutes,
        "num_rounds": num_rounds,
        "model_size": model_size,
    }
    errors: list[str] = []
    data: FederationCreate | None = None
    try:
        data = FederationCreate.model_validate(
            {
                k: (v.strip() or None) if k in ("he_preset", "model_size") else v.strip()
                for k, v in form.items()
            }
        )
    except ValidationError as exc:
        errors += [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    has_model = initial_model is not None and bool(initial_model.filename)
    has_key = server_key is not None and bool(server_key.filename)
    if not has_model:
        errors.append(
            "choose the initial model file (a state_dict from `fedcrypt portal init-model`)"
        )
    if data is not None and get_scheme(data.protection).key_files and not has_key:
        errors.append("an he federation needs its public server.key (from `fedcrypt keys`)")
    if errors or data is None:
        return render(
            request,
            "federation_new.html",
            _new_form_context(form, errors),
            user=admin,
            status_code=422,
        )
    limit = portal.settings.max_upload_bytes
    key_bytes: bytes | None = None
    if get_scheme(data.protection).key_files and server_key is not None:
        key_bytes = await server_key.read(limit + 1)
        if len(key_bytes) > limit:
            errors.append("the server key exceeds the upload limit")
    assert initial_model is not None
    pending = await receive_form_file(initial_model, portal.store, limit=limit)

    def _create() -> int:
        with portal.session() as db:
            if key_bytes is not None:
                feds.aggregator_from_key(key_bytes)  # refuse a secret key before creating
            fed = feds.create_federation(portal, db, data, actor=admin, client_ip=ip)
            if key_bytes is not None:
                feds.set_server_key(portal, db, fed, key_bytes, actor=admin, client_ip=ip)
            feds.publish_initial_model(
                portal, db, fed, pending, model_size=data.model_size, actor=admin, client_ip=ip
            )
            return fed.id

    try:
        if errors:
            raise InvalidContentError("; ".join(errors))
        fid = await run_in_threadpool(_create)
    except PortalError as exc:
        pending.discard()
        return render(
            request,
            "federation_new.html",
            _new_form_context(form, [exc.message]),
            user=admin,
            status_code=exc.status_code,
        )
    return redirect(f"/federations/{fid}")


@router.get("/federations/{federation_id}")
def federation_page(
    request: Request, federation_id: int, portal: PortalDep, db: SessionDep, user: WebUser
) -> Response:
    """A federation: settings, rounds, participants with upload times and sizes, metrics."""
    svc.maybe_aggregate(portal, federation_id)
    fed = feds.get_federation(db, federation_id)
    rounds = [svc.round_public(db, fed, r, viewer=user) for r in fed.rounds]
    members = feds.members(db, fed)
    uploads = {(u.user_id, r.number): u for r in fed.rounds for u in r.uploads}
    points = _points(db, fed.id)
    latest = rounds[-1] if rounds else None
    return render(
        request,
        "federation.html",
        {
            "fed": fed,
            "rounds": rounds,
            "latest": latest,
            "members": members,
            "uploads": uploads,
            "summary": summarize(points),
            "has_metrics": bool(points),
            "is_draft": fed.status == FED_DRAFT,
            "base_url": str(request.base_url).rstrip("/"),
        },
        user=user,
    )


def _points(db: SessionDep, federation_id: int) -> list[MetricPoint]:
    rows = db.execute(
        select(MetricReport, Round.number, User.name)
        .join(Round, Round.id == MetricReport.round_id)
        .join(User, User.id == MetricReport.user_id)
        .where(Round.federation_id == federation_id)
        .order_by(Round.number, User.name)
    ).all()
    return [
        MetricPoint(
            round=number,
            hospital=name,
            loss=m.loss,
            accuracy=m.accuracy,
            auc=m.auc,
            num_examples=m.num_examples,
        )
        for m, number, name in rows
    ]


@router.get("/federations/{federation_id}/metrics.png")
def federation_metrics_png(federation_id: int, db: SessionDep, user: WebUser) -> Response:
    """Loss, accuracy and ROC AUC per round (each hospital and the weighted mean), as PNG."""
    fed = feds.get_federation(db, federation_id)
    png = metrics_png(_points(db, fed.id), title=f"{fed.name}: metrics reported by hospitals")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/federations/{federation_id}/rounds/{number}/aggregate")
def federation_force_aggregate(
    request: Request,
    federation_id: int,
    number: int,
    portal: PortalDep,
    db: SessionDep,
    admin: WebAdmin,
    ip: ClientIP,
    csrf_token: FormStr = "",
) -> Response:
    """Aggregate the open round now if the quorum is met (admin)."""
    check_csrf(request, csrf_token)
    fed = feds.get_federation(db, federation_id)
    feds.get_round(db, fed, number)
    svc.maybe_aggregate(portal, federation_id, force=True, actor=admin, client_ip=ip)
    return redirect(f"/federations/{federation_id}")


@router.post("/federations/{federation_id}/publish")
async def federation_publish(
    request: Request,
    federation_id: int,
    portal: PortalDep,
    admin: WebAdmin,
    ip: ClientIP,
    model_size: FormStr = "",
    csrf_token: FormStr = "",
    initial_model: FormFile = None,
    server_key: FormFile = None,
) -> Response:
    """Finish a draft federation: its public server key and/or initial model (admin)."""
    check_csrf(request, csrf_token)
    limit = portal.settings.max_upload_bytes
    key_bytes = (
        await server_key.read(limit + 1) if server_key is not None and server_key.filename else None
    )
    pending: PendingBlob | None = None
    if initial_model is not None and initial_model.filename:
        pending = await receive_form_file(initial_model, portal.store, limit=limit)
    size = int(model_size) if model_size.strip().isdigit() and int(model_size) > 0 else None

    def _publish() -> None:
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            if key_bytes is not None:
                if len(key_bytes) > limit:
                    raise InvalidContentError("the server key exceeds the upload limit")
                feds.set_server_key(portal, db, fed, key_bytes, actor=admin, client_ip=ip)
            if pending is not None:
                feds.publish_initial_model(
                    portal, db, fed, pending, model_size=size, actor=admin, client_ip=ip
                )

    try:
        await run_in_threadpool(_publish)
    finally:
        if pending is not None:
            pending.discard()
    return redirect(f"/federations/{federation_id}")
