"""Federation pages: the list, creating and correcting one, one federation, its metrics plot."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import select

from fedcrypt.portal.deps import (
    ClientIP,
    FederationId,
    PortalDep,
    RoundNumber,
    SessionDep,
    UploadId,
    WebAdmin,
    WebUser,
)
from fedcrypt.portal.errors import InvalidContentError, PortalError
from fedcrypt.portal.models import FED_DRAFT, MetricReport, Round, User
from fedcrypt.portal.plots import MetricPoint, metrics_png, summarize
from fedcrypt.portal.routes.federations import MAX_SERVER_KEY_BYTES
from fedcrypt.portal.schemas import (
    BUILTIN_MODELS,
    MAX_MODEL_VALUES,
    OVERRIDABLE,
    FederationCreate,
    FederationUpdate,
)
from fedcrypt.portal.services import aggregation as agg
from fedcrypt.portal.services import federations as feds
from fedcrypt.portal.services import relay_views, secagg_members
from fedcrypt.portal.services import rounds as svc
from fedcrypt.portal.storage import PendingBlob
from fedcrypt.portal.streaming import receive_form_file
from fedcrypt.portal.web.common import check_csrf, redirect, render
from fedcrypt.protection.he.params import PRESETS
from fedcrypt.protection.registry import get_scheme

router = APIRouter()

FormStr = Annotated[str, Form(max_length=4000)]
FormFile = Annotated[UploadFile | None, File()]
FormList = Annotated[list[str], Form(max_length=len(OVERRIDABLE))]

PRESET_SUGGESTIONS: tuple[str, ...] = tuple(PRESETS)
DATASET_SUGGESTIONS: tuple[str, ...] = ("wdbc", "breastmnist", "pneumoniamnist")
#: Form fields read as "empty means not set".
_OPTIONAL = ("he_preset", "model_size", "task", "dataset", "lr", "image_size")
#: The settings the creation and correction forms share.
SETTING_FIELDS = (
    "model",
    "task",
    "dataset",
    "local_epochs",
    "lr",
    "batch_size",
    "image_size",
    "protection",
    "he_preset",
    "dataset_description",
    "quorum",
    "round_deadline_minutes",
    "num_rounds",
    "model_size",
)


@router.get("/federations")
def federation_list(request: Request, portal: PortalDep, db: SessionDep, user: WebUser) -> Response:
    """Every federation with its state and current round."""
    agg.tick(portal)
    rows = []
    for fed in feds.list_federations(db):
        rnd = feds.latest_round(db, fed)
        rows.append(
            {
                "fed": fed,
                "scheme": feds.scheme_of(fed),
                "round": rnd,
                "participants": len(feds.members(db, fed)),
            }
        )
    return render(request, "federations.html", {"rows": rows}, user=user)


def _form_context(form: dict[str, Any], errors: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "form": form,
        "errors": errors,
        "models": BUILTIN_MODELS,
        "presets": PRESET_SUGGESTIONS,
        "datasets": DATASET_SUGGESTIONS,
        "overridable": OVERRIDABLE,
        "max_model_values": MAX_MODEL_VALUES,
        **extra,
    }


def _errors(exc: ValidationError) -> list[str]:
    out = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def _cleaned(form: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in form.items():
        if isinstance(value, str):
            value = value.strip()
            if key in _OPTIONAL and not value:
                value = None
        out[key] = value
    return out


@router.get("/federations/new")
def federation_new(request: Request, admin: WebAdmin) -> Response:
    """The admin's form for creating a federation."""
    defaults = {
        "protection": "he",
        "quorum": "3",
        "round_deadline_minutes": "60",
        "num_rounds": "2",
        "model": "mlp",
        "dataset": "wdbc",
        "local_epochs": "1",
        "batch_size": "32",
        "local_overrides": [],
    }
    return render(request, "federation_new.html", _form_context(defaults, []), user=admin)


