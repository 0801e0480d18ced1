"""The secagg relay: enrolled hospitals, sessions (attempts) per round, stage messages.

Adds ``federations.secagg_params`` (the consortium's ``SecAggParams`` as JSON) and three
tables: ``secagg_members`` (a hospital account enrolled as one hospital of the
federation's registry), ``secagg_attempts`` (one secure-aggregation session of a round)
and ``secagg_messages`` (one hospital in one stage of a session: its check-in, or its
request and reply).

Revision ID: 0004_secagg_relay
Revises: 0003_federation_settings
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_secagg_relay"
down_revision = "0003_federation_settings"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the column and the three tables."""
    with op.batch_alter_table("federations") as batch:
        batch.add_column(sa.Column("secagg_params", sa.Text(), nullable=True))
    op.create_table(
        "secagg_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("hospital_id", sa.BigInteger(), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["federation_id"],
            ["federations.id"],
            name=op.f("fk_secagg_members_federation_id_federations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_secagg_members_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secagg_members")),
        sa.UniqueConstraint(
            "federation_id", "user_id", name=op.f("uq_secagg_members_federation_id_user_id")
        ),
        sa.UniqueConstraint(
            "federation_id",
            "hospital_id",
            name=op.f("uq_secagg_members_federation_id_hospital_id"),
        ),
    )
    op.create_index(
        op.f("ix_secagg_members_federation_id"), "secagg_members", ["federation_id"], unique=False
    )
    op.create_index(op.f("ix_secagg_members_user_id"), "secagg_members", ["user_id"], unique=False)
    op.create_table(
        "secagg_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("protocol_round", sa.Integer(), nullable=True),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(), nullable=False),
        sa.Column("stage_deadline_at", sa.DateTime(), nullable=False),
        sa.Column("stage_timeout_s", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
        sa.Column("config", sa.Text(), nullable=True),
        sa.Column("threshold", sa.Integer(), nullable=True),
        sa.Column("num_invited", sa.Integer(), nullable=True),
        sa.Column("server_seconds", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["federation_id"],
            ["federations.id"],
            name=op.f("fk_secagg_attempts_federation_id_federations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["rounds.id"],
            name=op.f("fk_secagg_attempts_round_id_rounds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secagg_attempts")),
        sa.UniqueConstraint(
            "federation_id",
            "protocol_round",
            name=op.f("uq_secagg_attempts_federation_id_protocol_round"),
        ),
    )
    op.create_index(
        op.f("ix_secagg_attempts_federation_id"), "secagg_attempts", ["federation_id"], unique=False
    )
    op.create_index(
        op.f("ix_secagg_attempts_round_id"), "secagg_attempts", ["round_id"], unique=False
    )
    op.create_table(
        "secagg_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("attempt_id", sa.Integer(), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("asked_at", sa.DateTime(), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=True),
        sa.Column("request_size", sa.BigInteger(), nullable=True),
        sa.Column("reply_sha256", sa.String(length=64), nullable=True),
        sa.Column("reply_size", sa.BigInteger(), nullable=True),
        sa.Column("replied_at", sa.DateTime(), nullable=True),
        sa.Column("refusals", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["attempt_id"],
            ["secagg_attempts.id"],
            name=op.f("fk_secagg_messages_attempt_id_secagg_attempts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["secagg_members.id"],
            name=op.f("fk_secagg_messages_member_id_secagg_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secagg_messages")),
        sa.UniqueConstraint(
            "attempt_id",
            "member_id",
            "stage",
            name=op.f("uq_secagg_messages_attempt_id_member_id_stage"),
        ),
    )
    op.create_index(
        op.f("ix_secagg_messages_attempt_id"), "secagg_messages", ["attempt_id"], unique=False
    )
    op.create_index(
        op.f("ix_secagg_messages_member_id"), "secagg_messages", ["member_id"], unique=False
    )


def downgrade() -> None:
    """Drop the tables and the column."""
    op.drop_index(op.f("ix_secagg_messages_member_id"), table_name="secagg_messages")
    op.drop_index(op.f("ix_secagg_messages_attempt_id"), table_name="secagg_messages")
    op.drop_table("secagg_messages")
    op.drop_index(op.f("ix_secagg_attempts_round_id"), table_name="secagg_attempts")
    op.drop_index(op.f("ix_secagg_attempts_federation_id"), table_name="secagg_attempts")
    op.drop_table("secagg_attempts")
    op.drop_index(op.f("ix_secagg_members_user_id"), table_name="secagg_members")
    op.drop_index(op.f("ix_secagg_members_federation_id"), table_name="secagg_members")
    op.drop_table("secagg_members")
    with op.batch_alter_table("federations") as batch:
        batch.drop_column("secagg_params")
