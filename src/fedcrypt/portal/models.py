"""Database tables: accounts, tokens, federations, rounds, uploads, secagg relay, metrics, audit."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from fedcrypt.portal.db import Base, UTCDateTime, utcnow

ROLE_ADMIN = "admin"
ROLE_HOSPITAL = "hospital"

STATUS_PENDING = "pending"
STATUS_APPROVED = "approved"
STATUS_REJECTED = "rejected"
STATUS_SUSPENDED = "suspended"

FED_DRAFT = "draft"
FED_RUNNING = "running"
FED_FINISHED = "finished"
FED_CANCELLED = "cancelled"

ROUND_OPEN = "open"
ROUND_AGGREGATING = "aggregating"
ROUND_AGGREGATED = "aggregated"
#: Aggregation failed: the reason and the offending upload are recorded; the admin
#: excludes the upload (or the hospital re-uploads) and the round aggregates again.
ROUND_FAILED = "failed"
ROUND_CANCELLED = "cancelled"
#: Rounds that take uploads.
ROUND_ACCEPTING = (ROUND_OPEN, ROUND_FAILED)

#: A secagg attempt collecting check-ins before its session starts.
ATTEMPT_JOIN = "join"
#: A secagg attempt whose aggregate was published.
ATTEMPT_DONE = "done"
#: A secagg attempt that ended with too few hospitals (or a protocol failure).
ATTEMPT_FAILED = "failed"
#: A secagg attempt of a round that was cancelled (or of a federation back in draft).
ATTEMPT_ABANDONED = "abandoned"
#: A hospital checked in to an attempt (stage ``join``).
MSG_JOINED = "joined"
#: The relay holds a request for the hospital and waits for its reply.
MSG_ASKED = "asked"
#: The hospital's reply was accepted by the protocol.
MSG_ANSWERED = "answered"
#: The stage closed without a valid reply from the hospital: it dropped out there.
MSG_DROPPED = "dropped"


class User(Base):
    """A consortium admin or a hospital account."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(120))
    role: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @property
    def is_admin(self) -> bool:
        """Whether the account is the consortium admin."""
        return self.role == ROLE_ADMIN

    @property
    def is_active(self) -> bool:
        """Whether the account may sign in and use the API."""
        return self.status == STATUS_APPROVED


class ApiToken(Base):
    """An API token: public ``key_id`` plus the SHA-256 of its secret part."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User] = relationship()


class WebSession(Base):
    """A browser session: public ``key_id`` plus the SHA-256 of its secret part."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship()


class Federation(Base):
    """A training federation: task, model, training settings, protection, round schedule.

    The training settings (``local_epochs``, ``lr``, ``batch_size``, ``image_size``)
    are the federation's; ``local_overrides`` (comma-separated setting names) lists
    those a hospital may set differently on its own machine. ``server_key_sha256``,
    ``server_key_size`` and ``key_fingerprint`` are the public key material the portal
    holds: ``he``'s ``server.key``, or ``secagg``'s ``registry.pub`` (then the
    fingerprint is the registry's).
    """

    __tablename__ = "federations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    model: Mapped[str] = mapped_column(String(512))
    task: Mapped[str | None] = mapped_column(String(512), nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(256), nullable=True)
    local_epochs: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    lr: Mapped[float | None] = mapped_column(Float, nullable=True)
    batch_size: Mapped[int] = mapped_column(Integer, default=32, server_default="32")
    image_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    local_overrides: Mapped[str] = mapped_column(String(200), default="", server_default="")
    dataset_description: Mapped[str] = mapped_column(Text, default="")
    protection: Mapped[str] = mapped_column(String(16))
    he_preset: Mapped[str | None] = mapped_column(String(64), nullable=True)
    quorum: Mapped[int] = mapped_column(Integer)
    round_deadline_minutes: Mapped[float] = mapped_column(Float)
    num_rounds: Mapped[int] = mapped_column(Integer)
    model_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=FED_DRAFT)
    initial_model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    initial_model_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    server_key_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    server_key_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    key_fingerprint: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: secagg: the consortium's ``SecAggParams`` as JSON (fixed with the registry).
    secagg_params: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    rounds: Mapped[list[Round]] = relationship(
        back_populates="federation", order_by="Round.number", cascade="all, delete-orphan"
    )


