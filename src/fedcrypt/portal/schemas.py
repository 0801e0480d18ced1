"""Request and response bodies of the JSON API (separate create/update/public classes)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from fedcrypt.config import DEPRECATED_PROTECTIONS

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


def _mode(value: object) -> object:
    """Map a deprecated protection name (``ckks``) to its mode (``he``)."""
    if isinstance(value, str):
        value = value.strip().lower()
        return DEPRECATED_PROTECTIONS.get(value, value)
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

#: The built-in model architectures (``fedcrypt.tasks.models``).
BUILTIN_MODELS: tuple[str, ...] = ("mlp", "cnn", "mobilenetv2", "resnet18")
#: Settings the admin may let each hospital set on its own machine.
OVERRIDABLE: tuple[str, ...] = ("local_epochs", "lr", "batch_size", "image_size")
#: Largest id or round number accepted in a path or body (PostgreSQL ``integer``).
MAX_ID = (1 << 31) - 1
#: Largest model size ``P`` (number of values) a federation may declare.
MAX_MODEL_VALUES = 1 << 31

_MODULE_REF = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)
_FILE_REF = re.compile(r"^[A-Za-z0-9_./-]+\.py:[A-Za-z_][A-Za-z0-9_]*$")
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def is_task_reference(value: str) -> bool:
    """Whether ``value`` looks like ``package.module:NAME`` or ``FILE.py:NAME``."""
    return bool(_MODULE_REF.match(value) or _FILE_REF.match(value)) and ".." not in value


def _model(value: str) -> str:
    value = value.strip()
    if value.lower() in BUILTIN_MODELS:
        return value.lower()
    if len(value) <= 512 and is_task_reference(value):
        return value
    raise ValueError(
        f"unknown model {value!r}: use a built-in model ({', '.join(BUILTIN_MODELS)}) or a "
        "task reference (package.module:NAME or FILE.py:NAME)"
    )


def _task(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > 512 or not is_task_reference(value):
        raise ValueError("a task reference looks like package.module:NAME or FILE.py:NAME")
    return value


def _dataset(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > 256 or not _DATASET.match(value):
        raise ValueError(
            "a dataset is named, not a path (e.g. wdbc, breastmnist or chestmnist_64.npz): "
            "each hospital points at its own copy with --data-dir"
        )
    return value


def _protection_name(value: object) -> object:
    """Resolve a protection name through the registry (``ckks`` means ``he``)."""
    import warnings

    from fedcrypt.protection.registry import get_scheme

    if not isinstance(value, str):
        return value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scheme = get_scheme(value)
    except ValueError as exc:  # ConfigError is a ValueError
        raise ValueError(str(exc)) from None
    return scheme.name


def _preset(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    from fedcrypt.protection.he.params import get_preset

    try:
        return get_preset(value.strip()).name
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _overrides(value: object) -> object:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", ",").split(",") if v]
    if isinstance(value, list | tuple):
        out: list[str] = []
        for v in value:
            name = str(v).strip().replace("-", "_")
            if name not in OVERRIDABLE:
                raise ValueError(
                    f"{v!r} cannot be overridden locally; choose from {', '.join(OVERRIDABLE)}"
                )
            if name not in out:
                out.append(name)
        return [n for n in OVERRIDABLE if n in out]
    return value


ModelName = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_model)]
TaskRef = Annotated[str | None, Field(max_length=512), AfterValidator(_task)]
DatasetName = Annotated[str | None, Field(max_length=256), AfterValidator(_dataset)]
PresetName = Annotated[str | None, Field(max_length=200), AfterValidator(_preset)]
Overrides = Annotated[list[str], BeforeValidator(_overrides)]
LocalEpochs = Annotated[int, Field(ge=1, le=1000)]
LearningRate = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
BatchSize = Annotated[int, Field(ge=1, le=65536)]
ImageSize = Annotated[int, Field(ge=8, le=2048)]
Quorum = Annotated[int, Field(ge=1, le=10_000)]
Rounds = Annotated[int, Field(ge=1, le=10_000)]
DeadlineMinutes = Annotated[float, Field(gt=0, le=60 * 24 * 30, allow_inf_nan=False)]
ModelSize = Annotated[int, Field(ge=1, le=MAX_MODEL_VALUES)]


class FederationCreate(BaseModel):
    """What the admin decides when creating a federation.

    The training settings are the federation's: ``participate`` takes them from here,
    and a hospital may set differently only those listed in ``local_overrides``.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=2, max_length=80, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    model: ModelName = "mlp"
    task: TaskRef = None
    dataset: DatasetName = None
    local_epochs: LocalEpochs = 1
    lr: LearningRate | None = None
    batch_size: BatchSize = 32
    image_size: ImageSize | None = None
    local_overrides: Overrides = Field(default_factory=list)
    dataset_description: str = Field(default="", max_length=4000)
    protection: str = "he"
    he_preset: PresetName = None
    quorum: Quorum = 2
    round_deadline_minutes: DeadlineMinutes = 60.0
    num_rounds: Rounds = 10
    model_size: ModelSize | None = None

    @field_validator("protection", mode="before")
    @classmethod
    def _protection(cls, v: object) -> object:
        return _protection_name(v)

    @model_validator(mode="after")
    def _consistent(self) -> FederationCreate:
        if self.task is not None and self.dataset is not None:
            raise ValueError("give a task (which brings its own data) or a dataset, not both")
        from fedcrypt.protection.registry import get_scheme

        scheme = get_scheme(self.protection)
        if not scheme.key_pair and self.he_preset is not None:
            raise ValueError("an HE preset applies to protection 'he' only")
        if scheme.staged and self.quorum < 2:
            raise ValueError("a secagg round needs at least 2 hospitals: quorum must be >= 2")
        return self