@router.post("/federations/new")
async def federation_create(
    request: Request,
    portal: PortalDep,
    admin: WebAdmin,
    ip: ClientIP,
    name: FormStr = "",
    model: FormStr = "",
    task: FormStr = "",
    dataset: FormStr = "",
    local_epochs: FormStr = "1",
    lr: FormStr = "",
    batch_size: FormStr = "32",
    image_size: FormStr = "",
    local_overrides: FormList = [],  # noqa: B006 (FastAPI reads it, never mutates it)
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
    registry: FormFile = None,
) -> Response:
    """Create a federation, store its public key file and initial model, open round 1."""
    check_csrf(request, csrf_token)
    form: dict[str, Any] = {
        "name": name,
        "model": model,
        "task": task,
        "dataset": dataset,
        "local_epochs": local_epochs,
        "lr": lr,
        "batch_size": batch_size,
        "image_size": image_size,
        "local_overrides": list(local_overrides),
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
        data = FederationCreate.model_validate(_cleaned(form))
    except ValidationError as exc:
        errors += _errors(exc)
    has_model = initial_model is not None and bool(initial_model.filename)
    has_key = server_key is not None and bool(server_key.filename)
    if not has_model:
        errors.append(
            "choose the initial model file (a state_dict from `fedcrypt portal init-model`)"
        )
    has_registry = registry is not None and bool(registry.filename)
    if data is not None and get_scheme(data.protection).key_pair and not has_key:
        errors.append("an he federation needs its public server.key (from `fedcrypt keys`)")
    if data is not None and get_scheme(data.protection).staged:
        if not has_registry:
            errors.append(
                "a secagg federation needs its public registry.pub (from `fedcrypt keys "
                "generate --protection secagg`)"
            )
        if data.model_size is None:
            errors.append(
                "a secagg federation needs the number of model values (printed by "
                "`fedcrypt portal init-model`)"
            )
    if errors or data is None:
        return render(
            request,
            "federation_new.html",
            _form_context(form, errors),
            user=admin,
            status_code=422,
        )
    limit = portal.settings.max_upload_bytes
    key_bytes: bytes | None = None
    if get_scheme(data.protection).key_pair and server_key is not None:
        key_limit = min(limit, MAX_SERVER_KEY_BYTES)
        key_bytes = await server_key.read(key_limit + 1)
        if len(key_bytes) > key_limit:
            errors.append("the server key exceeds the size limit of a public key file")
    registry_bytes: bytes | None = None
    if get_scheme(data.protection).staged and registry is not None:
        registry_bytes = await registry.read(secagg_members.MAX_REGISTRY_BYTES + 1)
    assert initial_model is not None
    pending = await receive_form_file(initial_model, portal.store, limit=limit)

    def _create() -> int:
        with portal.session() as db:
            if key_bytes is not None:
                feds.aggregator_from_key(key_bytes)  # refuse a secret key before creating
            if registry_bytes is not None:
                secagg_members.parse_registry(registry_bytes)  # refuse a secret key before creating
            fed = feds.create_federation(portal, db, data, actor=admin, client_ip=ip)
            if key_bytes is not None:
                feds.set_server_key(portal, db, fed, key_bytes, actor=admin, client_ip=ip)
            if registry_bytes is not None:
                secagg_members.set_registry(
                    portal, db, fed, registry_bytes, actor=admin, client_ip=ip
                )
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
            _form_context(form, [exc.message]),
            user=admin,
            status_code=exc.status_code,
        )
    return redirect(f"/federations/{fid}")


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.get("/federations/{federation_id}")
def federation_page(
    request: Request, federation_id: FederationId, portal: PortalDep, db: SessionDep, user: WebUser
) -> Response:
    """A federation: settings, the join command, rounds, participants, metrics."""
    agg.maybe_aggregate(portal, federation_id)
    fed = feds.get_federation(db, federation_id)
    db.refresh(fed)
    rounds = [svc.round_public(db, fed, r, viewer=user) for r in fed.rounds]
    members = feds.members(db, fed)
    uploads = {(u.user_id, r.number): u for r in fed.rounds for u in r.uploads}
    points = _points(db, fed.id)
    latest = rounds[-1] if rounds else None
    latest_uploads = fed.rounds[-1].uploads if fed.rounds else []
    scheme = feds.scheme_of(fed)
    editable = fed.status in (FED_DRAFT, "running") and not feds.round_one_started(db, fed)
    sessions: list[dict[str, Any]] = []
    taken: dict[tuple[int, int], str] = {}
    if scheme.staged:
        for rnd in reversed(fed.rounds):
            attempts = relay_views.round_progress(db, rnd)
            sessions.append({"round": rnd.number, "attempts": attempts})
            for a in attempts:
                for h in a.hospitals:
                    taken[(h.user_id, rnd.number)] = (
                        f"{h.status} at {h.stage}" if h.status == "dropped" else h.status
                    )
    return render(
        request,
        "federation.html",
        {
            "fed": fed,
            "scheme": scheme,
            "overrides": [x for x in fed.local_overrides.split(",") if x],
            "rounds": rounds,
            "latest": latest,
            "latest_uploads": latest_uploads,
            "members": members,
            "uploads": uploads,
            "summary": summarize(points),
            "has_metrics": bool(points),
            "is_draft": fed.status == FED_DRAFT,
            "editable": editable,
            "join_command": feds.join_command(fed, base_url=_base_url(request)),
            "sessions": sessions,
            "taken": taken,
            "secagg_params": json.loads(fed.secagg_params) if fed.secagg_params else None,
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
def federation_metrics_png(federation_id: FederationId, db: SessionDep, user: WebUser) -> Response:
    """Loss, accuracy and ROC AUC per round (each hospital and the weighted mean), as PNG."""
    fed = feds.get_federation(db, federation_id)
    png = metrics_png(_points(db, fed.id), title=f"{fed.name}: metrics reported by hospitals")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/federations/{federation_id}/rounds/{number}/aggregate")
def federation_force_aggregate(
    request: Request,
    federation_id: FederationId,
    number: RoundNumber,
    portal: PortalDep,
    db: SessionDep,
    admin: WebAdmin,
    ip: ClientIP,
    csrf_token: FormStr = "",
) -> Response:
    """Aggregate the open (or failed) round now if the quorum is met (admin)."""
    check_csrf(request, csrf_token)
    fed = feds.get_federation(db, federation_id)
    feds.get_round(db, fed, number)
    agg.maybe_aggregate(portal, federation_id, force=True, actor=admin, client_ip=ip)
    return redirect(f"/federations/{federation_id}")


@router.post("/federations/{federation_id}/rounds/{number}/uploads/{upload_id}/exclude")
def federation_exclude_upload(
    request: Request,
    federation_id: FederationId,
    number: RoundNumber,
    upload_id: UploadId,
    portal: PortalDep,
    db: SessionDep,
    admin: WebAdmin,
    ip: ClientIP,
    reason: FormStr = "",
    csrf_token: FormStr = "",
) -> Response:
    """Leave an update out of the round's aggregate (admin); the round reopens."""
    check_csrf(request, csrf_token)
    fed = feds.get_federation(db, federation_id)
    agg.exclude_upload(
        portal,
        db,
        fed,
        round_number=number,
        upload_id=upload_id,
        reason=reason.strip() or "excluded by the admin",
        actor=admin,
        client_ip=ip,
    )
    agg.maybe_aggregate(portal, federation_id)
    return redirect(f"/federations/{federation_id}")


@router.post("/federations/{federation_id}/cancel")
def federation_cancel(
    request: Request,
    federation_id: FederationId,
    portal: PortalDep,
    db: SessionDep,
    admin: WebAdmin,
    ip: ClientIP,
    reason: FormStr = "",
    csrf_token: FormStr = "",
) -> Response:
    """Cancel the federation (admin)."""
    check_csrf(request, csrf_token)
    fed = feds.get_federation(db, federation_id)
    feds.cancel_federation(portal, db, fed, reason=reason, actor=admin, client_ip=ip)
    return redirect(f"/federations/{federation_id}")


def _edit_form(fed: Any) -> dict[str, Any]:
    form: dict[str, Any] = {}
    for key in SETTING_FIELDS:
        value = getattr(fed, key)
        form[key] = "" if value is None else (f"{value:g}" if isinstance(value, float) else value)
    form["local_overrides"] = [x for x in fed.local_overrides.split(",") if x]
    form["protection"] = feds.scheme_of(fed).name
    return form


@router.get("/federations/{federation_id}/edit")
def federation_edit(
    request: Request, federation_id: FederationId, db: SessionDep, admin: WebAdmin
) -> Response:
    """The admin's form for correcting a federation before round 1 has an upload."""
    fed = feds.get_federation(db, federation_id)
    return render(
        request,
        "federation_edit.html",
        _form_context(_edit_form(fed), [], fed=fed),
        user=admin,
    )


@router.post("/federations/{federation_id}/edit")
def federation_edit_submit(
    request: Request,
    federation_id: FederationId,
    portal: PortalDep,
    db: SessionDep,
    admin: WebAdmin,
    ip: ClientIP,
    model: FormStr = "",
    task: FormStr = "",
    dataset: FormStr = "",
    local_epochs: FormStr = "",
    lr: FormStr = "",
    batch_size: FormStr = "",
    image_size: FormStr = "",
    local_overrides: FormList = [],  # noqa: B006 (FastAPI reads it, never mutates it)
    dataset_description: FormStr = "",
    protection: FormStr = "",
    he_preset: FormStr = "",
    quorum: FormStr = "",
    round_deadline_minutes: FormStr = "",
    num_rounds: FormStr = "",
    model_size: FormStr = "",
    csrf_token: FormStr = "",
) -> Response:
    """Apply the corrections (fields left as they were are not changed)."""
    check_csrf(request, csrf_token)
    fed = feds.get_federation(db, federation_id)
    form: dict[str, Any] = {
        "model": model,
        "task": task,
        "dataset": dataset,
        "local_epochs": local_epochs,
        "lr": lr,
        "batch_size": batch_size,
        "image_size": image_size,
        "local_overrides": list(local_overrides),
        "dataset_description": dataset_description,
        "protection": protection,
        "he_preset": he_preset,
        "quorum": quorum,
        "round_deadline_minutes": round_deadline_minutes,
        "num_rounds": num_rounds,
        "model_size": model_size,
    }
    current = _cleaned(_edit_form(fed))
    submitted = _cleaned(form)
    changed = {k: v for k, v in submitted.items() if str(v) != str(current.get(k))}
    try:
        data = FederationUpdate.model_validate(changed)
        feds.update_federation(portal, db, fed, data, actor=admin, client_ip=ip)
    except ValidationError as exc:
        errors = _errors(exc)
    except PortalError as exc:
        errors = [exc.message]
    else:
        return redirect(f"/federations/{federation_id}")
    return render(
        request,
        "federation_edit.html",
        _form_context(form, errors, fed=fed),
        user=admin,
        status_code=422,
    )


@router.post("/federations/{federation_id}/publish")
async def federation_publish(
    request: Request,
    federation_id: FederationId,
    portal: PortalDep,
    admin: WebAdmin,
    ip: ClientIP,
    model_size: FormStr = "",
    csrf_token: FormStr = "",
    initial_model: FormFile = None,
    server_key: FormFile = None,
    registry: FormFile = None,
) -> Response:
    """Finish a draft federation: its public key file and/or initial model (admin)."""
    check_csrf(request, csrf_token)
    limit = portal.settings.max_upload_bytes
    key_limit = min(limit, MAX_SERVER_KEY_BYTES)
    key_bytes = (
        await server_key.read(key_limit + 1)
        if server_key is not None and server_key.filename
        else None
    )
    registry_bytes = (
        await registry.read(secagg_members.MAX_REGISTRY_BYTES + 1)
        if registry is not None and registry.filename
        else None
    )
    pending: PendingBlob | None = None
    if initial_model is not None and initial_model.filename:
        pending = await receive_form_file(initial_model, portal.store, limit=limit)
    digits = model_size.strip()
    size = int(digits) if digits.isdigit() and 0 < len(digits) <= 10 else None
    if size is not None and not 1 <= size <= MAX_MODEL_VALUES:
        size = None

    def _publish() -> None:
        with portal.session() as db:
            fed = feds.get_federation(db, federation_id)
            if key_bytes is not None:
                if len(key_bytes) > key_limit:
                    raise InvalidContentError("the server key exceeds the size limit")
                feds.set_server_key(portal, db, fed, key_bytes, actor=admin, client_ip=ip)
            if registry_bytes is not None:
                secagg_members.set_registry(
                    portal, db, fed, registry_bytes, actor=admin, client_ip=ip
                )
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
