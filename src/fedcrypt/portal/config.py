"""The portal's one settings object (secrets have no defaults)."""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

SECRET_ENV = "FEDCRYPT_PORTAL_SECRET_KEY"  # noqa: S105 (a variable name)
SECRET_FILE = "portal-secret"  # noqa: S105 (a file name)


class PortalSettings(BaseModel):
    """Configuration of one portal server.

    Attributes
    ----------
    db_url : str
        SQLAlchemy URL of the database (e.g. ``sqlite:///portal-data/portal.db`` or
        ``postgresql+psycopg://...``).
    data_dir : pathlib.Path
        Folder holding uploaded blobs (``blobs/``) and partial uploads (``tmp/``).
    secret_key : pydantic.SecretStr
        Server secret used to sign CSRF tokens. No default: pass it, set
        ``FEDCRYPT_PORTAL_SECRET_KEY``, or let :func:`load_or_create_secret` keep one in
        ``data_dir``.
    max_upload_mb : int
        Largest accepted upload in MiB (default: 1024).
    session_ttl_hours : float
        Lifetime of a browser session (default: 12).
    token_ttl_days : float
        Lifetime of an API token (default: 90).
    login_max_failures : int
        Failed sign-ins allowed for one account from one client address within
        ``login_window_s`` before that address gets HTTP 429 for that account (default:
        5). The account stays usable from every other address, so nobody can lock the
        admin out.
    login_max_failures_per_ip : int
        Failed sign-ins allowed from one client address over all accounts within the
        window (password spraying) (default: 20).
    login_window_s : float
        The rate-limit window in seconds (default: 300).
    forwarded_allow_ips : tuple of str
        Addresses or networks (CIDR) of the reverse proxies whose ``X-Forwarded-For``
        and ``X-Forwarded-Proto`` headers are believed. Empty (the default): the headers
        are ignored and the client is the TCP peer.
    cookie_secure : bool
        Mark cookies ``Secure`` (HTTPS only). Turn on behind TLS (default: False).
    tick_interval_s : float
        How often the server checks round deadlines; 0 disables the background check
        (deadlines are then checked on every request) (default: 5).
    validate_ciphertexts : bool
        Deserialize every ``he`` upload against the federation's public context before
        accepting it (catches corrupted ciphertexts at upload time) (default: True).
    max_concurrent_validations : int
        Uploads deserialized at the same time (each holds its file in memory) (default: 2).
    aggregate_batch_mb : int
        Aggregation adds updates in batches of at most this many MiB (at least two
        updates a batch), so memory stays bounded with many hospitals (default: 256).
    migrate_on_start : bool
        Upgrade the database schema when the portal starts; when False, a database that
        is not at the current revision is refused (default: True).
    """

    model_config = ConfigDict(frozen=True)

    db_url: str
    data_dir: Path
    secret_key: SecretStr
    max_upload_mb: int = Field(default=1024, ge=1, le=1 << 20)
    session_ttl_hours: float = Field(default=12.0, gt=0)
    token_ttl_days: float = Field(default=90.0, gt=0)
    login_max_failures: int = Field(default=5, ge=1, le=1000)
    login_max_failures_per_ip: int = Field(default=20, ge=1, le=100_000)
    login_window_s: float = Field(default=300.0, gt=0)
    forwarded_allow_ips: tuple[str, ...] = ()
    cookie_secure: bool = False
    tick_interval_s: float = Field(default=5.0, ge=0)
    validate_ciphertexts: bool = True
    max_concurrent_validations: int = Field(default=2, ge=1, le=64)
    aggregate_batch_mb: int = Field(default=256, ge=1, le=1 << 20)
    migrate_on_start: bool = True

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _proxies(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _valid_proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for item in value:
            item = item.strip()
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8); "
                    "name each trusted proxy explicitly"
                ) from None
        return tuple(out)

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return self.max_upload_mb * 1024 * 1024

    @property
    def aggregate_batch_bytes(self) -> int:
        """``aggregate_batch_mb`` in bytes."""
        return self.aggregate_batch_mb * 1024 * 1024


def default_db_url(data_dir: Path) -> str:
    """The default database: a SQLite file ``portal.db`` inside ``data_dir``."""
    return f"sqlite:///{(data_dir / 'portal.db').resolve()}"


def load_or_create_secret(data_dir: Path) -> SecretStr:
    """Return the server secret from the environment or ``data_dir``, creating it once.

    The secret is read from ``FEDCRYPT_PORTAL_SECRET_KEY`` if set; otherwise from the
    file ``data_dir/portal-secret``, which is created with mode 0600 on first use, so a
    restart keeps signed forms valid.
    """
    env = os.environ.get(SECRET_ENV)
    if env:
        return SecretStr(env)
    path = data_dir / SECRET_FILE
    if path.is_file():
        return SecretStr(path.read_text().strip())
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return SecretStr(value)
