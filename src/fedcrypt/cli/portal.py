"""``fedcrypt portal``: the consortium web portal and its hospital-side client."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcrypt.cli.options import cli_protection
from fedcrypt.exceptions import ConfigError
from fedcrypt.portal.client import PortalClient

if TYPE_CHECKING:
    import uvicorn

    from fedcrypt.portal.config import PortalSettings

app = typer.Typer(
    help="Consortium portal: serve it, or take part as a hospital.", no_args_is_help=True
)

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

URL_ENV = "FEDCRYPT_PORTAL_URL"
TOKEN_ENV = "FEDCRYPT_PORTAL_TOKEN"  # noqa: S105 (a variable name)
PASSWORD_ENV = "FEDCRYPT_PORTAL_PASSWORD"  # noqa: S105
ADMIN_PASSWORD_ENV = "FEDCRYPT_PORTAL_ADMIN_PASSWORD"  # noqa: S105
ADMIN_EMAIL_ENV = "FEDCRYPT_PORTAL_ADMIN_EMAIL"
DEFAULT_URL = "http://127.0.0.1:8000"

Url = Annotated[
    str, typer.Option("--url", envvar=URL_ENV, help="The portal's address.", show_default=True)
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar=TOKEN_ENV,
        help="API token (from the account page or 'portal token').",
        show_default=False,
    ),
]
FedRef = Annotated[str, typer.Argument(help="Federation id or name.")]
RoundOpt = Annotated[
    int | None,
    typer.Option("--round", "-r", help="Round number.", show_default="the current round"),
]
RoundBind = Annotated[
    int | None,
    typer.Option(
        "--round",
        "-r",
        min=0,
        help="he: the round this message belongs to (bound into it; decrypt refuses an "
        "aggregate of another round) [default: not bound].",
    ),
]
RunBind = Annotated[
    str, typer.Option("--run", help="he: the run or federation id bound with --round.")
]


def make_client(url: str, token: str | None) -> PortalClient:
    """The HTTP client the commands use (tests replace it with an in-process one)."""
    return PortalClient(url, token=token)


def _authed(url: str, token: str | None) -> PortalClient:
    if not token:
        raise ConfigError(
            f"no API token: pass --token or set {TOKEN_ENV} (create one on the portal's "
            "account page or with 'fedcrypt portal token')"
        )
    return make_client(url, token)


def _password(prompt: str, *, confirm: bool = False) -> str:
    value = os.environ.get(PASSWORD_ENV)
    if value:
        return value
    if not sys.stdin.isatty():
        raise ConfigError(f"no password: set {PASSWORD_ENV} or run in a terminal to be prompted")
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True))


def _resolve_round(client: PortalClient, fed_id: int, number: int | None) -> int:
    if number is not None:
        return number
    rounds = client.rounds(fed_id)
    if not rounds:
        raise ConfigError("the federation has no rounds yet: its initial model is not published")
    return rounds[-1].number


# --- the server -----------------------------------------------------------------------


def _settings(db: str | None, data_dir: Path, **extra: object) -> PortalSettings:
    from pydantic import ValidationError

    from fedcrypt.portal.config import PortalSettings, default_db_url, load_or_create_secret

    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return PortalSettings(
            db_url=db or default_db_url(data_dir),
            data_dir=data_dir.resolve(),
            secret_key=load_or_create_secret(data_dir),
            **extra,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{where}: {str(first['msg']).removeprefix('Value error, ')}") from None


DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="FEDCRYPT_PORTAL_DB",
        help="SQLAlchemy database URL, e.g. postgresql+psycopg://user:pw@host/portal "
        "(needs 'pip install fedcrypt[postgres]').",
        show_default="sqlite:///DATA_DIR/portal.db",
    ),
]
DataDirOpt = Annotated[
    Path, typer.Option("--data-dir", help="Folder for uploaded blobs (and the SQLite file).")
]


@app.command()
def serve(
    db: DbOpt = None,
    data_dir: DataDirOpt = Path("portal-data"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_upload_mb: Annotated[
        int, typer.Option("--max-upload-mb", help="Largest accepted upload in MiB.")
    ] = 1024,
    admin_email: Annotated[
        str, typer.Option("--admin-email", envvar=ADMIN_EMAIL_ENV, help="Admin e-mail (first run).")
    ] = "admin@localhost",
    secure_cookies: Annotated[
        bool, typer.Option("--secure-cookies", help="Mark cookies Secure (behind HTTPS).")
    ] = False,
    forwarded_allow_ips: Annotated[
        str,
        typer.Option(
            "--forwarded-allow-ips",
            envvar="FEDCRYPT_PORTAL_FORWARDED_ALLOW_IPS",
            help="Comma-separated addresses or CIDR networks of the reverse proxies whose "
            "X-Forwarded-For/-Proto headers are believed (e.g. 127.0.0.1). Empty: the "
            "headers are ignored and the client is the TCP peer.",
        ),
    ] = "",
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate/--no-migrate",
            help="Upgrade the database schema at startup (--no-migrate: refuse a database "
            "that is not current; run 'fedcrypt portal migrate' first).",
        ),
    ] = True,
    aggregate_batch_mb: Annotated[
        int,
        typer.Option(
            "--aggregate-batch-mb", help="Aggregation adds updates in batches of this many MiB."
        ),
    ] = 256,
    tick: Annotated[
        float, typer.Option("--tick", help="Seconds between round-deadline checks.")
    ] = 5.0,
) -> None:
    """Run the portal (first run: create the admin from FEDCRYPT_PORTAL_ADMIN_PASSWORD)."""
    import uvicorn

    from fedcrypt.portal.app import create_app
    from fedcrypt.portal.context import Portal
    from fedcrypt.portal.services import accounts

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if max_upload_mb < 1:
        raise ConfigError(f"--max-upload-mb must be >= 1, got {max_upload_mb}")
    settings = _settings(
        db,
        data_dir,
        max_upload_mb=max_upload_mb,
        cookie_secure=secure_cookies,
        tick_interval_s=tick,
        forwarded_allow_ips=forwarded_allow_ips,
        migrate_on_start=migrate,
        aggregate_batch_mb=aggregate_batch_mb,
    )
    portal = Portal.open(settings)
    try:
        with portal.session() as session:
            has_admin = accounts.admin_exists(session)
        if not has_admin:
            password = os.environ.get(ADMIN_PASSWORD_ENV)
            if not password:
                if not sys.stdin.isatty():
                    raise ConfigError(
                        f"first run: set {ADMIN_PASSWORD_ENV} (at least 12 characters) to "
                        "create the consortium admin account"
                    )
                password = str(
                    typer.prompt(
                        f"Password for the new admin {admin_email}",
                        hide_input=True,
                        confirmation_prompt=True,
                        err=True,
                    )
                )
            try:
                accounts.create_admin(portal, email=admin_email, password=password)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            err.print(f"created the consortium admin account {admin_email}")
    finally:
        portal.close()
    # the schema is current now; the app's own open must not migrate a second time
    application = create_app(settings.model_copy(update={"migrate_on_start": False}))
    proxies = ", ".join(settings.forwarded_allow_ips) or "none (X-Forwarded-For ignored)"
    err.print(
        f"fedcrypt portal on http://{host}:{port}  (API docs: /docs; data: {settings.data_dir}; "
        f"database: {_redacted(settings.db_url)}; upload limit {max_upload_mb} MiB; "
        f"trusted proxies: {proxies})"
    )
    uvicorn.Server(server_config(application, host=host, port=port)).run()


def server_config(application: object, *, host: str, port: int) -> uvicorn.Config:
    """Uvicorn's configuration for the portal.

    Uvicorn's own proxy-header handling is off (it would believe ``X-Forwarded-For``
    from 127.0.0.1 by default): the portal reads forwarding headers only from
    ``--forwarded-allow-ips`` (:mod:`fedcrypt.portal.proxy`).
    """
    import uvicorn

    return uvicorn.Config(
        application,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
    )


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is refused later with its own message
        return "?"


@app.command("migrate")
def migrate_db(db: DbOpt = None, data_dir: DataDirOpt = Path("portal-data")) -> None:
    """Upgrade the portal database's schema to this version (Alembic; safe to rerun)."""
    from fedcrypt.portal import migrate
    from fedcrypt.portal.db import make_engine

    settings = _settings(db, data_dir)
    engine = make_engine(settings.db_url)
    try:
        from sqlalchemy.exc import OperationalError

        try:
            result = migrate.upgrade(engine)
        except OperationalError as exc:
            raise ConfigError(f"cannot open the portal database: {exc.orig}") from None
    finally:
        engine.dispose()
    where = _redacted(settings.db_url)
    if result.stamped_legacy:
        console.print(f"{where}: created before migrations; stamped {migrate.LEGACY_REVISION}")
    if result.changed:
        console.print(
            f"{where}: upgraded from {result.before or 'an empty database'} to {result.after}"
        )
    else:
        console.print(f"{where}: already at {result.after}")


