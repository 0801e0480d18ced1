"""Server-rendered pages: sign-in, registration, approval, federations, plots, CSRF, cookies."""

from __future__ import annotations

import re

import numpy as np
from fastapi.testclient import TestClient
from portal_helpers import ADMIN_EMAIL, ADMIN_PASSWORD, HOSPITAL_PASSWORD, Api, plain_update

_CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def csrf(client: TestClient, path: str) -> str:
    """Load a page and return its form token (sets the CSRF cookie)."""
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = _CSRF.search(page.text)
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def sign_in(client: TestClient, email: str, password: str) -> object:
    token = csrf(client, "/login")
    return client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token, "next": "/federations"},
        follow_redirects=False,
    )


def browser(api: Api) -> TestClient:
    return TestClient(api.app)


def test_anonymous_pages_and_redirects(api: Api) -> None:
    c = browser(api)
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    for path in ("/federations", "/admin/hospitals", "/audit", "/account", "/federations/1"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    page = c.get("/login")
    assert "Sign in" in page.text
    cookie = page.headers["set-cookie"]
    assert "fedcrypt_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert c.get("/static/portal.css").status_code == 200


def test_forms_need_the_csrf_token(api: Api) -> None:
    c = browser(api)
    csrf(c, "/login")
    r = c.post("/login", data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post(
        "/login", data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": "0" * 64}
    )
    assert r.status_code == 403
    other = browser(api)  # a token from another browser's cookie does not work here
    token = csrf(other, "/login")
    fresh = browser(api)
    fresh.get("/login")
    r = fresh.post(
        "/login", data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": token}
    )
    assert r.status_code == 403
    r = c.post(
        "/register",
        data={
            "name": "Evil",
            "email": "e@x.org",
            "password": "p" * 12,
            "password_confirm": "p" * 12,
        },
    )
    assert r.status_code == 403


def test_register_approve_sign_in_flow(api: Api) -> None:
    visitor = browser(api)
    token = csrf(visitor, "/register")
    form = {
        "name": "Charité Berlin",
        "email": "it@charite.example",
        "password": "hospital-pass-1",
        "password_confirm": "different-pass-1",
        "csrf_token": token,
    }
    r = visitor.post("/register", data=form)
    assert r.status_code == 422 and "passwords differ" in r.text
    assert 'value="Charité Berlin"' in r.text  # the form keeps what was typed
    form["password_confirm"] = form["password"]
    r = visitor.post("/register", data={**form, "password": "short", "password_confirm": "short"})
    assert r.status_code == 422 and "at least 12" in r.text
    r = visitor.post("/register", data=form)
    assert r.status_code == 200 and "awaiting approval" in r.text
    r = sign_in(visitor, "it@charite.example", "hospital-pass-1")
    assert r.status_code == 403 and "awaiting approval" in r.text  # type: ignore[attr-defined]

    admin = browser(api)
    r = sign_in(admin, ADMIN_EMAIL, ADMIN_PASSWORD)
    assert r.status_code == 303  # type: ignore[attr-defined]
    cookie = r.headers["set-cookie"]  # type: ignore[attr-defined]
    assert "fedcrypt_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    queue = admin.get("/admin/hospitals")
    assert "Charité Berlin" in queue.text and 'id="pending"' in queue.text
    hid = re.search(r"/admin/hospitals/(\d+)/approve", queue.text)
    assert hid
    token = _CSRF.search(queue.text).group(1)  # type: ignore[union-attr]
    r = admin.post(
        f"/admin/hospitals/{hid.group(1)}/approve",
        data={"csrf_token": token},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert "No registrations are waiting" in admin.get("/admin/hospitals").text

    r = sign_in(visitor, "it@charite.example", "hospital-pass-1")
    assert r.status_code == 303  # type: ignore[attr-defined]
    assert visitor.get("/admin/hospitals").status_code == 403
    assert visitor.get("/audit").status_code == 403
    # the account page issues an API token, shown once, that works with the API
    token = csrf(visitor, "/account")
    page = visitor.post("/account/token", data={"csrf_token": token})
    assert page.headers["cache-control"] == "no-store"
    value = re.search(r'id="api-token">([^<]+)<', page.text)
    assert value
    me = api.client.get("/api/v1/users/me", headers=api.auth(value.group(1)))
    assert me.status_code == 200 and me.json()["email"] == "it@charite.example"
    assert value.group(1) not in visitor.get("/account").text
    # sign out ends the session
    token = csrf(visitor, "/federations")
    r = visitor.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert visitor.get("/federations", follow_redirects=False).status_code == 303


def test_wrong_password_and_open_redirect(api: Api) -> None:
    c = browser(api)
    r = sign_in(c, ADMIN_EMAIL, "wrong-password!")
    assert r.status_code == 401 and "wrong e-mail address or password" in r.text  # type: ignore[attr-defined]
    token = csrf(c, "/login")
    r = c.post(
        "/login",
        data={
            "email": ADMIN_EMAIL,
            "password": ADMIN_PASSWORD,
            "csrf_token": token,
            "next": "//evil.example/x",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/federations"


def test_federation_pages_and_metrics_plot(api: Api) -> None:
    _, a = api.hospital("St. Mary's")
    _, b = api.hospital("<script>alert(1)</script> Clinic")
    fid = api.federation(
        name="wdbc-demo", quorum=2, num_rounds=2, dataset_description="WDBC tabular"
    )
    for headers, n, vals in ((a, 10, 1.0), (b, 30, 2.0)):
        api.upload(fid, 1, plain_update(np.full(6, vals), n), headers)
    for headers, acc in ((a, 0.9), (b, 0.8)):
        r = api.client.post(
            f"/api/v1/federations/{fid}/rounds/1/metrics",
            json={"loss": 0.3, "accuracy": acc, "auc": 0.95, "num_examples": 50},
            headers=headers,
        )
        assert r.status_code == 201
    c = browser(api)
    sign_in(c, ADMIN_EMAIL, ADMIN_PASSWORD)
    listing = c.get("/federations")
    assert "wdbc-demo" in listing.text and "2 / 2" in listing.text
    page = c.get(f"/federations/{fid}")
    assert page.status_code == 200
    text = page.text
    assert 'id="metrics-plot"' in text and f"/federations/{fid}/metrics.png" in text
    assert "St. Mary&#39;s" in text and "&lt;script&gt;" in text and "<script>" not in text
    assert 'id="rounds"' in text and 'id="participants"' in text
    assert "0.8500" in text  # weighted mean accuracy of round 1
    assert "10 examples" in text and "30 examples" in text
    png = c.get(f"/federations/{fid}/metrics.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert c.get("/federations/999").status_code == 404
    audit = c.get("/audit")
    assert "round.aggregate" in audit.text and "metrics.report" in audit.text
    filtered = c.get("/audit?action=update.upload")
    assert "update.upload" in filtered.text and "hospital.register</code>" not in filtered.text


def test_admin_creates_a_federation_in_the_browser(api: Api) -> None:
    c = browser(api)
    sign_in(c, ADMIN_EMAIL, ADMIN_PASSWORD)
    token = csrf(c, "/federations/new")
    fields = {
        "csrf_token": token,
        "name": "web fed",
        "model": "mlp",
        "dataset_description": "d",
        "protection": "plain",
        "he_preset": "",
        "quorum": "2",
        "round_deadline_minutes": "5",
        "num_rounds": "3",
        "model_size": "6",
    }
    r = c.post(
        "/federations/new",
        data={**fields, "quorum": "0"},
        files={"initial_model": ("m.pt", b"abc")},
    )
    assert r.status_code == 422 and "quorum" in r.text
    r = c.post(
        "/federations/new",
        data=fields,
        files={"initial_model": ("m.pt", b"abc")},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    page = c.get(r.headers["location"])
    assert "web fed" in page.text and "running" in page.text
    fed = api.client.get("/api/v1/federations", headers=api.admin).json()[0]
    assert fed["model_size"] == 6 and fed["current_round"] == 1
    # a hospital cannot create one
    _, _h = api.hospital()
    hosp = browser(api)
    sign_in(hosp, "h1@example.org", HOSPITAL_PASSWORD)
    assert hosp.get("/federations/new").status_code == 403


def test_browser_form_refuses_a_hospital_key(api: Api, ckks_keys: tuple[bytes, bytes]) -> None:
    hospital_key, server_key = ckks_keys
    c = browser(api)
    sign_in(c, ADMIN_EMAIL, ADMIN_PASSWORD)
    token = csrf(c, "/federations/new")
    fields = {
        "csrf_token": token,
        "name": "enc",
        "model": "mlp",
        "protection": "ckks",
        "quorum": "3",
        "round_deadline_minutes": "60",
        "num_rounds": "2",
    }
    r = c.post(
        "/federations/new",
        data=fields,
        files={"initial_model": ("m.pt", b"abc"), "server_key": ("hospital.key", hospital_key)},
    )
    assert r.status_code == 422 and "secret" in r.text
    assert api.client.get("/api/v1/federations", headers=api.admin).json() == []
    r = c.post(
        "/federations/new",
        data=fields,
        files={"initial_model": ("m.pt", b"abc"), "server_key": ("server.key", server_key)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    fed = api.client.get("/api/v1/federations", headers=api.admin).json()[0]
    assert fed["protection"] == "he" and fed["key_fingerprint"]
