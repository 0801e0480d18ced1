"""The portal's one settings object (secrets have no defaults)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

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
        Failed sign-ins allowed per e-mail address and per client address within
        ``login_window_s`` before further attempts get HTTP 429 (default: 5).
    login_window_s : float
        The rate-limit window in seconds (default: 300).
    cookie_secure : bool
        Mark cookies ``Secure`` (HTTPS only). Turn on behind TLS (default: False).
    tick_interval_s : float
        How often the server checks round deadlines; 0 disables the background check
        (deadlines are then checked on every request) (default: 5).
    validate_ciphertexts : bool
        Deserialize every ``ckks`` upload against the federation's public context before
        accepting it (catches corrupted ciphertexts at upload time) (default: True).
    """

    model_config = ConfigDict(frozen=True)

    db_url: str
    data_dir: Path
    secret_key: SecretStr
    max_upload_mb: int = Field(default=1024, ge=1, le=1 << 20)
    session_ttl_hours: float = Field(default=12.0, gt=0)
    token_ttl_days: float = Field(default=90.0, gt=0)
    login_max_failures: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=300.0, gt=0)
    cookie_secure: bool = False
    tick_interval_s: float = Field(default=5.0, ge=0)
    validate_ciphertexts: bool = True

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return self.max_upload_mb * 1024 * 1024


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
