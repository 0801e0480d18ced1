"""The running portal's shared state: settings, database, blob store, clock, limiters."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fedcrypt.exceptions import ConfigError
from fedcrypt.portal import migrate
from fedcrypt.portal.config import PortalSettings
from fedcrypt.portal.db import make_engine, make_sessionmaker, utcnow
from fedcrypt.portal.security import LoginRateLimiter
from fedcrypt.portal.storage import BlobStore
from fedcrypt.protection.base import ServerAggregator
from fedcrypt.protection.secagg.keys import Registry


@dataclass
class Portal:
    """Everything a request handler needs besides its database session.

    Build it with :meth:`Portal.open`. ``clock`` is injectable so tests can move time
    past a round deadline.
    """

    settings: PortalSettings
    engine: Engine
    sessionmaker: sessionmaker[Session]
    store: BlobStore
    limiter: LoginRateLimiter
    ip_limiter: LoginRateLimiter
    clock: Callable[[], datetime] = utcnow
    aggregators: dict[str, ServerAggregator] = field(default_factory=dict)
    #: secagg: parsed registries by blob hash, and running sessions' protocol servers
    #: by attempt id (rebuilt from the database when missing, e.g. after a restart).
    registries: dict[str, Registry] = field(default_factory=dict)
    relays: dict[int, Any] = field(default_factory=dict)
    aggregation_lock: threading.Lock = field(default_factory=threading.Lock)
    blob_lock: threading.Lock = field(default_factory=threading.Lock)
    validation_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(2)
    )

    @classmethod
    def open(
        cls,
        settings: PortalSettings,
        *,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> Portal:
        """Connect to the database (upgrading its schema) and the data directory.

        With ``settings.migrate_on_start`` the schema is brought to the current revision
        (:func:`fedcrypt.portal.migrate.upgrade`); otherwise a database behind it is
        refused.

        Parameters
        ----------
        settings : PortalSettings
            The server configuration.
        clock : callable, optional
            Returns the current aware UTC time (default: the system clock).
        monotonic : callable, optional
            Seconds clock for the sign-in rate limiter (default: :func:`time.monotonic`).

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            If the database driver is missing, the database cannot be reached, or its
            schema is not current (and ``migrate_on_start`` is off).
        """
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.db_url)
        try:
            if settings.migrate_on_start:
                migrate.upgrade(engine)
            else:
                migrate.check_current(engine)
        except OperationalError as exc:
            engine.dispose()
            raise ConfigError(f"cannot open the portal database: {exc.orig}") from None
        except BaseException:
            engine.dispose()
            raise
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=make_sessionmaker(engine),
            store=BlobStore(settings.data_dir),
            limiter=LoginRateLimiter(
                settings.login_max_failures, settings.login_window_s, clock=monotonic
            ),
            ip_limiter=LoginRateLimiter(
                settings.login_max_failures_per_ip, settings.login_window_s, clock=monotonic
            ),
            clock=clock or utcnow,
            validation_slots=threading.BoundedSemaphore(settings.max_concurrent_validations),
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A database session that is closed (not committed) on exit."""
        db = self.sessionmaker()
        try:
            yield db
        finally:
            db.close()

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
