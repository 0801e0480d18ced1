"""Append lines to the audit log."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from fedcrypt.portal.models import AuditEvent, User


def record(
    db: Session,
    *,
    at: datetime,
    actor: User | None,
    action: str,
    target: str = "",
    detail: str = "",
    client_ip: str = "",
    actor_label: str | None = None,
) -> AuditEvent:
    """Add an audit event to ``db`` (the caller commits it with its own change).

    Parameters
    ----------
    db : sqlalchemy.orm.Session
        The session whose transaction the event joins.
    at : datetime.datetime
        When it happened (aware UTC).
    actor : User or None
        Who did it (``None`` for an anonymous caller or the server itself).
    action : str
        A dotted verb such as ``"hospital.approve"``.
    target, detail, client_ip : str
        What it was done to, free-text detail, and the caller's address.
    actor_label : str, optional
        Label shown when ``actor`` is ``None`` (default: ``"anonymous"``).
    """
    event = AuditEvent(
        at=at,
        actor_id=actor.id if actor is not None else None,
        actor=actor.email if actor is not None else (actor_label or "anonymous"),
        action=action,
        target=target[:254],
        detail=detail[:2000],
        client_ip=client_ip[:64],
    )
    db.add(event)
    return event
