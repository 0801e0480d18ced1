"""Federations carry their settings: task, dataset, training settings, local overrides.

Adds the task reference, the dataset, local epochs, learning rate, batch size, image
size, which of them a hospital may override, and cancellation; widens ``model`` so it
can hold a task reference (``package.module:NAME`` or ``FILE.py:NAME``).

Revision ID: 0003_federation_settings
Revises: 0002_recoverable_rounds
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_federation_settings"
down_revision = "0002_recoverable_rounds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the settings columns and widen ``model``."""
    with op.batch_alter_table("federations") as batch:
        batch.alter_column(
            "model",
            existing_type=sa.String(length=64),
            type_=sa.String(length=512),
            existing_nullable=False,
        )
        batch.add_column(sa.Column("task", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("dataset", sa.String(length=256), nullable=True))
        batch.add_column(
            sa.Column("local_epochs", sa.Integer(), nullable=False, server_default="1")
        )
        batch.add_column(sa.Column("lr", sa.Float(), nullable=True))
        batch.add_column(sa.Column("batch_size", sa.Integer(), nullable=False, server_default="32"))
        batch.add_column(sa.Column("image_size", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("local_overrides", sa.String(length=200), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("cancelled_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("cancel_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop the settings columns (fails while a model name is longer than 64 characters)."""
    with op.batch_alter_table("federations") as batch:
        for name in (
            "cancel_reason",
            "cancelled_at",
            "local_overrides",
            "image_size",
            "batch_size",
            "lr",
            "local_epochs",
            "dataset",
            "task",
        ):
            batch.drop_column(name)
        batch.alter_column(
            "model",
            existing_type=sa.String(length=512),
            type_=sa.String(length=64),
            existing_nullable=False,
        )
