"""Helpers of the portal tests: settings, a fake clock, an API driver, protected updates."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI

warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from fedcrypt.portal.config import PortalSettings, default_db_url  # noqa: E402
from fedcrypt.portal.services import accounts  # noqa: E402
from fedcrypt.protection.plain import PlainHospital  # noqa: E402

ADMIN_EMAIL = "admin@example.org"
ADMIN_PASSWORD = "admin-password-1"
HOSPITAL_PASSWORD = "hospital-pass-1"
MODEL_SIZE = 6


@dataclass
class FakeClock:
    """A settable UTC clock."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 1, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def make_settings(tmp_path: Path, *, db_url: str | None = None, **overrides: Any) -> PortalSettings:
    """Settings for a portal in ``tmp_path`` (no background ticker; SQLite by default)."""
    values: dict[str, Any] = {
        "db_url": db_url or default_db_url(tmp_path),
        "data_dir": tmp_path,
        "secret_key": SecretStr("test-secret-" + "x" * 20),
        "tick_interval_s": 0,
    }
    values.update(overrides)
    return PortalSettings(**values)


def sha(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def plain_update(values: list[float] | np.ndarray, num_examples: int) -> bytes:
    """A ``plain`` protected update."""
    return PlainHospital().protect(np.asarray(values, dtype=np.float64), num_examples=num_examples)


class Api:
    """A TestClient plus helpers to set up accounts and federations quickly."""

    def __init__(self, app: FastAPI, clock: FakeClock) -> None:
        self.app = app
        self.clock = clock
        self.client = TestClient(app)
        self.portal = app.state.portal
        accounts.create_admin(self.portal, email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        self.admin_token = self.token(ADMIN_EMAIL, ADMIN_PASSWORD)
        self._n = 0

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.auth(self.admin_token)

    def token(self, email: str, password: str) -> str:
        r = self.client.post("/api/v1/auth/token", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def register(self, name: str | None = None) -> tuple[int, str]:
        self._n += 1
        name = name or f"Hospital {self._n}"
        email = f"h{self._n}@example.org"
        r = self.client.post(
            "/api/v1/hospitals",
            json={"name": name, "email": email, "password": HOSPITAL_PASSWORD},
        )
        assert r.status_code == 201, r.text
        return int(r.json()["id"]), email

    def hospital(self, name: str | None = None) -> tuple[int, dict[str, str]]:
        """Register, approve and log in a hospital; return its id and auth headers."""
        hid, email = self.register(name)
        r = self.client.post(f"/api/v1/hospitals/{hid}/approve", headers=self.admin)
        assert r.status_code == 200, r.text
        return hid, self.auth(self.token(email, HOSPITAL_PASSWORD))

    def federation(
        self,
        *,
        name: str = "fed",
        protection: str = "plain",
        server_key: bytes | None = None,
        model_size: int | None = MODEL_SIZE,
        publish: bool = True,
        **fields: Any,
    ) -> int:
        body: dict[str, Any] = {
            "name": name,
            "model": "mlp",
            "protection": protection,
            "quorum": 2,
            "num_rounds": 2,
            "round_deadline_minutes": 30,
            **fields,
        }
        r = self.client.post("/api/v1/federations", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        fid = int(r.json()["id"])
        if server_key is not None:
            r = self.client.put(
                f"/api/v1/federations/{fid}/server-key", content=server_key, headers=self.admin
            )
            assert r.status_code == 200, r.text
        if publish:
            blob = b"opaque initial state_dict bytes"
            headers = {**self.admin, "X-Content-SHA256": sha(blob)}
            if model_size is not None:
                headers["X-Model-Size"] = str(model_size)
            r = self.client.put(
                f"/api/v1/federations/{fid}/initial-model", content=blob, headers=headers
            )
            assert r.status_code == 200, r.text
        return fid

    def upload(
        self,
        fid: int,
        number: int,
        blob: bytes,
        headers: dict[str, str],
        *,
        checksum: str | None = None,
    ) -> Any:
        h = {**headers, "X-Content-SHA256": checksum or sha(blob)}
        return self.client.put(
            f"/api/v1/federations/{fid}/rounds/{number}/update", content=blob, headers=h
        )

    def round(self, fid: int, number: int, headers: dict[str, str] | None = None) -> dict[str, Any]:
        r = self.client.get(
            f"/api/v1/federations/{fid}/rounds/{number}", headers=headers or self.admin
        )
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out
