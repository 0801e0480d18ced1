"""The review's security findings: proxies, lockout, password reset, CSRF, plots, headers, docs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from portal_helpers import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    HOSPITAL_PASSWORD,
    Api,
    FakeClock,
    make_settings,
    plain_update,
)

from fedcrypt.portal.app import create_app
from fedcrypt.portal.plots import MetricPoint, metrics_png
from fedcrypt.portal.proxy import TrustedProxies
from fedcrypt.portal.services import accounts

TOKEN = "/api/v1/auth/token"


def _fail(client: TestClient, email: str, **headers: str) -> int:
    r = client.post(TOKEN, json={"email": email, "password": "wrong-password!"}, headers=headers)
    return r.status_code


def _audit_ips(api: Api, action: str) -> list[str]:
    events = api.client.get(f"/api/v1/audit?action={action}", headers=api.admin).json()
    return [e["client_ip"] for e in events]


# --- X-Forwarded-For --------------------------------------------------------------------


def test_spoofed_x_forwarded_for_is_ignored_without_a_trusted_proxy(api: Api) -> None:
    c = TestClient(api.app, client=("198.51.100.7", 4000))
    for i in range(5):  # a new forged address every time: still one client
        assert _fail(c, ADMIN_EMAIL, **{"X-Forwarded-For": f"10.9.8.{i}"}) == 401
    assert _fail(c, ADMIN_EMAIL, **{"X-Forwarded-For": "10.9.8.99"}) == 429
    assert set(_audit_ips(api, "login.failure")) == {"198.51.100.7"}


def test_x_forwarded_for_from_a_trusted_proxy(tmp_path: Path, clock: FakeClock) -> None:
    app = create_app(make_settings(tmp_path, forwarded_allow_ips=("10.0.0.0/24",)), clock=clock)
    api = Api(app, clock)
    proxy = TestClient(app, client=("10.0.0.5", 4000))
    # the proxy appends the address it saw; a client-supplied left part is not believed
    xff = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9", "X-Forwarded-Proto": "https"}
    assert _fail(proxy, ADMIN_EMAIL, **xff) == 401
    assert _fail(proxy, ADMIN_EMAIL, **{"X-Forwarded-For": "garbage"}) == 401
    direct = TestClient(app, client=("192.0.2.1", 4000))  # not a proxy: header ignored
    assert _fail(direct, ADMIN_EMAIL, **{"X-Forwarded-For": "203.0.113.9"}) == 401
    assert _audit_ips(api, "login.failure") == ["192.0.2.1", "10.0.0.5", "203.0.113.9"]
    app.state.portal.close()


def test_trusted_proxies_walk_right_to_left() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "::1"])
    assert proxies.client("10.1.1.1", "1.1.1.1, 2.2.2.2, 10.2.2.2") == "2.2.2.2"
    assert proxies.client("10.1.1.1", "[2001:db8::1]:443") == "2001:db8::1"
    assert proxies.client("10.1.1.1", "10.3.3.3") == "10.3.3.3"  # only proxies: the first
    assert proxies.client("8.8.8.8", "1.1.1.1") == "8.8.8.8"
    assert proxies.client("::1", "198.51.100.2:5000") == "198.51.100.2"
    assert TrustedProxies([]).client("127.0.0.1", "1.2.3.4") == "127.0.0.1"
    with pytest.raises(ValueError):
        TrustedProxies(["not-an-ip"])


def test_forwarded_allow_ips_must_be_addresses(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an IP address"):
        make_settings(tmp_path, forwarded_allow_ips="127.0.0.1,*")
    assert make_settings(
        tmp_path, forwarded_allow_ips="127.0.0.1, 10.0.0.0/8"
    ).forwarded_allow_ips == (
        "127.0.0.1/32",
        "10.0.0.0/8",
    )


# --- lockout ----------------------------------------------------------------------------


def test_nobody_else_can_lock_the_admin_out(api: Api) -> None:
    attacker = TestClient(api.app, client=("203.0.113.66", 1))
    for _ in range(5):
        assert _fail(attacker, ADMIN_EMAIL) == 401
    assert _fail(attacker, ADMIN_EMAIL) == 429  # the attacker's address is blocked ...
    r = attacker.post(TOKEN, json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert r.status_code == 429  # ... even with the right password
    admin = TestClient(api.app, client=("192.0.2.10", 1))
    r = admin.post(TOKEN, json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert r.status_code == 201  # ... but the admin signs in from elsewhere


def test_password_spraying_from_one_address_is_limited(tmp_path: Path, clock: FakeClock) -> None:
    app = create_app(make_settings(tmp_path, login_max_failures_per_ip=6), clock=clock)
    Api(app, clock)  # creates the admin
    sprayer = TestClient(app, client=("203.0.113.77", 1))
    for i in range(6):
        assert _fail(sprayer, f"victim{i}@example.org") == 401
    assert _fail(sprayer, "victim99@example.org") == 429
    other = TestClient(app, client=("192.0.2.11", 1))
    assert _fail(other, "victim99@example.org") == 401
    app.state.portal.close()


# --- password reset ---------------------------------------------------------------------


def test_password_reset_revokes_api_tokens_and_sessions(api: Api) -> None:
    _, headers = api.hospital()
    assert api.client.get("/api/v1/users/me", headers=headers).status_code == 200
    accounts.set_password(api.portal, email="h1@example.org", password="a-brand-new-password")
    r = api.client.get("/api/v1/users/me", headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    r = api.client.post(TOKEN, json={"email": "h1@example.org", "password": HOSPITAL_PASSWORD})
    assert r.status_code == 401
    assert api.token("h1@example.org", "a-brand-new-password")
    events = api.client.get("/api/v1/audit?action=password.reset", headers=api.admin).json()
    assert "1 API token(s) revoked" in events[0]["detail"]


# --- CSRF -------------------------------------------------------------------------------

_CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def _csrf(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    m = _CSRF.search(page.text)
    assert m is not None
    return m.group(1)


def _signed_in(api: Api, email: str, password: str) -> TestClient:
    browser = TestClient(api.app)
    token = _csrf(browser, "/login")
    r = browser.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return browser


def test_csrf_tokens_are_bound_to_the_session(api: Api) -> None:
    api.hospital()
    attacker = _signed_in(api, "h1@example.org", HOSPITAL_PASSWORD)
    victim = _signed_in(api, ADMIN_EMAIL, ADMIN_PASSWORD)
    stolen = _csrf(attacker, "/account")  # valid, but for the attacker's session
    # ... even planted together with the attacker's nonce cookie, it is refused
    victim.cookies.set("fedcrypt_csrf", attacker.cookies.get("fedcrypt_csrf") or "x")
    r = victim.post("/account/token", data={"csrf_token": stolen})
    assert r.status_code == 403 and "CSRF" in r.text
    anonymous = _csrf(TestClient(api.app), "/login")  # a pre-sign-in token: no good either
    assert victim.post("/account/token", data={"csrf_token": anonymous}).status_code == 403
    own = _csrf(victim, "/account")
    r = victim.post("/account/token", data={"csrf_token": own})
    assert r.status_code == 200 and "fcp_" in r.text
    # a new session (sign in again) makes the old session's tokens worthless
    victim.post("/logout", data={"csrf_token": own}, follow_redirects=False)
    again = _signed_in(api, ADMIN_EMAIL, ADMIN_PASSWORD)
    assert again.post("/account/token", data={"csrf_token": own}).status_code == 403


# --- plots ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [r"$\x$", "$$", r"a $\frac{1}{0$ b", "_hidden", "50$ or 60$"])
def test_plot_labels_are_never_mathtext(name: str) -> None:
    points = [
        MetricPoint(round=1, hospital=name, loss=0.5, accuracy=0.8, auc=0.9, num_examples=5),
        MetricPoint(round=1, hospital="B", loss=0.4, accuracy=0.7, auc=None, num_examples=5),
    ]
    png = metrics_png(points, title=f"{name}: metrics")
    assert png.startswith(b"\x89PNG")


def test_a_hospital_named_like_mathtext_does_not_break_the_page_plot(api: Api) -> None:
    _, a = api.hospital(r"$\x$ Clinic")
    fid = api.federation(quorum=1, num_rounds=1)
    api.upload(fid, 1, plain_update(np.ones(6), 2), a)
    r = api.client.post(
        f"/api/v1/federations/{fid}/rounds/1/metrics",
        json={"loss": 0.3, "accuracy": 0.9, "auc": 0.95, "num_examples": 4},
        headers=a,
    )
    assert r.status_code == 201
    browser = _signed_in(api, ADMIN_EMAIL, ADMIN_PASSWORD)
    png = browser.get(f"/federations/{fid}/metrics.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


# --- headers and docs -------------------------------------------------------------------


def test_token_responses_are_not_cached(api: Api) -> None:
    _, email = api.register()
    api.client.post("/api/v1/hospitals/2/approve", headers=api.admin)
    r = api.client.post(TOKEN, json={"email": email, "password": HOSPITAL_PASSWORD})
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    browser = _signed_in(api, ADMIN_EMAIL, ADMIN_PASSWORD)
    page = browser.post("/account/token", data={"csrf_token": _csrf(browser, "/account")})
    assert page.headers["cache-control"] == "no-store"


def test_docs_work_offline(api: Api) -> None:
    for path, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        page = api.client.get(path)
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assert urls and all(u.startswith("/") for u in urls), urls  # nothing from a CDN
        assert "http://" not in page.text and "https://" not in page.text
        assert f"/docs-assets/{asset}" in page.text
        js = api.client.get(f"/docs-assets/{asset}")
        assert js.status_code == 200 and len(js.content) > 100_000
        assert "script-src 'self'" in page.headers["content-security-policy"]
    assert api.client.get("/openapi.json").json()["info"]["title"]


def test_docs_fallback_without_the_assets(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcrypt.portal import docs

    monkeypatch.setattr(docs, "assets_dir", lambda: None)
    app = create_app(api.portal.settings)
    page = TestClient(app).get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text and "http" not in page.text
    app.state.portal.close()


def test_the_served_portal_ignores_x_forwarded_for_from_localhost(tmp_path: Path) -> None:
    """Through uvicorn as ``fedcrypt portal serve`` runs it (uvicorn alone trusts 127.0.0.1)."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from fedcrypt.cli.portal import server_config

    app = create_app(make_settings(tmp_path))
    accounts.create_admin(app.state.portal, email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        for i in range(6):
            r = httpx.post(
                url + TOKEN,
                json={"email": ADMIN_EMAIL, "password": "wrong-password!"},
                headers={"X-Forwarded-For": f"203.0.113.{i}"},
            )
        assert r.status_code == 429  # one client, however many addresses it claims
        token = httpx.post(
            url + TOKEN, json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        ).status_code
        assert token == 429  # same client (127.0.0.1) and account: still blocked
        with app.state.portal.session() as db:
            from sqlalchemy import select

            from fedcrypt.portal.models import AuditEvent

            ips = set(
                db.scalars(select(AuditEvent.client_ip).where(AuditEvent.action == "login.failure"))
            )
        assert ips == {"127.0.0.1"}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
