"""Recoverable rounds: a failed aggregation names its upload; uploads carry their grid.

Rounds record when aggregation last failed and which upload it blamed; uploads record
the quantization grid of packed updates (mode, step-table hash, example capacity) and
whether the admin excluded them from the round.

Revision ID: 0002_recoverable_rounds
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_recoverable_rounds"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns."""
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("failed_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("failed_upload_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("mode", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("table_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("max_examples", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("excluded_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("excluded_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop the columns."""
    with op.batch_alter_table("uploads") as batch:
        for name in ("excluded_reason", "excluded_at", "max_examples", "table_sha256", "mode"):
            batch.drop_column(name)
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("failed_upload_id")
        batch.drop_column("failed_at")
