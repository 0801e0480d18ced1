"""The running portal's shared state: settings, database, blob store, clock, limiter."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fedcrypt.portal.config import PortalSettings
from fedcrypt.portal.db import init_db, make_engine, make_sessionmaker, utcnow
from fedcrypt.portal.security import LoginRateLimiter
from fedcrypt.portal.storage import BlobStore
from fedcrypt.protection.base import ServerAggregator


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
    clock: Callable[[], datetime] = utcnow
    aggregators: dict[str, ServerAggregator] = field(default_factory=dict)
    aggregation_lock: threading.Lock = field(default_factory=threading.Lock)
    blob_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(
        cls,
        settings: PortalSettings,
        *,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> Portal:
        """Connect to the database (creating tables) and the data directory.

        Parameters
        ----------
        settings : PortalSettings
            The server configuration.
        clock : callable, optional
            Returns the current aware UTC time (default: the system clock).
        monotonic : callable, optional
            Seconds clock for the sign-in rate limiter (default: :func:`time.monotonic`).
        """
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.db_url)
        init_db(engine)
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=make_sessionmaker(engine),
            store=BlobStore(settings.data_dir),
            limiter=LoginRateLimiter(
                settings.login_max_failures, settings.login_window_s, clock=monotonic
            ),
            clock=clock or utcnow,
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
