"""Alembic migrations: the schema they build equals the models, on SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from portal_helpers import Api, FakeClock, make_settings, plain_update, sha
from sqlalchemy import inspect, text

from fedcrypt.exceptions import ConfigError
from fedcrypt.portal import migrate
from fedcrypt.portal.app import create_app
from fedcrypt.portal.config import default_db_url
from fedcrypt.portal.context import Portal
from fedcrypt.portal.db import Base, make_engine, normalize_url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database (no tables at all)."""
    if request.param == "sqlite":
        return default_db_url(tmp_path)
    return str(request.getfixturevalue("fresh_postgres"))


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_migrations_build_exactly_the_models_schema(empty_db: str) -> None:
    engine = make_engine(empty_db)
    first = migrate.upgrade(engine)
    assert first.before is None and first.after == migrate.head_revision() and first.changed
    again = migrate.upgrade(engine)  # idempotent
    assert not again.changed
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()
    assert _diff(empty_db) == []


def test_every_revision_downgrades_and_upgrades_again(empty_db: str) -> None:
    engine = make_engine(empty_db)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        cfg = migrate._config(conn)
        command.downgrade(cfg, "base")
        conn.commit()
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        command.upgrade(cfg, "head")
        conn.commit()
    engine.dispose()
    assert _diff(empty_db) == []


def test_a_database_from_before_migrations_is_stamped_and_upgraded(
    tmp_path: Path, empty_db: str, clock: FakeClock
) -> None:
    """What ``create_all`` built (the 0001 schema, no version table), with a ``ckks`` row."""
    engine = make_engine(empty_db)
    with engine.connect() as conn:
        command.upgrade(migrate._config(conn), migrate.LEGACY_REVISION)
        conn.execute(text("DROP TABLE alembic_version"))
        now = datetime(2026, 10, 1, tzinfo=UTC).replace(tzinfo=None)
        conn.execute(
            text(
                "INSERT INTO federations (name, model, dataset_description, protection, quorum,"
                " round_deadline_minutes, num_rounds, model_size, status, created_at)"
                " VALUES ('old', 'mlp', 'from 2026', 'ckks', 2, 60, 3, 6, 'draft', :now)"
            ),
            {"now": now},
        )
        conn.commit()
    engine.dispose()
    app = create_app(make_settings(tmp_path, db_url=empty_db), clock=clock)  # upgrades
    api = Api(app, clock)
    fed = api.client.get("/api/v1/federations/1", headers=api.admin).json()
    assert fed["protection"] == "he" and fed["local_epochs"] == 1 and fed["batch_size"] == 32
    assert "--key hospital.key" in fed["join_command"]
    # the row still works: correcting it (same mode under its new name) keeps it an he draft
    r = api.client.patch("/api/v1/federations/1", json={"protection": "he"}, headers=api.admin)
    assert r.status_code == 200 and r.json()["protection"] == "he"
    app.state.portal.close()
    assert migrate.current_revision(make_engine(empty_db)) == migrate.head_revision()
    assert _diff(empty_db) == []


def test_serving_without_migrating_refuses_an_old_schema(tmp_path: Path) -> None:
    url = default_db_url(tmp_path)
    engine = make_engine(url)
    with engine.connect() as conn:
        command.upgrade(migrate._config(conn), migrate.LEGACY_REVISION)
        conn.commit()
    engine.dispose()
    with pytest.raises(ConfigError, match="fedcrypt portal migrate"):
        Portal.open(make_settings(tmp_path, migrate_on_start=False))
    Portal.open(make_settings(tmp_path)).close()  # migrates
    Portal.open(make_settings(tmp_path, migrate_on_start=False)).close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = default_db_url(tmp_path)
    engine = make_engine(url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(ConfigError, match="does not know"):
        migrate.upgrade(engine)
    engine.dispose()


def test_the_portal_runs_a_round_on_every_database(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    app = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    api = Api(app, clock)
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(quorum=2, num_rounds=1)
    api.upload(fid, 1, plain_update(np.full(6, 2.0), 3), a)
    api.upload(fid, 1, plain_update(np.full(6, 4.0), 1), b)
    state = api.round(fid, 1)
    assert state["status"] == "aggregated" and state["total_examples"] == 4
    assert state["aggregate_sha256"] == sha(
        TestClient(app).get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=a).content
    )
    app.state.portal.close()


# --- URLs and drivers -------------------------------------------------------------------


def test_database_urls() -> None:
    assert normalize_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ConfigError, match="not a database URL"):
        normalize_url("portal.db")


def test_a_missing_postgres_driver_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in [m for m in sys.modules if m == "psycopg" or m.startswith("psycopg.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fedcrypt\[postgres\]'"):
        make_engine("postgresql://u@127.0.0.1/db")
    from fedcrypt.cli import main as cli_main

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "fedcrypt",
            "portal",
            "migrate",
            "--db",
            "postgresql://u@127.0.0.1/db",
            "--data-dir",
            str(tmp_path),
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fedcrypt[postgres]" in err and "Traceback" not in err


def test_an_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError, match="cannot open the portal database"):
        Portal.open(
            make_settings(
                tmp_path, db_url="postgresql://nobody:x@127.0.0.1:9/none?connect_timeout=2"
            )
        )
