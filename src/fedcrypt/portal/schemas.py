"""Request and response bodies of the JSON API (separate create/update/public classes)."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

_EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")

PASSWORD_MIN = 12


def _email(value: str) -> str:
    value = value.strip().lower()
    if len(value) > 254 or not _EMAIL_RE.match(value):
        raise ValueError("not a valid e-mail address")
    return value


def _name(value: str) -> str:
    value = " ".join(value.split())
    if not 2 <= len(value) <= 120:
        raise ValueError("must be 2 to 120 characters")
    if any(ord(c) < 32 for c in value):
        raise ValueError("must not contain control characters")
    return value


Email = Annotated[str, AfterValidator(_email)]
DisplayName = Annotated[str, AfterValidator(_name)]
Password = Annotated[SecretStr, Field(min_length=PASSWORD_MIN, max_length=256)]
Protection = Literal["plain", "he"]
#: Deprecated protection names accepted in requests and stored rows.
PROTECTION_ALIASES = {"ckks": "he"}


def _mode(value: object) -> object:
    """Map a deprecated protection name (``ckks``) to its mode (``he``)."""
    if isinstance(value, str):
        value = value.strip().lower()
        return PROTECTION_ALIASES.get(value, value)
    return value


class Message(BaseModel):
    """A plain message."""

    detail: str


# --- accounts -------------------------------------------------------------------------


class HospitalCreate(BaseModel):
    """A hospital's registration (it stays pending until the admin approves it)."""

    model_config = ConfigDict(extra="forbid")

    name: DisplayName
    email: Email
    password: Password


class UserPublic(BaseModel):
    """An account as the API shows it (never the password hash)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    email: str
    role: str
    status: str
    created_at: datetime
    decided_at: datetime | None = None


class TokenRequest(BaseModel):
    """Credentials exchanged for a new API token."""

    model_config = ConfigDict(extra="forbid")

    email: Email
    password: SecretStr = Field(max_length=256)


class TokenPublic(BaseModel):
    """A newly issued API token: shown once, stored only as a hash."""

    token: str
    expires_at: datetime
    user: UserPublic


# --- federations ----------------------------------------------------------------------


class FederationCreate(BaseModel):
    """What the admin decides when creating a federation."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=2, max_length=80, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    model: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    dataset_description: str = Field(default="", max_length=4000)
    protection: Protection = "he"
    he_preset: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    quorum: int = Field(default=2, ge=1, le=10_000)
    round_deadline_minutes: float = Field(default=60.0, gt=0, le=60 * 24 * 30)
    num_rounds: int = Field(default=10, ge=1, le=10_000)
    model_size: int | None = Field(default=None, ge=1)

    @field_validator("protection", mode="before")
    @classmethod
    def _protection(cls, v: object) -> object:
        return _mode(v)

    @field_validator("round_deadline_minutes")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class FederationUpdate(BaseModel):
    """Settings the admin may change after creation."""

    model_config = ConfigDict(extra="forbid")

    dataset_description: str | None = Field(default=None, max_length=4000)
    quorum: int | None = Field(default=None, ge=1, le=10_000)
    round_deadline_minutes: float | None = Field(default=None, gt=0, le=60 * 24 * 30)
    num_rounds: int | None = Field(default=None, ge=1, le=10_000)


class FederationPublic(BaseModel):
    """A federation as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    model: str
    dataset_description: str
    protection: str

    @field_validator("protection", mode="before")
    @classmethod
    def _protection(cls, v: object) -> object:
        return _mode(v)

    he_preset: str | None
    quorum: int
    round_deadline_minutes: float
    num_rounds: int
    model_size: int | None
    status: str
    initial_model_sha256: str | None
    initial_model_size: int | None
    server_key_sha256: str | None
    key_fingerprint: str | None
    current_round: int | None = None
    created_at: datetime


# --- rounds ---------------------------------------------------------------------------


class UploadPublic(BaseModel):
    """One hospital's stored update for a round (metadata only)."""

    id: int
    round: int
    hospital_id: int
    hospital: str
    sha256: str
    size: int
    num_examples: int
    version: int
    uploaded_at: datetime


class RoundPublic(BaseModel):
    """A round's state."""

    number: int
    status: str
    opened_at: datetime
    deadline_at: datetime
    aggregated_at: datetime | None
    quorum: int
    num_uploads: int
    expected_uploads: int
    total_examples: int | None
    aggregate_sha256: str | None
    aggregate_size: int | None
    aggregation_seconds: float | None
    error: str | None
    uploaded_by_me: bool = False


class MetricsCreate(BaseModel):
    """Metrics a hospital measured on its own data with a round's decrypted global model."""

    model_config = ConfigDict(extra="forbid")

    loss: float = Field(ge=0, allow_inf_nan=False)
    accuracy: float = Field(ge=0, le=1, allow_inf_nan=False)
    auc: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    num_examples: int = Field(ge=1)


class MetricsPublic(BaseModel):
    """A stored metrics report."""

    round: int
    hospital_id: int
    hospital: str
    loss: float
    accuracy: float
    auc: float | None
    num_examples: int
    reported_at: datetime


class AuditEventPublic(BaseModel):
    """One audit log line."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str
    client_ip: str
