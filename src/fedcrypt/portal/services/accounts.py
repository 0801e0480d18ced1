"""Accounts: the first admin, hospital registration and approval, sign-in, tokens, sessions."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedcrypt.portal.context import Portal
from fedcrypt.portal.errors import (
    ConflictError,
    ForbiddenError,
    NotAuthenticatedError,
    NotFoundError,
    RateLimitedError,
)
from fedcrypt.portal.models import (
    ROLE_ADMIN,
    ROLE_HOSPITAL,
    STATUS_APPROVED,
    STATUS_PENDING,
    STATUS_REJECTED,
    STATUS_SUSPENDED,
    ApiToken,
    User,
    WebSession,
)
from fedcrypt.portal.schemas import PASSWORD_MIN, HospitalCreate
from fedcrypt.portal.security import (
    BearerSecret,
    hash_password,
    needs_rehash,
    new_bearer_secret,
    secret_matches,
    split_bearer,
    verify_password,
)
from fedcrypt.portal.services.audit import record

SESSION_PREFIX = "fcs"

_STATUS_MESSAGES = {
    STATUS_PENDING: "this account is awaiting approval by the consortium admin",
    STATUS_REJECTED: "this account's registration was rejected",
    STATUS_SUSPENDED: "this account has been suspended by the consortium admin",
}


def admin_exists(db: Session) -> bool:
    """Whether a consortium admin account exists."""
    return db.scalar(select(User.id).where(User.role == ROLE_ADMIN).limit(1)) is not None


def create_admin(
    portal: Portal, *, email: str, password: str, name: str = "Consortium admin"
) -> User:
    """Create the consortium admin (first run only).

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If an admin already exists.
    ValueError
        If the password is shorter than 12 characters.
    """
    if len(password) < PASSWORD_MIN:
        raise ValueError(f"the admin password must have at least {PASSWORD_MIN} characters")
    with portal.session() as db:
        if admin_exists(db):
            raise ConflictError("an admin account already exists")
        now = portal.clock()
        user = User(
            email=email.strip().lower(),
            name=name,
            role=ROLE_ADMIN,
            status=STATUS_APPROVED,
            password_hash=hash_password(password),
            created_at=now,
            decided_at=now,
        )
        db.add(user)
        db.flush()
        record(db, at=now, actor=user, action="admin.create", target=user.email)
        db.commit()
        return user


def register_hospital(portal: Portal, db: Session, data: HospitalCreate, *, client_ip: str) -> User:
    """Create a pending hospital account.

    Raises
    ------
    fedcrypt.portal.errors.ConflictError
        If the e-mail address is already registered.
    """
    if db.scalar(select(User.id).where(User.email == data.email)) is not None:
        raise ConflictError("an account with this e-mail address already exists")
    now = portal.clock()
    user = User(
        email=data.email,
        name=data.name,
        role=ROLE_HOSPITAL,
        status=STATUS_PENDING,
        password_hash=hash_password(data.password.get_secret_value()),
        created_at=now,
    )
    db.add(user)
    try:
        db.flush()
    except IntegrityError as exc:
        db.rollback()
        raise ConflictError("an account with this e-mail address already exists") from exc
    record(
        db,
        at=now,
        actor=user,
        action="hospital.register",
        target=user.email,
        detail=user.name,
        client_ip=client_ip,
    )
    db.commit()
    return user


def authenticate(portal: Portal, db: Session, *, email: str, password: str, client_ip: str) -> User:
    """Check e-mail and password, with rate limiting; return the active account.

    Failures are counted per account *and* client address (``login_max_failures``) and
    per client address over all accounts (``login_max_failures_per_ip``). A flood of
    wrong passwords from one address therefore blocks that address only: the account
    (the admin's too) stays usable from everywhere else.

    Raises
    ------
    fedcrypt.portal.errors.RateLimitedError
        After too many failures for this account from this address, or from this
        address.
    fedcrypt.portal.errors.NotAuthenticatedError
        If the e-mail or password is wrong (one message for both).
    fedcrypt.portal.errors.ForbiddenError
        If the account is pending, rejected or suspended.
    """
    email = email.strip().lower()
    account_key = f"account:{email}|ip:{client_ip}"
    ip_key = f"ip:{client_ip}"
    wait = max(portal.limiter.retry_after(account_key), portal.ip_limiter.retry_after(ip_key))
    if wait > 0:
        raise RateLimitedError(
            f"too many failed sign-in attempts; try again in {int(wait) + 1} s", wait
        )
    user = db.scalar(select(User).where(User.email == email))
    ok = verify_password(user.password_hash if user else None, password)
    now = portal.clock()
    if user is None or not ok:
        portal.limiter.failure(account_key)
        portal.ip_limiter.failure(ip_key)
        record(
            db,
            at=now,
            actor=user,
            action="login.failure",
            target=email,
            client_ip=client_ip,
        )
        db.commit()
        raise NotAuthenticatedError("wrong e-mail address or password")
    portal.limiter.reset(account_key)
    if user.status != STATUS_APPROVED:
        raise ForbiddenError(_STATUS_MESSAGES.get(user.status, "this account is not active"))
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def issue_api_token(
    portal: Portal, db: Session, user: User, *, client_ip: str
) -> tuple[str, ApiToken]:
    """Issue a new API token for ``user``, revoking the previous ones.

    Returns
    -------
    (str, ApiToken)
        The token value (shown once, never stored) and its database row.
    """
    now = portal.clock()
    db.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    secret: BearerSecret = new_bearer_secret()
    row = ApiToken(
        user_id=user.id,
        key_id=secret.key_id,
        secret_hash=secret.secret_hash,
        created_at=now,
        expires_at=now + timedelta(days=portal.settings.token_ttl_days),
    )
    db.add(row)
    record(
        db,
        at=now,
        actor=user,
        action="token.issue",
        target=user.email,
        detail=f"token {secret.key_id}",
        client_ip=client_ip,
    )
    db.commit()
    return secret.value, row


def user_for_token(portal: Portal, db: Session, value: str) -> User:
    """Resolve an API token to its (active) account.

    Raises
    ------
    fedcrypt.portal.errors.NotAuthenticatedError
        If the token is malformed, unknown, revoked or expired.
    fedcrypt.portal.errors.ForbiddenError
        If the account is no longer approved.
    """
    parts = split_bearer(value)
    if parts is None:
        raise NotAuthenticatedError("invalid API token")
    key_id, secret = parts
    row = db.scalar(select(ApiToken).where(ApiToken.key_id == key_id))
    if row is None or not secret_matches(secret, row.secret_hash):
        raise NotAuthenticatedError("invalid API token")
    if row.revoked_at is not None:
        raise NotAuthenticatedError("this API token has been revoked")
    if row.expires_at <= portal.clock():
        raise NotAuthenticatedError("this API token has expired")
    user = row.user
    if user.status != STATUS_APPROVED:
        raise ForbiddenError(_STATUS_MESSAGES.get(user.status, "this account is not active"))
    return user


def create_web_session(portal: Portal, db: Session, user: User, *, client_ip: str) -> str:
    """Start a browser session; return the cookie value."""
    now = portal.clock()
    secret = new_bearer_secret(SESSION_PREFIX)
    db.add(
        WebSession(
            user_id=user.id,
            key_id=secret.key_id,
            secret_hash=secret.secret_hash,
            created_at=now,
            expires_at=now + timedelta(hours=portal.settings.session_ttl_hours),
        )
    )
    record(db, at=now, actor=user, action="login.success", target=user.email, client_ip=client_ip)
    db.commit()
    return secret.value


def _session_row(db: Session, value: str) -> WebSession | None:
    parts = split_bearer(value, SESSION_PREFIX)
    if parts is None:
        return None
    key_id, secret = parts
    row = db.scalar(select(WebSession).where(WebSession.key_id == key_id))
    if row is None or not secret_matches(secret, row.secret_hash):
        return None
    return row


def active_session(portal: Portal, db: Session, value: str | None) -> WebSession | None:
    """The unexpired session of an active account behind a cookie, or ``None``."""
    if not value:
        return None
    row = _session_row(db, value)
    if row is None or row.expires_at <= portal.clock():
        return None
    if row.user.status != STATUS_APPROVED:
        return None
    return row


def user_for_session(portal: Portal, db: Session, value: str | None) -> User | None:
    """The active account behind a session cookie, or ``None``."""
    row = active_session(portal, db, value)
    return row.user if row is not None else None


def end_web_session(db: Session, value: str | None) -> None:
    """Delete the session behind a cookie (sign-out)."""
    if not value:
        return
    row = _session_row(db, value)
    if row is not None:
        db.delete(row)
        db.commit()


def get_hospital(db: Session, hospital_id: int) -> User:
    """Load a hospital account.

    Raises
    ------
    fedcrypt.portal.errors.NotFoundError
        If no hospital has this id.
    """
    user = db.get(User, hospital_id)
    if user is None or user.role != ROLE_HOSPITAL:
        raise NotFoundError(f"no hospital with id {hospital_id}")
    return user


def set_hospital_status(
    portal: Portal,
    db: Session,
    *,
    hospital_id: int,
    status: str,
    actor: User,
    client_ip: str,
) -> User:
    """Approve, reject or suspend a hospital; rejecting or suspending revokes its tokens.

    Raises
    ------
    fedcrypt.portal.errors.NotFoundError
        If no hospital has this id.
    ValueError
        If ``status`` is not one of approved/rejected/suspended.
    """
    if status not in (STATUS_APPROVED, STATUS_REJECTED, STATUS_SUSPENDED):
        raise ValueError(f"status must be approved, rejected or suspended, got {status!r}")
    user = get_hospital(db, hospital_id)
    now = portal.clock()
    previous = user.status
    user.status = status
    user.decided_at = now
    if status != STATUS_APPROVED:
        db.execute(
            update(ApiToken)
            .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        db.execute(delete(WebSession).where(WebSession.user_id == user.id))
    verb = {STATUS_APPROVED: "approve", STATUS_REJECTED: "reject", STATUS_SUSPENDED: "suspend"}
    record(
        db,
        at=now,
        actor=actor,
        action=f"hospital.{verb[status]}",
        target=user.email,
        detail=f"{previous} -> {status}",
        client_ip=client_ip,
    )
    db.commit()
    return user


def list_hospitals(db: Session, *, status: str | None = None) -> list[User]:
    """Hospital accounts, oldest first, optionally filtered by status."""
    q = select(User).where(User.role == ROLE_HOSPITAL)
    if status is not None:
        q = q.where(User.status == status)
    return list(db.scalars(q.order_by(User.id)))


def set_password(portal: Portal, *, email: str, password: str) -> User:
    """Replace an account's password from the server console, ending its sessions and
    revoking its API tokens (whoever knew the old password may have made one).

    Raises
    ------
    fedcrypt.portal.errors.NotFoundError
        If no account has this e-mail.
    ValueError
        If the password is shorter than 12 characters.
    """
    if len(password) < PASSWORD_MIN:
        raise ValueError(f"the password must have at least {PASSWORD_MIN} characters")
    with portal.session() as db:
        user = db.scalar(select(User).where(User.email == email.strip().lower()))
        if user is None:
            raise NotFoundError(f"no account with e-mail {email!r}")
        now = portal.clock()
        user.password_hash = hash_password(password)
        db.execute(delete(WebSession).where(WebSession.user_id == user.id))
        revoked = db.execute(
            update(ApiToken)
            .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=now)
        ).rowcount  # type: ignore[attr-defined]
        record(
            db,
            at=now,
            actor=None,
            actor_label="server console",
            action="password.reset",
            target=user.email,
            detail=f"sessions ended, {revoked} API token(s) revoked",
        )
        db.commit()
        return user