class FederationUpdate(BaseModel):
    """Corrections the admin may make (absent fields are left alone; ``null`` clears).

    The description, quorum, deadline and number of rounds can change at any time;
    the training settings until round 1 has an upload; the model, task, dataset, image
    size, protection, preset and model size only then too, and changing them on a
    running federation returns it to ``draft`` (the initial model must be published
    again).
    """

    model_config = ConfigDict(extra="forbid")

    dataset_description: str | None = Field(default=None, max_length=4000)
    quorum: Quorum | None = None
    round_deadline_minutes: DeadlineMinutes | None = None
    num_rounds: Rounds | None = None
    model: ModelName | None = None
    task: TaskRef = None
    dataset: DatasetName = None
    local_epochs: LocalEpochs | None = None
    lr: LearningRate | None = None
    batch_size: BatchSize | None = None
    image_size: ImageSize | None = None
    local_overrides: Overrides | None = None
    protection: str | None = None
    he_preset: PresetName = None
    model_size: ModelSize | None = None

    @field_validator("protection", mode="before")
    @classmethod
    def _protection(cls, v: object) -> object:
        return _protection_name(v)


class FederationCancel(BaseModel):
    """Why the admin cancels a federation (shown on its page)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000)


class FederationPublic(BaseModel):
    """A federation as the API shows it: everything a hospital needs to take part.

    ``participate`` reads ``task`` or ``dataset``, ``model``, ``local_epochs``, ``lr``,
    ``batch_size``, ``image_size``, ``protection`` and ``he_preset`` from here; a
    hospital may set only the settings named in ``local_overrides`` differently.
    """

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    model: str
    task: str | None = None
    dataset: str | None = None
    local_epochs: int = 1
    lr: float | None = None
    batch_size: int = 32
    image_size: int | None = None
    local_overrides: list[str] = Field(default_factory=list)
    dataset_description: str
    protection: str
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
    secagg_params: dict[str, Any] | None = None
    current_round: int | None = None
    created_at: datetime
    cancelled_at: datetime | None = None
    cancel_reason: str | None = None
    join_command: str | None = None

    @field_validator("protection", mode="before")
    @classmethod
    def _protection(cls, v: object) -> object:
        return _mode(v)

    @field_validator("local_overrides", mode="before")
    @classmethod
    def _stored_overrides(cls, v: object) -> object:
        if isinstance(v, str):
            return [x for x in v.split(",") if x]
        return v

    @field_validator("secagg_params", mode="before")
    @classmethod
    def _stored_params(cls, v: object) -> object:
        if isinstance(v, str):
            return json.loads(v)
        return v


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
    excluded: bool = False
    excluded_reason: str | None = None


class UploadExclude(BaseModel):
    """Why the admin leaves an update out of its round's aggregate."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)