class Round(Base):
    """One round of a federation: open for uploads, then aggregated."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("federation_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(
        ForeignKey("federations.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ROUND_OPEN)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime())
    aggregated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    aggregate_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    aggregate_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    num_updates: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_examples: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    aggregation_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    upload_seq: Mapped[int] = mapped_column(Integer, default=0)
    #: When the last aggregation attempt failed, and the upload it blamed (if any).
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failed_upload_id: Mapped[int | None] = mapped_column(Integer, nullable=True)

    federation: Mapped[Federation] = relationship(back_populates="rounds")
    uploads: Mapped[list[Upload]] = relationship(
        back_populates="round", order_by="Upload.id", cascade="all, delete-orphan"
    )
    metrics: Mapped[list[MetricReport]] = relationship(
        back_populates="round", order_by="MetricReport.id", cascade="all, delete-orphan"
    )


class Upload(Base):
    """A hospital's protected update for one round (a re-upload replaces it).

    ``mode``, ``table_sha256`` and ``max_examples`` are the quantization grid of a
    packed (BFV) update, from its header and step-table section; every update of a
    round must share them. An excluded update (``excluded_at``) stays on record but is
    not aggregated, and its hospital cannot upload again in that round.
    """

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("round_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    num_examples: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=1)
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    upload_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    table_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    max_examples: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    excluded_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    excluded_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def excluded(self) -> bool:
        """Whether the admin excluded this update from its round's aggregate."""
        return self.excluded_at is not None

    round: Mapped[Round] = relationship(back_populates="uploads")
    user: Mapped[User] = relationship()


class MetricReport(Base):
    """Metrics a hospital measured locally on a round's decrypted global model."""

    __tablename__ = "metric_reports"
    __table_args__ = (UniqueConstraint("round_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    loss: Mapped[float] = mapped_column(Float)
    accuracy: Mapped[float] = mapped_column(Float)
    auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_examples: Mapped[int] = mapped_column(BigInteger)
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime())

    round: Mapped[Round] = relationship(back_populates="metrics")
    user: Mapped[User] = relationship()


class SecAggMember(Base):
    """A hospital account enrolled in a secagg federation as one hospital of its registry.

    The enrolment is signed with that hospital's identity key (proof of possession), so
    every later reply is authenticated twice: by the account's API token and by the
    registry key of ``hospital_id``.
    """

    __tablename__ = "secagg_members"
    __table_args__ = (
        UniqueConstraint("federation_id", "user_id"),
        UniqueConstraint("federation_id", "hospital_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(
        ForeignKey("federations.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    hospital_id: Mapped[int] = mapped_column(BigInteger)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship()


class SecAggAttempt(Base):
    """One secure-aggregation session of a round (a failed one is followed by another).

    ``stage`` is ``join`` (collecting check-ins), a protocol stage (``advertise`` ...
    ``unmask``: the relay waits for those replies), ``done``, ``failed`` or
    ``abandoned``. ``protocol_round`` is the session's round number in the protocol: it
    increases over the federation's attempts, so a hospital never joins one twice.
    ``config`` is the session's ``RoundConfig`` as JSON (public: it holds the nonce).
    """

    __tablename__ = "secagg_attempts"
    __table_args__ = (UniqueConstraint("federation_id", "protocol_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(
        ForeignKey("federations.id", ondelete="CASCADE"), index=True
    )
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    protocol_round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stage: Mapped[str] = mapped_column(String(16))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stage_deadline_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stage_timeout_s: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    config: Mapped[str | None] = mapped_column(Text, nullable=True)
    threshold: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_invited: Mapped[int | None] = mapped_column(Integer, nullable=True)
    server_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    round: Mapped[Round] = relationship()
    messages: Mapped[list[SecAggMessage]] = relationship(
        back_populates="attempt", order_by="SecAggMessage.id", cascade="all, delete-orphan"
    )


class SecAggMessage(Base):
    """One hospital in one stage of an attempt: its check-in, or a request and its reply.

    ``status``: ``joined`` (stage ``join``), ``asked``, ``answered`` or ``dropped``.
    Requests and replies are opaque protocol messages kept in the blob store while the
    attempt runs (the relay rebuilds its state from them after a restart) and deleted
    when it ends; their digests and sizes stay. ``refusals`` counts replies the protocol
    refused (``error`` holds the last reason).
    """

    __tablename__ = "secagg_messages"
    __table_args__ = (UniqueConstraint("attempt_id", "member_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt_id: Mapped[int] = mapped_column(
        ForeignKey("secagg_attempts.id", ondelete="CASCADE"), index=True
    )
    member_id: Mapped[int] = mapped_column(
        ForeignKey("secagg_members.id", ondelete="CASCADE"), index=True
    )
    stage: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    asked_at: Mapped[datetime] = mapped_column(UTCDateTime())
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reply_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reply_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    replied_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    refusals: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    attempt: Mapped[SecAggAttempt] = relationship(back_populates="messages")
    member: Mapped[SecAggMember] = relationship()


class AuditEvent(Base):
    """One line of the audit log: who did what, when, from where."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    actor: Mapped[str] = mapped_column(String(254))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(254), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    client_ip: Mapped[str] = mapped_column(String(64), default="")
