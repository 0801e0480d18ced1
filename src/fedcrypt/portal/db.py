"""Database engine (SQLite or PostgreSQL), declarative base and a UTC timestamp column type."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from fedcrypt.exceptions import ConfigError

#: Constraint names every table gets, so that migrations can refer to them by name
#: (Alembic, "The Importance of Naming Constraints").
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: What to install for PostgreSQL (the ``postgres`` extra brings psycopg 3).
POSTGRES_HINT = "pip install 'fedcrypt[postgres]'"


class Base(DeclarativeBase):
    """Declarative base of every portal table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and always returned timezone-aware (UTC).

    SQLite drops time zones; storing naive UTC everywhere keeps PostgreSQL and SQLite
    identical.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to naive UTC before storing it."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to a stored naive timestamp."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL the portal connects with.

    ``postgresql://`` and ``postgres://`` (as printed by many hosting providers) mean
    psycopg 3 (``postgresql+psycopg://``); other URLs are returned unchanged.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If ``url`` is not a database URL, or names a database other than SQLite or
        PostgreSQL.
    """
    url = url.strip()
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"--db {url!r} is not a database URL (e.g. sqlite:///portal.db or "
            "postgresql+psycopg://user:password@host/dbname)"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported database {parsed.get_backend_name()!r}: the portal runs on SQLite "
            "or PostgreSQL"
        )
    return url


def is_sqlite(url: str) -> bool:
    """Whether ``url`` is a SQLite database."""
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout.

    PostgreSQL connections are checked before use (``pool_pre_ping``), so a database
    restart costs a reconnect, not failed requests.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the URL is invalid or its driver is not installed (PostgreSQL: one line
        naming ``pip install 'fedcrypt[postgres]'``).
    """
    url = normalize_url(url)
    kwargs: dict[str, Any] = {}
    sqlite = is_sqlite(url)
    if sqlite:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
    try:
        engine = create_engine(url, **kwargs)
    except (ImportError, NoSuchModuleError) as exc:
        backend = make_url(url).get_backend_name()
        hint = POSTGRES_HINT if backend == "postgresql" else "install its driver"
        raise ConfigError(
            f"the {backend} database driver is not installed ({exc}): {hint}"
        ) from None
    if sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)
