"""Alembic environment: migrate the connection :mod:`fedcrypt.portal.migrate` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from fedcrypt.portal import models  # noqa: F401  (registers the tables)
from fedcrypt.portal.db import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through fedcrypt.portal.migrate
    raise RuntimeError("run the portal's migrations with 'fedcrypt portal migrate'")
_run(connection)