@app.command("set-password")
def set_password(
    email: Annotated[str, typer.Option("--email", help="The account (admin or hospital).")],
    db: DbOpt = None,
    data_dir: Annotated[Path, typer.Option("--data-dir", help="The portal's data folder.")] = Path(
        "portal-data"
    ),
) -> None:
    """Set an account's password on the server (e.g. a forgotten admin password).

    Ends the account's browser sessions and revokes its API tokens.
    """
    from fedcrypt.portal.context import Portal
    from fedcrypt.portal.errors import PortalError
    from fedcrypt.portal.services import accounts

    if db is None and not (data_dir / "portal.db").is_file():
        raise ConfigError(f"no portal database in {data_dir} (pass --data-dir or --db)")
    password = _password("New password (at least 12 characters)", confirm=True)
    portal = Portal.open(_settings(db, data_dir))
    try:
        user = accounts.set_password(portal, email=email, password=password)
    except (PortalError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        portal.close()
    console.print(
        f"password of {user.email} changed; its browser sessions were ended and its API "
        "tokens revoked"
    )


# --- accounts -------------------------------------------------------------------------


@app.command()
def register(
    name: Annotated[str, typer.Option("--name", help="Hospital name.")],
    email: Annotated[str, typer.Option("--email", help="Contact e-mail (the login).")],
    url: Url = DEFAULT_URL,
) -> None:
    """Register a hospital (password from FEDCRYPT_PORTAL_PASSWORD or prompted)."""
    password = _password("Password (at least 12 characters)", confirm=True)
    with make_client(url, None) as client:
        user = client.register(name=name, email=email, password=password)
    console.print(
        f"registered {user.name} <{user.email}>: status {user.status}; the admin approves it"
    )


@app.command()
def token(
    email: Annotated[str, typer.Option("--email", help="Account e-mail.")],
    url: Url = DEFAULT_URL,
) -> None:
    """Print a new API token for an approved account (revokes the previous one)."""
    password = _password("Password")
    with make_client(url, None) as client:
        out = client.issue_token(email=email, password=password)
    err.print(f"new API token for {out.user.email}, expires {out.expires_at:%Y-%m-%d}; shown once:")
    typer.echo(out.token)


@app.command()
def hospitals(
    status: Annotated[
        str | None, typer.Option(help="pending, approved, rejected or suspended.")
    ] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """List hospital accounts (admin)."""
    with _authed(url, token) as client:
        rows = client.hospitals(status=status)
    table = Table("id", "hospital", "e-mail", "status", "registered")
    for u in rows:
        table.add_row(str(u.id), u.name, u.email, u.status, f"{u.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


def _decide(ref: str, decision: str, url: str, token: str | None) -> None:
    with _authed(url, token) as client:
        if ref.isdigit():
            hid = int(ref)
        else:
            match = [u for u in client.hospitals() if u.email == ref.lower()]
            if not match:
                raise ConfigError(f"no hospital with e-mail {ref!r}")
            hid = match[0].id
        user = client.decide(hid, decision)
    console.print(f"{user.name} <{user.email}>: {user.status}")


@app.command()
def approve(
    hospital: Annotated[str, typer.Argument(help="Hospital id or e-mail.")],
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Approve a pending hospital (admin)."""
    _decide(hospital, "approve", url, token)


@app.command()
def reject(
    hospital: Annotated[str, typer.Argument(help="Hospital id or e-mail.")],
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Reject a hospital's registration (admin)."""
    _decide(hospital, "reject", url, token)


# --- federations ----------------------------------------------------------------------


@app.command("init-model")
def init_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the state_dict.")],
    model: Annotated[str, typer.Option(help="mlp, cnn or mobilenetv2.")] = "mlp",
    dataset: Annotated[
        str, typer.Option(help="Dataset that fixes the input shape and classes.")
    ] = "wdbc",
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder of MedMNIST .npz files.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
) -> None:
    """Write a freshly initialised model's state_dict (the federation's initial model)."""
    import torch

    from fedcrypt.protection.flatten import Layout
    from fedcrypt.tasks.data.datasets import load_dataset
    from fedcrypt.tasks.models import create_model

    ds = load_dataset(dataset, data_dir=data_dir, seed=seed)
    torch.manual_seed(seed)
    net = create_model(model, input_shape=ds.input_shape, num_classes=ds.num_classes)
    state = net.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    size = Layout.of(state).size
    console.print(
        f"wrote {out}: {model} for {dataset} {ds.input_shape} -> {ds.num_classes} classes, "
        f"{size} values"
    )


LocalOverride = Annotated[
    list[str] | None,
    typer.Option(
        "--local-override",
        help="A setting each hospital may choose itself: local_epochs, lr, batch_size or "
        "image_size (repeat the option for several).",
        show_default=False,
    ),
]


@app.command("create-federation")
def create_federation(
    name: Annotated[str, typer.Option("--name", help="Federation name.")],
    initial_model: Annotated[
        Path, typer.Option("--initial-model", help="state_dict file (see 'portal init-model').")
    ],
    model: Annotated[
        str,
        typer.Option(
            help="Model the hospitals build: mlp, cnn, mobilenetv2, resnet18, or a task "
            "reference (package.module:NAME or FILE.py:NAME)."
        ),
    ] = "mlp",
    dataset: Annotated[
        str | None,
        typer.Option(help="Built-in dataset the hospitals train on (e.g. wdbc, breastmnist)."),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Task reference (package.module:NAME or FILE.py:NAME) instead."),
    ] = None,
    local_epochs: Annotated[
        int, typer.Option("--local-epochs", help="Local epochs per round.")
    ] = 1,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate.", show_default="the model's default")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Local batch size.")] = 32,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Image side in pixels (image tasks).")
    ] = None,
    local_override: LocalOverride = None,
    dataset_description: Annotated[
        str, typer.Option("--description", help="Dataset description.")
    ] = "",
    protection: Annotated[
        str,
        typer.Option(
            help="he (homomorphic encryption), secagg (secure aggregation: the portal relays "
            "its stages) or plain; ckks is a deprecated alias of he."
        ),
    ] = "he",
    server_key: Annotated[
        Path | None,
        typer.Option("--server-key", help="he: the public server.key (never hospital.key)."),
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry",
            help="secagg: the consortium's public registry.pub from 'fedcrypt keys generate "
            "--protection secagg' (never a hospital-<i>.key or group-mask.key).",
        ),
    ] = None,
    he_preset: Annotated[
        str | None,
        typer.Option(
            "--he-preset", help="HE preset (must match server.key; read from it if unset)."
        ),
    ] = None,
    quorum: Annotated[int, typer.Option(help="Minimum hospitals per round.")] = 2,
    deadline_minutes: Annotated[
        float, typer.Option("--deadline-minutes", help="Round deadline.")
    ] = 60.0,
    rounds: Annotated[int, typer.Option(help="Number of rounds.")] = 10,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Create a federation with its settings, upload its key and initial model, open round 1."""
    import torch

    from fedcrypt.protection.flatten import Layout
    from fedcrypt.protection.registry import get_scheme

    protection = cli_protection(protection)
    scheme = get_scheme(protection)
    if scheme.key_pair and server_key is None:
        raise ConfigError("an he federation needs --server-key (the public server.key)")
    if scheme.staged and registry is None:
        raise ConfigError(
            "a secagg federation needs --registry (the public registry.pub from 'fedcrypt "
            "keys generate --protection secagg')"
        )
    if server_key is not None and not scheme.key_pair:
        raise ConfigError(f"--server-key is for he federations, not {scheme.name}")
    if registry is not None and not scheme.staged:
        raise ConfigError(f"--registry is for secagg federations, not {scheme.name}")
    if registry is not None:
        from fedcrypt.protection.secagg.keys import load_registry

        load_registry(registry)  # a secret key file is refused here, before anything is sent
    if not initial_model.is_file():
        raise ConfigError(f"initial model not found: {initial_model}")
    try:
        state = torch.load(initial_model, map_location="cpu", weights_only=True)
        size = Layout.of(state).size
    except Exception as exc:  # torch raises many types for a bad file
        raise ConfigError(f"{initial_model} is not a state_dict file: {exc}") from None
    with _authed(url, token) as client:
        fed = client.create_federation(
            name=name,
            model=model,
            task=task,
            dataset=dataset,
            local_epochs=local_epochs,
            lr=lr,
            batch_size=batch_size,
            image_size=image_size,
            local_overrides=list(local_override or []),
            dataset_description=dataset_description,
            protection=protection,
            he_preset=he_preset,
            quorum=quorum,
            round_deadline_minutes=deadline_minutes,
            num_rounds=rounds,
            model_size=size,
        )
        if server_key is not None:
            fed = client.put_server_key(fed.id, server_key)
        if registry is not None:
            fed = client.put_registry(fed.id, registry)
        fed = client.put_initial_model(fed.id, initial_model, model_size=size)
    console.print(
        f"federation {fed.name!r} (id {fed.id}) is {fed.status}: {fed.protection}, quorum "
        f"{fed.quorum}, {fed.num_rounds} rounds; round {fed.current_round} is open"
    )
    if fed.join_command:
        console.print(f"hospitals join with:\n  {fed.join_command}", soft_wrap=True)


@app.command()
def update(
    federation: FedRef,
    model: Annotated[str | None, typer.Option(help="Model or task reference.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Built-in dataset.")] = None,
    task: Annotated[str | None, typer.Option(help="Task reference.")] = None,
    local_epochs: Annotated[int | None, typer.Option("--local-epochs")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size")] = None,
    local_override: LocalOverride = None,
    no_local_overrides: Annotated[
        bool, typer.Option("--no-local-overrides", help="Let hospitals override nothing.")
    ] = False,
    dataset_description: Annotated[str | None, typer.Option("--description")] = None,
    quorum: Annotated[int | None, typer.Option(help="Minimum hospitals per round.")] = None,
    deadline_minutes: Annotated[float | None, typer.Option("--deadline-minutes")] = None,
    rounds: Annotated[int | None, typer.Option(help="Number of rounds.")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Correct a federation (admin): training and model settings until round 1 has an upload.

    Quorum, deadline, rounds and description change at any time. Changing the model,
    task, dataset or image size of a running federation returns it to draft: publish the
    initial model again (the web page has the form).
    """
    fields: dict[str, object] = {
        k: v
        for k, v in {
            "model": model,
            "dataset": dataset,
            "task": task,
            "local_epochs": local_epochs,
            "lr": lr,
            "batch_size": batch_size,
            "image_size": image_size,
            "dataset_description": dataset_description,
            "quorum": quorum,
            "round_deadline_minutes": deadline_minutes,
            "num_rounds": rounds,
        }.items()
        if v is not None
    }
    if local_override or no_local_overrides:
        fields["local_overrides"] = list(local_override or [])
    if not fields:
        raise ConfigError("nothing to change: pass at least one setting (see --help)")
    with _authed(url, token) as client:
        fed = client.update_federation(client.federation(federation).id, **fields)
    console.print(
        f"federation {fed.name!r} (id {fed.id}) is {fed.status}; changed: {', '.join(fields)}"
    )


@app.command()
def cancel(
    federation: FedRef,
    reason: Annotated[str, typer.Option(help="Why (shown to the hospitals).")] = "",
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Cancel a federation (admin): its open round closes and uploads are refused."""
    with _authed(url, token) as client:
        fed = client.cancel_federation(client.federation(federation).id, reason=reason)
    console.print(f"federation {fed.name!r} (id {fed.id}) is {fed.status}")


@app.command()
def exclude(
    federation: FedRef,
    upload_id: Annotated[int, typer.Argument(help="The upload's id (see 'portal status').")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    round_: RoundOpt = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Leave an update out of its round's aggregate (admin), e.g. the one a failure named."""
    with _authed(url, token) as client:
        fed = client.federation(federation)
        number = _resolve_round(client, fed.id, round_)
        up = client.exclude_upload(fed.id, number, upload_id, reason=reason)
        state = client.round(fed.id, number)
    console.print(
        f"excluded upload {up.id} ({up.hospital}) from round {number}; the round is "
        f"{state.status} with {state.num_uploads} of {state.expected_uploads} updates"
    )


@app.command()
def aggregate(
    federation: FedRef,
    round_: RoundOpt = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Aggregate the open (or failed) round now, if its quorum is met (admin)."""
    with _authed(url, token) as client:
        fed = client.federation(federation)
        number = _resolve_round(client, fed.id, round_)
        state = client.force_aggregate(fed.id, number)
    if state.status == "failed":
        raise ConfigError(f"round {number}: {state.error}")
    console.print(f"round {number} is {state.status}")


@app.command()
def federations(url: Url = DEFAULT_URL, token: Token = None) -> None:
    """List federations."""
    with _authed(url, token) as client:
        rows = client.federations()
    table = Table("id", "name", "status", "protection", "model", "round", "quorum")
    for f in rows:
        table.add_row(
            str(f.id),
            f.name,
            f.status,
            f.protection,
            f.model,
            f"{f.current_round or '-'} / {f.num_rounds}",
            str(f.quorum),
        )
    console.print(table)


@app.command()
def status(federation: FedRef, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Show a federation's rounds and uploads."""
    with _authed(url, token) as client:
        fed = client.federation(federation)
        rounds = client.rounds(fed.id)
        console.print(
            f"[bold]{fed.name}[/bold] (id {fed.id}): {fed.status}, {fed.protection}, model "
            f"{fed.model} ({fed.model_size or '?'} values), quorum {fed.quorum}"
        )
        staged = any(r.stage is not None for r in rounds)
        table = Table(
            "round",
            "status",
            *(["stage", "masked updates"] if staged else ["uploads"]),
            "deadline (UTC)",
            "aggregate",
            *([] if staged else ["mine"]),
        )
        for r in rounds:
            deadline = r.stage_deadline_at if r.stage_deadline_at else r.deadline_at
            table.add_row(
                str(r.number),
                r.status,
                *([r.stage or "-"] if staged else []),
                f"{r.num_uploads}/{r.expected_uploads}",
                f"{deadline:%Y-%m-%d %H:%M:%S}",
                f"{r.aggregate_size} B" if r.aggregate_size else "-",
                *([] if staged else ["yes" if r.uploaded_by_me else ""]),
            )
        console.print(table)
        if staged and rounds:
            for att in client.secagg_sessions(fed.id, rounds[-1].number)[-1:]:
                gone = [
                    f"{h.hospital} (hospital {h.hospital_id}) at {h.stage}: {h.reason}"
                    for h in att.hospitals
                    if h.status == "dropped"
                ]
                console.print(
                    f"round {rounds[-1].number} session (protocol round "
                    f"{att.protocol_round or '-'}): {att.stage}, threshold "
                    f"{att.threshold or '-'}; dropped out: {'; '.join(gone) or 'none'}",
                    markup=False,
                )
        if rounds and rounds[-1].error:
            console.print(f"round {rounds[-1].number}: {rounds[-1].error}", markup=False)
        if fed.join_command and fed.status == "running":
            console.print(f"join with: {fed.join_command}", markup=False, soft_wrap=True)


# --- a hospital's steps ---------------------------------------------------------------


@app.command()
def upload(
    federation: FedRef,
    update: Annotated[Path, typer.Argument(help="Protected update file.")],
    round_: RoundOpt = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Upload a protected update for a round (a re-upload replaces the earlier one)."""
    if not update.is_file():
        raise ConfigError(f"update file not found: {update}")
    with _authed(url, token) as client:
        fed = client.federation(federation)
        number = _resolve_round(client, fed.id, round_)
        up = client.upload_update(fed.id, number, update)
    console.print(
        f"uploaded round {up.round} update: {up.size} bytes, {up.num_examples} examples, "
        f"sha256 {up.sha256[:16]}… (version {up.version})"
    )


@app.command()
def download(
    federation: FedRef,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the file.")],
    round_: RoundOpt = None,
    initial: Annotated[
        bool, typer.Option("--initial", help="Download the initial model instead.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the round is aggregated.")
    ] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Download a round's protected aggregate (or the initial model)."""
    with _authed(url, token) as client:
        fed = client.federation(federation)
        if initial:
            sha = client.download_initial_model(fed.id, out)
            console.print(f"wrote the initial model to {out} (sha256 {sha[:16]}…)")
            return
        number = _resolve_round(client, fed.id, round_)
        if wait:
            client.wait_for_aggregate(fed.id, number)
        sha = client.download_aggregate(fed.id, number, out)
    console.print(f"wrote the protected aggregate of round {number} to {out} (sha256 {sha[:16]}…)")


@app.command()
def report(
    federation: FedRef,
    loss: Annotated[float, typer.Option(help="Loss of the decrypted global model.")],
    accuracy: Annotated[float, typer.Option(help="Accuracy in [0, 1].")],
    num_examples: Annotated[int, typer.Option("--num-examples", help="Examples evaluated.")],
    auc: Annotated[float | None, typer.Option(help="ROC AUC in [0, 1].")] = None,
    round_: RoundOpt = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Report metrics measured locally on a round's decrypted global model."""
    with _authed(url, token) as client:
        fed = client.federation(federation)
        number = round_ if round_ is not None else _last_aggregated(client, fed.id)
        m = client.report_metrics(
            fed.id, number, loss=loss, accuracy=accuracy, auc=auc, num_examples=num_examples
        )
    console.print(f"reported round {m.round}: loss {m.loss:.4f}, accuracy {m.accuracy:.4f}")


def _last_aggregated(client: PortalClient, fed_id: int) -> int:
    done = [r.number for r in client.rounds(fed_id) if r.status == "aggregated"]
    if not done:
        raise ConfigError("no round has been aggregated yet")
    return done[-1]


@app.command()
def protect(
    weights: Annotated[
        Path, typer.Argument(help="A state_dict file (your locally trained model).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Protected update file to write.")],
    num_examples: Annotated[
        int, typer.Option("--num-examples", help="Local training examples (FedAvg weight).")
    ],
    protection: Annotated[
        str, typer.Option(help="he or plain; ckks is a deprecated alias of he.")
    ] = "he",
    key: Annotated[
        Path | None, typer.Option("--key", help="he: your hospital.key (secret).")
    ] = None,
    round_: RoundBind = None,
    run: RunBind = "",
) -> None:
    """Protect a state_dict for upload (he: encrypt with the hospital key)."""
    import torch

    from fedcrypt.protection.flatten import Layout, flatten
    from fedcrypt.protection.registry import hospital_protection

    state = torch.load(weights, map_location="cpu", weights_only=True)
    prot = hospital_protection(cli_protection(protection), key_file=key, layout=Layout.of(state))
    if round_ is not None and hasattr(prot, "set_round"):
        prot.set_round(run, round_)
    out.write_bytes(prot.protect(flatten(state), num_examples=num_examples))
    console.print(f"wrote {out} ({out.stat().st_size} bytes, {protection})")


@app.command()
def decrypt(
    aggregate: Annotated[
        Path, typer.Argument(help="A protected aggregate from 'portal download'.")
    ],
    like: Annotated[
        Path, typer.Option("--like", help="A state_dict of the same model (the layout).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="state_dict file to write.")],
    protection: Annotated[
        str, typer.Option(help="he or plain; ckks is a deprecated alias of he.")
    ] = "he",
    key: Annotated[
        Path | None, typer.Option("--key", help="he: your hospital.key (secret).")
    ] = None,
    round_: RoundBind = None,
    run: RunBind = "",
) -> None:
    """Decrypt an aggregate into the global model's state_dict (FedAvg mean).

    The aggregate's integrity is verified; a corrupted, tampered or (with --round)
    replayed aggregate is refused.
    """
    import torch

    from fedcrypt.protection.flatten import Layout, unflatten
    from fedcrypt.protection.registry import hospital_protection

    layout = Layout.of(torch.load(like, map_location="cpu", weights_only=True))
    prot = hospital_protection(cli_protection(protection), key_file=key, layout=layout)
    if round_ is not None and run and hasattr(prot, "set_round"):
        prot.set_round(run, round_)
    blob = aggregate.read_bytes()
    result = (
        prot.unprotect(blob) if round_ is None else prot.unprotect(blob, round=round_)  # type: ignore[call-arg]
    )
    torch.save(unflatten(result.mean, layout), out)
    console.print(
        f"wrote {out}: mean of {result.num_updates} updates over {result.total_examples} examples"
    )


@app.command()
def participate(
    federation: FedRef,
    rounds: Annotated[int, typer.Option(help="Rounds to take part in.")] = 1,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Built-in task: wdbc, breastmnist, pneumoniamnist or a .npz path.",
            show_default="the federation's",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder of this hospital's .npz files.")
    ] = None,
    client_id: Annotated[
        int, typer.Option("--client-id", help="This hospital's share of the simulated partition.")
    ] = 0,
    num_clients: Annotated[
        int, typer.Option("--num-clients", help="Hospitals the dataset is split among.")
    ] = 1,
    partition: Annotated[str, typer.Option(help="iid or dirichlet.")] = "iid",
    seed: Annotated[int, typer.Option(help="Seed of partition and training.")] = 0,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--local-epochs",
            help="Local epochs per round (only if the federation allows it).",
            show_default="the federation's",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Adam learning rate (only if the federation allows it).",
            show_default="the federation's",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Local batch size (only if the federation allows it).",
            show_default="the federation's",
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="Image side in pixels (only if the federation allows it).",
            show_default="the federation's",
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key",
            help="he: the consortium's hospital.key; secagg: your own hospital-<i>.key "
            "(secret, either way).",
        ),
    ] = None,
    group_mask_key: Annotated[
        Path | None,
        typer.Option(
            "--group-mask-key",
            help="secagg: the consortium's group-mask.key (secret, hospitals only).",
        ),
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry",
            help="secagg: the consortium's registry.pub (checked against your key file).",
            show_default="downloaded from the portal",
        ),
    ] = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            "--state-file",
            help="secagg: the protocol rounds this hospital joined (never joins one twice); "
            "keep one per key.",
            show_default="OUT/secagg-state-hospital-<i>",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="Your own task: FILE.py:NAME or package.module:NAME (replaces --dataset).",
        ),
    ] = None,
    eval_split: Annotated[str, typer.Option("--eval-split", help="val (local) or test.")] = "val",
    out: Annotated[
        Path, typer.Option("--out", help="Folder for this hospital's models and record.")
    ] = Path("portal-hospital"),
    poll: Annotated[float, typer.Option("--poll", help="Seconds between round checks.")] = 2.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Longest wait per round (s).")
    ] = 3600.0,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Run this hospital's loop for N rounds: train, protect, upload, decrypt, report.

    Under secagg: enrol with your hospital-<i>.key, then per round join, answer the five
    secure-aggregation stages as the portal relays them, unmask the aggregate, report.
    """
    from fedcrypt.portal.participant import ParticipationConfig
    from fedcrypt.portal.participant import participate as run

    if eval_split not in ("val", "test"):
        raise ConfigError(f"--eval-split must be val or test, got {eval_split!r}")
    config = ParticipationConfig(
        dataset=dataset,
        task=task,
        data_dir=data_dir,
        client_id=client_id,
        num_clients=num_clients,
        partition=partition,
        seed=seed,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        image_size=image_size,
        key_file=key,
        group_mask_file=group_mask_key,
        registry_file=registry,
        state_file=state_file,
        eval_split=eval_split,  # type: ignore[arg-type]
        poll_s=poll,
        timeout_s=timeout,
    )
    with _authed(url, token) as client:
        outcomes = run(
            client,
            federation,
            config=config,
            rounds=rounds,
            out_dir=out,
            on_event=lambda msg: console.print(msg),
        )
    console.print(f"done: {len(outcomes)} rounds; record in {out / 'participation.json'}")


@app.command("load-test")
def load_test(
    hospitals: Annotated[int, typer.Option(help="Hospitals uploading at the same time.")] = 20,
    update_mb: Annotated[
        float, typer.Option("--update-mb", help="Size of each hospital's update in MiB.")
    ] = 16.0,
    db: DbOpt = None,
    aggregate_batch_mb: Annotated[
        int, typer.Option("--aggregate-batch-mb", help="The server's aggregation batch in MiB.")
    ] = 64,
    work_dir: Annotated[
        Path, typer.Option("--work-dir", help="Scratch folder (portal data, updates, log).")
    ] = Path("portal-load"),
    out: Annotated[
        Path | None,
        typer.Option("--out", help="JSON file for the figures.", show_default="WORK_DIR/load.json"),
    ] = None,
) -> None:
    """Serve a portal on 127.0.0.1 and let N hospitals upload at once; print peak server RSS.

    Checks that nothing is lost (every update stored under its checksum, the aggregate the
    exact FedAvg) and measures upload throughput and the server's peak resident memory.
    """
    from fedcrypt.portal.loadtest import run_load_test, write_result

    values = max(1, int(update_mb * (1 << 20) / 8))
    result = run_load_test(
        work_dir,
        hospitals=hospitals,
        values=values,
        db_url=db,
        aggregate_batch_mb=aggregate_batch_mb,
        on_event=lambda msg: err.print(msg, markup=False),
    )
    path = out or work_dir / "load.json"
    write_result(result, path)
    console.print(result.summary(), markup=False)
    console.print(f"figures in {path}", markup=False)
    if result.lost or not result.aggregate_exact:
        raise ConfigError(f"{result.lost} updates lost or an inexact aggregate: see {path}")
