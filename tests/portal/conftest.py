"""Fixtures of the portal tests: cheap password hashing, an app on SQLite and PostgreSQL.

Every test that takes ``db_url`` (directly or through ``api``) runs twice: on a SQLite
file and on a PostgreSQL server named by ``FEDCRYPT_TEST_POSTGRES_URL`` (each test in a
schema of its own). Without that variable the PostgreSQL runs are skipped; CI sets it
(``.ci/run`` installs and starts Debian's PostgreSQL).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from portal_helpers import Api, FakeClock, make_settings

from fedcrypt.portal import security
from fedcrypt.portal.app import create_app
from fedcrypt.portal.config import default_db_url

POSTGRES_ENV = "FEDCRYPT_TEST_POSTGRES_URL"


@pytest.fixture(autouse=True)
def fast_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap argon2 parameters: the real ones take ~0.3 s per hash on CI machines."""
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(security, "_hasher", hasher)
    monkeypatch.setattr(security, "_DUMMY_HASH", hasher.hash("dummy-password"))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server of the tests (skips where ``FEDCRYPT_TEST_POSTGRES_URL`` is unset)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (no PostgreSQL server for the tests)")
    pytest.importorskip(
        "psycopg", reason="psycopg is not installed (pip install 'fedcrypt[postgres]')"
    )
    return url


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def fresh_postgres(postgres_url: str) -> Iterator[str]:
    """A URL whose connections use a new, empty schema (dropped afterwards)."""
    from sqlalchemy import create_engine, text

    from fedcrypt.portal.db import normalize_url

    schema = "t_" + secrets.token_hex(6)
    admin = create_engine(normalize_url(postgres_url))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _with_search_path(normalize_url(postgres_url), schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once to the head revision (copied for every test)."""
    from fedcrypt.portal import migrate
    from fedcrypt.portal.db import make_engine

    folder = tmp_path_factory.mktemp("template")
    engine = make_engine(default_db_url(folder))
    migrate.upgrade(engine)
    engine.dispose()
    return folder / "portal.db"


@pytest.fixture(scope="session")
def postgres_shared(postgres_url: str) -> Iterator[str]:
    """One PostgreSQL schema migrated once for the session; tests empty it in turn."""
    from sqlalchemy import create_engine, text

    from fedcrypt.portal import migrate
    from fedcrypt.portal.db import make_engine, normalize_url

    schema = "s_" + secrets.token_hex(6)
    admin = create_engine(normalize_url(postgres_url))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = _with_search_path(normalize_url(postgres_url), schema)
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _emptied(url: str) -> str:
    from sqlalchemy import create_engine, text

    from fedcrypt.portal.db import Base

    engine = create_engine(url)
    names = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database of one test: a SQLite file, or an emptied PostgreSQL schema.

    Both start at the head revision (migrated once per session); tests of the
    migrations themselves use ``fresh_postgres`` or a new SQLite file.
    """
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        shutil.copyfile(template, tmp_path / "portal.db")
        return default_db_url(tmp_path)
    return _emptied(str(request.getfixturevalue("postgres_shared")))


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock shared by the app."""
    return FakeClock()


@pytest.fixture
def api(tmp_path: Path, db_url: str, clock: FakeClock) -> Iterator[Api]:
    """A fresh portal with its admin signed in."""
    app = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    helper = Api(app, clock)
    yield helper
    app.state.portal.close()


@pytest.fixture(scope="session")
def ckks_keys() -> tuple[bytes, bytes]:
    """A hospital key file and its server key file (skips if ckks is unavailable)."""
    keys = pytest.importorskip(
        "fedcrypt.protection.he.keys",
        reason="fedcrypt.protection.he.ckks (TenSEAL) is not importable",
    )
    hospital, server = keys.generate_keys("fast")
    return hospital, server
