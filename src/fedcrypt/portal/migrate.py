"""Bring the portal's database to the current schema with Alembic (no ``create_all``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from fedcrypt.exceptions import ConfigError

log = logging.getLogger(__name__)

#: Where the revisions live (inside the installed package).
SCRIPT_LOCATION = "fedcrypt.portal:migrations"
#: The revision whose schema equals what the portal built with ``create_all`` before it
#: had migrations; such a database is stamped with it, then upgraded.
LEGACY_REVISION = "0001_initial"
#: PostgreSQL advisory-lock key: two portals starting at once migrate one after the other.
_PG_LOCK_KEY = 0x66656463  # "fedc"


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`upgrade` did.

    Attributes
    ----------
    before : str or None
        The revision the database was at (``None``: empty database).
    after : str
        The revision it is at now (the head).
    stamped_legacy : bool
        Whether the database predates migrations and was stamped at
        :data:`LEGACY_REVISION` first.
    """

    before: str | None
    after: str
    stamped_legacy: bool = False

    @property
    def changed(self) -> bool:
        """Whether any revision was applied."""
        return self.before != self.after


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision this version of fedcrypt knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` for a database without one)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _is_legacy(conn: Connection) -> bool:
    names = set(inspect(conn).get_table_names())
    return "users" in names and "alembic_version" not in names


def _known(revision: str) -> bool:
    script = ScriptDirectory.from_config(_config())
    return any(s.revision == revision for s in script.walk_revisions())


def upgrade(engine: Engine) -> MigrationResult:
    """Apply every pending revision (an empty database gets the whole schema).

    A database the portal created before it had migrations is recognised (tables but
    no ``alembic_version``), stamped at :data:`LEGACY_REVISION` and upgraded. On
    PostgreSQL an advisory lock serialises concurrent upgrades.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the database is at a revision this fedcrypt does not know (made by a newer
        version), or cannot be reached.
    """
    head = head_revision()
    with engine.connect() as conn:
        is_pg = conn.dialect.name == "postgresql"
        if is_pg:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
        try:
            before = MigrationContext.configure(conn).get_current_revision()
            if before is not None and not _known(before):
                raise ConfigError(
                    f"the portal database is at schema revision {before!r}, which this "
                    f"version of fedcrypt does not know (its newest is {head!r}): upgrade "
                    "fedcrypt"
                )
            legacy = before is None and _is_legacy(conn)
            if legacy:
                log.info("database predates migrations: stamping %s", LEGACY_REVISION)
                command.stamp(_config(conn), LEGACY_REVISION)
                conn.commit()
            command.upgrade(_config(conn), "head")
            conn.commit()
        finally:
            if is_pg:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
    return MigrationResult(before=before, after=head, stamped_legacy=legacy)


def check_current(engine: Engine) -> None:
    """Refuse to serve a database that is not at the head revision.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        Naming the revision found and the command that upgrades it.
    """
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        found = "no schema" if current is None else f"schema revision {current!r}"
        raise ConfigError(
            f"the portal database has {found}, this fedcrypt needs {head!r}: run "
            "'fedcrypt portal migrate' (or serve without --no-migrate)"
        )
