"""Fixtures of the portal tests: cheap password hashing, an app on a temporary database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from portal_helpers import Api, FakeClock, make_settings

from fedcrypt.portal import security
from fedcrypt.portal.app import create_app


@pytest.fixture(autouse=True)
def fast_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap argon2 parameters: the real ones take ~0.3 s per hash on CI machines."""
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(security, "_hasher", hasher)
    monkeypatch.setattr(security, "_DUMMY_HASH", hasher.hash("dummy-password"))


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock shared by the app."""
    return FakeClock()


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    """A fresh portal with its admin signed in."""
    app = create_app(make_settings(tmp_path), clock=clock)
    helper = Api(app, clock)
    yield helper
    app.state.portal.close()


@pytest.fixture(scope="session")
def ckks_keys() -> tuple[bytes, bytes]:
    """A hospital key file and its server key file (skips if ckks is unavailable)."""
    keys = pytest.importorskip(
        "fedcrypt.protection.he.keys",
        reason="fedcrypt.protection.he.ckks (TenSEAL) is not importable",
    )
    hospital, server = keys.generate_keys("fast")
    return hospital, server