class RoundPublic(BaseModel):
    """A round's state.

    Under ``secagg``: ``num_uploads`` counts the masked updates of the current session
    (``num_updates`` once aggregated), ``expected_uploads`` the hospitals it invited
    (enrolled hospitals while it collects check-ins, ``num_joined`` of them so far);
    ``stage`` is ``join``, a protocol stage (``advertise`` ... ``unmask``), ``done`` or
    ``failed``, with ``stage_deadline_at``; ``protocol_round`` is the session's round
    number in the protocol (it increases over sessions). ``total_examples`` stays
    ``None``: the example counts are masked with the updates.
    """

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
    failed_at: datetime | None = None
    failed_upload_id: int | None = None
    num_excluded: int = 0
    uploaded_by_me: bool = False
    num_updates: int | None = None
    stage: str | None = None
    stage_deadline_at: datetime | None = None
    protocol_round: int | None = None
    num_joined: int | None = None


class MetricsCreate(BaseModel):
    """Metrics a hospital measured on its own data with a round's decrypted global model."""

    model_config = ConfigDict(extra="forbid")

    loss: float = Field(ge=0, allow_inf_nan=False)
    accuracy: float = Field(ge=0, le=1, allow_inf_nan=False)
    auc: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    num_examples: int = Field(ge=1, le=1 << 31)


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


# --- secagg relay ---------------------------------------------------------------------


class SecAggEnrol(BaseModel):
    """A hospital's enrolment: its registry id and its signature (proof of possession)."""

    model_config = ConfigDict(extra="forbid")

    hospital_id: int = Field(ge=0, le=MAX_ID)
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class SecAggMemberPublic(BaseModel):
    """A hospital account enrolled as one hospital of the federation's registry."""

    hospital_id: int
    user_id: int
    hospital: str
    enrolled_at: datetime


class SecAggTurn(BaseModel):
    """What one hospital should do now in a round of a secagg federation.

    ``action``: ``enrol`` (first enrol in the federation), ``join`` (check in for the
    round's session), ``answer`` (a request of ``stage`` awaits this hospital's reply:
    download it, answer it), ``wait`` (for the other hospitals), ``follow`` (this
    hospital is not in the running session: it dropped out or joined too late; it
    follows the global model from the round's aggregate), ``aggregated`` (download the
    aggregate) or ``closed`` (the round or federation was cancelled).
    """

    round: int
    round_status: str
    action: str
    stage: str | None = None
    attempt: int | None = None
    protocol_round: int | None = None
    stage_deadline_at: datetime | None = None
    request_sha256: str | None = None
    request_size: int | None = None
    detail: str = ""


class SecAggReplyPublic(BaseModel):
    """An accepted stage reply."""

    round: int
    stage: str
    hospital_id: int
    size: int
    sha256: str
    stage_closed: bool


class SecAggStageProgress(BaseModel):
    """One stage of a session: hospitals asked, answered, dropped out."""

    stage: str
    asked: int
    answered: int
    dropped: int
    opened_at: datetime


class SecAggHospitalProgress(BaseModel):
    """One hospital in a session: how far it got, where it dropped out, bytes relayed."""

    hospital_id: int
    user_id: int
    hospital: str
    status: str
    stage: str | None = None
    reason: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0


class SecAggAttemptPublic(BaseModel):
    """One secure-aggregation session of a round, with its stage progress.

    ``hospitals[*].status``: ``joined`` (waiting for the session to start), ``asked``
    (its reply to ``stage`` is awaited), ``answered`` (it answered ``stage``, the latest
    stage it was asked), ``contributed`` (its update is in the aggregate), ``dropped``
    (at ``stage``, with the ``reason``: no answer by the deadline, or the last reply the
    protocol refused).
    """

    attempt: int
    protocol_round: int | None
    stage: str
    threshold: int | None
    invited: int | None
    opened_at: datetime
    started_at: datetime | None
    closed_at: datetime | None
    stage_deadline_at: datetime
    server_seconds: float
    error: str | None
    stages: list[SecAggStageProgress]
    hospitals: list[SecAggHospitalProgress]
