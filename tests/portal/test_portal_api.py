"""JSON API tests: every route, the upload rejections, access control, restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from portal_helpers import (
    ADMIN_EMAIL,
    HOSPITAL_PASSWORD,
    MODEL_SIZE,
    Api,
    FakeClock,
    make_settings,
    plain_update,
    sha,
)
from sqlalchemy import select, update

from fedcrypt.portal.app import create_app
from fedcrypt.portal.models import Round, Upload
from fedcrypt.protection.plain import PlainHospital

# --- accounts -------------------------------------------------------------------------


def test_openapi_and_docs(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    assert "/api/v1/federations/{federation_id}/rounds/{number}/update" in spec["paths"]
    assert api.client.get("/docs").status_code == 200


def test_register_validation_and_duplicates(api: Api) -> None:
    c = api.client
    bad = c.post("/api/v1/hospitals", json={"name": "H", "email": "x@y.org", "password": "short"})
    assert bad.status_code == 422
    bad = c.post(
        "/api/v1/hospitals", json={"name": "Hosp", "email": "not-an-email", "password": "x" * 12}
    )
    assert bad.status_code == 422
    extra = c.post(
        "/api/v1/hospitals",
        json={"name": "Hosp", "email": "a@b.org", "password": "x" * 12, "role": "admin"},
    )
    assert extra.status_code == 422  # no mass assignment of the role
    _, email = api.register()
    dup = c.post(
        "/api/v1/hospitals", json={"name": "Other", "email": email.upper(), "password": "y" * 12}
    )
    assert dup.status_code == 409


def test_pending_rejected_and_suspended_hospitals_are_refused(api: Api) -> None:
    hid, email = api.register()
    r = api.client.post("/api/v1/auth/token", json={"email": email, "password": HOSPITAL_PASSWORD})
    assert r.status_code == 403 and "awaiting approval" in r.json()["detail"]
    # listing and deciding needs the admin
    assert (
        api.client.get("/api/v1/hospitals?status=pending", headers=api.admin).json()[0]["id"] == hid
    )
    api.client.post(f"/api/v1/hospitals/{hid}/approve", headers=api.admin)
    token = api.token(email, HOSPITAL_PASSWORD)
    me = api.client.get("/api/v1/users/me", headers=api.auth(token))
    assert me.status_code == 200 and me.json()["status"] == "approved"
    assert "password" not in str(me.json())
    r = api.client.post(f"/api/v1/hospitals/{hid}/suspend", headers=api.admin)
    assert r.json()["status"] == "suspended"
    assert api.client.get("/api/v1/users/me", headers=api.auth(token)).status_code == 401
    r = api.client.post("/api/v1/auth/token", json={"email": email, "password": HOSPITAL_PASSWORD})
    assert r.status_code == 403 and "suspended" in r.json()["detail"]
    hid2, email2 = api.register()
    api.client.post(f"/api/v1/hospitals/{hid2}/reject", headers=api.admin)
    r = api.client.post("/api/v1/auth/token", json={"email": email2, "password": HOSPITAL_PASSWORD})
    assert r.status_code == 403 and "rejected" in r.json()["detail"]


def test_unauthenticated_and_bad_tokens(api: Api) -> None:
    c = api.client
    for path in ("/api/v1/users/me", "/api/v1/federations", "/api/v1/audit", "/api/v1/hospitals"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    for bad in ("garbage", "fcp_abc.def", api.admin_token + "x", api.admin_token[:-2]):
        assert c.get("/api/v1/users/me", headers=api.auth(bad)).status_code == 401


def test_new_token_revokes_old_one(api: Api) -> None:
    hid, email = api.register()
    api.client.post(f"/api/v1/hospitals/{hid}/approve", headers=api.admin)
    first = api.token(email, HOSPITAL_PASSWORD)
    second = api.token(email, HOSPITAL_PASSWORD)
    assert first != second
    r = api.client.get("/api/v1/users/me", headers=api.auth(first))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert api.client.get("/api/v1/users/me", headers=api.auth(second)).status_code == 200


def test_token_expiry(api: Api, clock: FakeClock) -> None:
    _, headers = api.hospital()
    clock.advance(days=91)
    r = api.client.get("/api/v1/users/me", headers=headers)
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_hospital_cannot_use_admin_routes(api: Api) -> None:
    hid, headers = api.hospital()
    other, _ = api.register()
    c = api.client
    assert c.get("/api/v1/hospitals", headers=headers).status_code == 403
    assert c.post(f"/api/v1/hospitals/{other}/approve", headers=headers).status_code == 403
    assert c.get("/api/v1/audit", headers=headers).status_code == 403
    r = c.post("/api/v1/federations", json={"name": "x1", "model": "mlp"}, headers=headers)
    assert r.status_code == 403
    assert c.post("/api/v1/hospitals/9999/approve", headers=api.admin).status_code == 404
    assert c.post(f"/api/v1/hospitals/{hid}/promote", headers=api.admin).status_code == 422


def test_login_rate_limit(api: Api) -> None:
    _, email = api.register()
    c = api.client
    for _ in range(5):
        r = c.post("/api/v1/auth/token", json={"email": email, "password": "wrong-password!"})
        assert r.status_code == 401
    r = c.post("/api/v1/auth/token", json={"email": email, "password": HOSPITAL_PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    events = c.get("/api/v1/audit?action=login.failure", headers=api.admin).json()
    assert len(events) == 5


def test_rate_limit_window_expires(tmp_path: Path, clock: FakeClock) -> None:
    now = [0.0]
    app = create_app(
        make_settings(tmp_path, login_max_failures=2, login_window_s=60),
        clock=clock,
        monotonic=lambda: now[0],
    )
    api = Api(app, clock)
    for _ in range(2):
        r = api.client.post(
            "/api/v1/auth/token", json={"email": ADMIN_EMAIL, "password": "nope-nope-nope"}
        )
        assert r.status_code == 401
    r = api.client.post(
        "/api/v1/auth/token", json={"email": ADMIN_EMAIL, "password": "admin-password-1"}
    )
    assert r.status_code == 429
    now[0] = 61.0
    r = api.client.post(
        "/api/v1/auth/token", json={"email": ADMIN_EMAIL, "password": "admin-password-1"}
    )
    assert r.status_code == 201
    app.state.portal.close()


# --- federations ----------------------------------------------------------------------


def test_create_read_update_federation(api: Api) -> None:
    _, headers = api.hospital()
    fid = api.federation(name="breast", publish=False, dataset_description="WDBC, IID")
    c = api.client
    fed = c.get(f"/api/v1/federations/{fid}", headers=headers).json()
    assert fed["status"] == "draft" and fed["current_round"] is None
    r = c.post("/api/v1/federations", json={"name": "breast", "model": "mlp"}, headers=api.admin)
    assert r.status_code == 409
    r = c.post(
        "/api/v1/federations",
        json={"name": "b2", "model": "mlp", "protection": "rot13"},
        headers=api.admin,
    )
    assert r.status_code == 422
    r = c.patch(f"/api/v1/federations/{fid}", json={"quorum": 3}, headers=api.admin)
    assert r.status_code == 200 and r.json()["quorum"] == 3
    assert (
        c.patch(f"/api/v1/federations/{fid}", json={"quorum": 0}, headers=api.admin).status_code
        == 422
    )
    assert (
        c.patch(f"/api/v1/federations/{fid}", json={"quorum": 2}, headers=headers).status_code
        == 403
    )
    assert c.get("/api/v1/federations/999", headers=headers).status_code == 404
    # uploads before the initial model: refused
    r = api.upload(fid, 1, plain_update(np.ones(MODEL_SIZE), 5), headers)
    assert r.status_code == 409 and "not started" in r.json()["detail"]
    assert c.get(f"/api/v1/federations/{fid}/initial-model", headers=headers).status_code == 404
    # a plain federation takes no server key
    assert (
        c.put(f"/api/v1/federations/{fid}/server-key", content=b"k", headers=api.admin).status_code
        == 409
    )
    # publish with a wrong checksum: nothing stored, still a draft
    blob = b"state dict bytes"
    r = c.put(
        f"/api/v1/federations/{fid}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(b"other")},
    )
    assert r.status_code == 400 and "checksum mismatch" in r.json()["detail"]
    assert c.get(f"/api/v1/federations/{fid}", headers=headers).json()["status"] == "draft"
    assert list((api.portal.store.tmp).iterdir()) == []
    r = c.put(
        f"/api/v1/federations/{fid}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(blob), "X-Model-Size": "6"},
    )
    assert (
        r.status_code == 200 and r.json()["status"] == "running" and r.json()["current_round"] == 1
    )
    got = c.get(f"/api/v1/federations/{fid}/initial-model", headers=headers)
    assert got.content == blob and got.headers["x-content-sha256"] == sha(blob)
    r = c.put(
        f"/api/v1/federations/{fid}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(blob)},
    )
    assert r.status_code == 409
    assert [f["name"] for f in c.get("/api/v1/federations", headers=headers).json()] == ["breast"]


def test_ckks_federation_refuses_a_secret_hospital_key(
    api: Api, ckks_keys: tuple[bytes, bytes]
) -> None:
    hospital_key, server_key = ckks_keys
    fid = api.federation(protection="he", publish=False)
    c = api.client
    r = c.put(f"/api/v1/federations/{fid}/server-key", content=hospital_key, headers=api.admin)
    assert r.status_code == 422 and "secret" in r.json()["detail"]
    r = c.put(f"/api/v1/federations/{fid}/server-key", content=b"junk", headers=api.admin)
    assert r.status_code == 422
    # nothing of the secret key reached the disk
    stored = [p.read_bytes() for p in api.portal.store.blobs.rglob("*") if p.is_file()]
    assert hospital_key not in stored and not list(api.portal.store.tmp.iterdir())
    blob = b"model"
    r = c.put(
        f"/api/v1/federations/{fid}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(blob)},
    )
    assert r.status_code == 409 and "server.key" in r.json()["detail"]
    r = c.put(f"/api/v1/federations/{fid}/server-key", content=server_key, headers=api.admin)
    assert r.status_code == 200 and r.json()["key_fingerprint"] and r.json()["he_preset"] == "fast"


# --- uploads and rounds ---------------------------------------------------------------


def test_round_lifecycle_plain(api: Api) -> None:
    h1, a = api.hospital()
    h2, b = api.hospital()
    fid = api.federation(quorum=2, num_rounds=2)
    c = api.client
    r = api.upload(fid, 1, plain_update([1, 2, 3, 4, 5, 6], 10), a)
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["num_examples"] == 10 and up["version"] == 1 and up["hospital_id"] == h1
    state = api.round(fid, 1, a)
    assert state["status"] == "open" and state["num_uploads"] == 1 and state["uploaded_by_me"]
    r = c.get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=a)
    assert r.status_code == 409 and "not been aggregated" in r.json()["detail"]
    r = c.post(
        f"/api/v1/federations/{fid}/rounds/1/metrics",
        json={"loss": 1, "accuracy": 0.5, "num_examples": 3},
        headers=a,
    )
    assert r.status_code == 409
    assert api.upload(fid, 1, plain_update([3, 2, 1, 0, -1, -2], 30), b).status_code == 200
    state = api.round(fid, 1, a)
    assert state["status"] == "aggregated" and state["total_examples"] == 40
    agg = c.get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=a)
    assert agg.status_code == 200 and agg.headers["x-content-sha256"] == sha(agg.content)
    mean = PlainHospital().unprotect(agg.content).mean
    expected = (10 * np.array([1, 2, 3, 4, 5, 6]) + 30 * np.array([3, 2, 1, 0, -1, -2])) / 40
    np.testing.assert_allclose(mean, expected)
    # round 2 opened; round 1 is closed; round 3 is in the future
    rounds = c.get(f"/api/v1/federations/{fid}/rounds", headers=a).json()
    assert [x["status"] for x in rounds] == ["aggregated", "open"]
    r = api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    assert r.status_code == 409 and "closed" in r.json()["detail"]
    r = api.upload(fid, 3, plain_update(np.ones(6), 1), a)
    assert r.status_code == 409 and "not opened yet" in r.json()["detail"]
    assert c.get(f"/api/v1/federations/{fid}/rounds/3", headers=a).status_code == 404
    # metrics: validated, replaced on re-report, listed
    bad = {"loss": -1, "accuracy": 2, "num_examples": 0}
    assert (
        c.post(f"/api/v1/federations/{fid}/rounds/1/metrics", json=bad, headers=a).status_code
        == 422
    )
    for acc in (0.5, 0.75):
        r = c.post(
            f"/api/v1/federations/{fid}/rounds/1/metrics",
            json={"loss": 0.4, "accuracy": acc, "auc": 0.9, "num_examples": 20},
            headers=a,
        )
        assert r.status_code == 201
    r = c.post(
        f"/api/v1/federations/{fid}/rounds/1/metrics",
        json={"loss": 0.4, "accuracy": 0.5, "num_examples": 20},
        headers=api.admin,
    )
    assert r.status_code == 403  # the admin does not report metrics
    ms = c.get(f"/api/v1/federations/{fid}/rounds/1/metrics", headers=b).json()
    assert len(ms) == 1 and ms[0]["accuracy"] == 0.75 and ms[0]["hospital_id"] == h1
    # participants in order of first upload
    parts = c.get(f"/api/v1/federations/{fid}/participants", headers=a).json()
    assert [p["id"] for p in parts] == [h1, h2]
    # round 2 -> federation finished
    api.upload(fid, 2, plain_update(np.zeros(6), 1), a)
    api.upload(fid, 2, plain_update(np.zeros(6), 1), b)
    fed = c.get(f"/api/v1/federations/{fid}", headers=a).json()
    assert fed["status"] == "finished"
    r = api.upload(fid, 2, plain_update(np.ones(6), 1), a)
    assert r.status_code == 409


def test_metrics_only_from_participants(api: Api) -> None:
    _, a = api.hospital()
    _, outsider = api.hospital()
    fid = api.federation(quorum=1)
    api.upload(fid, 1, plain_update(np.ones(6), 4), a)
    assert api.round(fid, 1)["status"] == "aggregated"
    r = api.client.post(
        f"/api/v1/federations/{fid}/rounds/1/metrics",
        json={"loss": 0.1, "accuracy": 1, "num_examples": 5},
        headers=outsider,
    )
    assert r.status_code == 403


def test_reupload_replaces_atomically(api: Api) -> None:
    _, a = api.hospital()
    api.hospital()
    fid = api.federation(quorum=2)
    first = plain_update(np.full(6, 1.0), 5)
    second = plain_update(np.full(6, 2.0), 7)
    assert api.upload(fid, 1, first, a).json()["version"] == 1
    r = api.upload(fid, 1, second, a)
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["num_examples"] == 7
    with api.portal.session() as db:
        rows = list(db.scalars(select(Upload)))
    assert len(rows) == 1 and rows[0].sha256 == sha(second)
    assert not api.portal.store.exists(sha(first))  # the replaced blob is gone
    assert api.portal.store.read_bytes(sha(second)) == second
    own = api.client.get(f"/api/v1/federations/{fid}/rounds/1/update", headers=a)
    assert own.content == second


@pytest.mark.parametrize(
    ("body", "checksum", "status", "message"),
    [
        (b"not a fedcrypt message at all", None, 422, "bad magic"),
        (plain_update(np.ones(6), 3)[:-5], None, 422, "truncated"),
        (plain_update(np.ones(6), 3) + b"x", None, 422, "trailing bytes"),
        (b"", None, 422, "empty"),
        (plain_update(np.ones(7), 3), None, 422, "wrong model size"),
        (plain_update(np.ones(6), 3), "0" * 64, 400, "checksum mismatch"),
        (plain_update(np.ones(6), 3), "xyz", 400, "64 hex"),
    ],
)
def test_bad_uploads_are_rejected_and_nothing_is_written(
    api: Api, body: bytes, checksum: str | None, status: int, message: str
) -> None:
    _, a = api.hospital()
    fid = api.federation(quorum=2)
    r = api.upload(fid, 1, body, a, checksum=checksum)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    with api.portal.session() as db:
        assert list(db.scalars(select(Upload))) == []
    assert list(api.portal.store.tmp.iterdir()) == []
    assert not api.portal.store.exists(sha(body))
    events = api.client.get("/api/v1/audit?action=update.reject", headers=api.admin).json()
    assert len(events) == 1 and message in events[0]["detail"]


def test_upload_missing_checksum_and_wrong_scheme(api: Api) -> None:
    _, a = api.hospital()
    fid = api.federation(quorum=2)
    body = plain_update(np.ones(6), 3)
    r = api.client.put(f"/api/v1/federations/{fid}/rounds/1/update", content=body, headers=a)
    assert r.status_code == 400 and "X-Content-SHA256" in r.json()["detail"]
    from fedcrypt.protection import wire

    fake = wire.pack({"scheme": "ckks", "size": 6, "num_examples": 3}, [b"abc"])
    r = api.upload(fid, 1, fake, a)
    assert r.status_code == 422 and "'ckks'" in r.json()["detail"]


def test_upload_size_limit(tmp_path: Path, clock: FakeClock) -> None:
    app = create_app(make_settings(tmp_path, max_upload_mb=1), clock=clock)
    api = Api(app, clock)
    _, a = api.hospital()
    fid = api.federation(quorum=2, model_size=None)
    big = plain_update(np.ones(280_000), 2)  # 1.1 MB of float32
    r = api.upload(fid, 1, big, a)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert list(api.portal.store.tmp.iterdir()) == []

    def chunks() -> object:  # no Content-Length: the limit is enforced while streaming
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = api.client.put(
        f"/api/v1/federations/{fid}/rounds/1/update",
        content=chunks(),  # type: ignore[arg-type]
        headers={**a, "X-Content-SHA256": sha(big)},
    )
    assert r.status_code == 413
    assert list(api.portal.store.tmp.iterdir()) == []
    app.state.portal.close()


def test_first_upload_fixes_the_model_size(api: Api) -> None:
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(quorum=3, model_size=None)
    assert api.upload(fid, 1, plain_update(np.ones(5), 1), a).status_code == 200
    r = api.upload(fid, 1, plain_update(np.ones(6), 1), b)
    assert r.status_code == 422 and "5" in r.json()["detail"]


def test_admin_cannot_upload_and_access_to_uploads(api: Api) -> None:
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(quorum=3)
    r = api.upload(fid, 1, plain_update(np.ones(6), 1), api.admin)
    assert r.status_code == 403
    up = api.upload(fid, 1, plain_update(np.ones(6), 2), a).json()
    c = api.client
    assert c.get(f"/api/v1/uploads/{up['id']}", headers=a).status_code == 200
    assert c.get(f"/api/v1/uploads/{up['id']}/content", headers=a).status_code == 200
    r = c.get(f"/api/v1/uploads/{up['id']}/content", headers=b)
    assert r.status_code == 403 and "another hospital" in r.json()["detail"]
    assert c.get(f"/api/v1/uploads/{up['id']}", headers=b).status_code == 403
    assert c.get(f"/api/v1/uploads/{up['id']}/content").status_code == 401
    assert c.get(f"/api/v1/uploads/{up['id']}/content", headers=api.admin).status_code == 200
    assert c.get("/api/v1/uploads/999/content", headers=a).status_code == 404
    r = c.get(f"/api/v1/federations/{fid}/rounds/1/update", headers=b)
    assert r.status_code == 404  # b has not uploaded; it cannot fetch a's update either
    meta = c.get(f"/api/v1/federations/{fid}/rounds/1/uploads", headers=b).json()
    assert len(meta) == 1 and "content" not in meta[0]


def test_deadline_aggregates_with_quorum(api: Api, clock: FakeClock) -> None:
    _, a = api.hospital()
    _, b = api.hospital()
    _, c3 = api.hospital()
    fid = api.federation(quorum=3, num_rounds=3, round_deadline_minutes=10)
    for h in (a, b):  # round 1 aggregates as soon as the quorum is met...
        api.upload(fid, 1, plain_update(np.ones(6), 1), h)
    assert api.round(fid, 1)["status"] == "open"
    api.upload(fid, 1, plain_update(np.ones(6), 1), c3)
    assert api.round(fid, 1)["status"] == "aggregated"
    r = api.client.patch(f"/api/v1/federations/{fid}", json={"quorum": 2}, headers=api.admin)
    assert r.status_code == 200
    # round 2: two of three members upload; it waits for the third until the deadline
    api.upload(fid, 2, plain_update(np.ones(6), 1), a)
    api.upload(fid, 2, plain_update(np.ones(6), 1), b)
    state = api.round(fid, 2)
    assert state["status"] == "open" and state["expected_uploads"] == 3
    clock.advance(minutes=11)
    assert api.round(fid, 2)["status"] == "aggregated"
    # round 3: one upload, deadline passes, quorum not met -> stays open
    api.upload(fid, 3, plain_update(np.ones(6), 1), a)
    clock.advance(minutes=11)
    assert api.round(fid, 3)["status"] == "open"
    r = api.client.post(f"/api/v1/federations/{fid}/rounds/3/aggregate", headers=api.admin)
    assert r.status_code == 409 and "quorum" in r.json()["detail"]
    api.upload(fid, 3, plain_update(np.ones(6), 1), c3)
    assert api.round(fid, 3)["status"] == "aggregated"


def test_admin_forces_aggregation(api: Api) -> None:
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(quorum=2, num_rounds=2)
    api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    api.upload(fid, 1, plain_update(np.ones(6), 1), b)
    api.client.patch(f"/api/v1/federations/{fid}", json={"quorum": 1}, headers=api.admin)
    api.upload(fid, 2, plain_update(np.ones(6), 1), a)  # waits for b until the deadline
    assert api.round(fid, 2)["status"] == "open"
    c = api.client
    assert c.post(f"/api/v1/federations/{fid}/rounds/2/aggregate", headers=a).status_code == 403
    r = c.post(f"/api/v1/federations/{fid}/rounds/2/aggregate", headers=api.admin)
    assert r.status_code == 200 and r.json()["status"] == "aggregated"
    assert (
        c.post(f"/api/v1/federations/{fid}/rounds/2/aggregate", headers=api.admin).status_code
        == 409
    )


def test_ckks_rounds_and_foreign_key_context(api: Api, ckks_keys: tuple[bytes, bytes]) -> None:
    from fedcrypt.protection.he import keys

    hospital_key, server_key = ckks_keys
    hospital = keys.hospital_from_bytes(hospital_key)
    other_hospital = keys.hospital_from_bytes(keys.generate_keys("fast")[0])
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(protection="he", server_key=server_key, quorum=2)
    x, y = np.linspace(-1, 1, 6), np.linspace(0.5, -0.5, 6)
    r = api.upload(fid, 1, other_hospital.protect(x, num_examples=3), a)
    assert r.status_code == 422 and "another key context" in r.json()["detail"]
    r = api.upload(fid, 1, plain_update(x, 3), a)
    assert r.status_code == 422
    r = api.upload(fid, 1, hospital.protect(np.ones(7), num_examples=3), a)
    assert r.status_code == 422 and "wrong model size" in r.json()["detail"]
    assert api.upload(fid, 1, hospital.protect(x, num_examples=3), a).status_code == 200
    assert api.upload(fid, 1, hospital.protect(y, num_examples=1), b).status_code == 200
    agg = api.client.get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=b).content
    res = hospital.unprotect(agg)
    np.testing.assert_allclose(res.mean, (3 * x + y) / 4, atol=1e-3)
    assert res.total_examples == 4 and res.num_updates == 2


def test_corrupt_ciphertext_is_rejected_at_upload(api: Api, ckks_keys: tuple[bytes, bytes]) -> None:
    from fedcrypt.protection import wire
    from fedcrypt.protection.he import keys

    hospital_key, server_key = ckks_keys
    hospital = keys.hospital_from_bytes(hospital_key)
    _, a = api.hospital()
    fid = api.federation(protection="he", server_key=server_key, quorum=2)
    env = wire.unpack(hospital.protect(np.ones(6), num_examples=2))
    bad = wire.pack(env.header, [b"\x00" * len(s) for s in env.sections])
    r = api.upload(fid, 1, bad, a)
    assert r.status_code == 422
    with api.portal.session() as db:
        assert list(db.scalars(select(Upload))) == []


def test_restart_mid_round_keeps_uploads(tmp_path: Path, db_url: str, clock: FakeClock) -> None:
    app = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    api = Api(app, clock)
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(quorum=2)
    api.upload(fid, 1, plain_update(np.full(6, 4.0), 1), a)
    (api.portal.store.tmp / "upload-crashed.part").write_bytes(b"half an upload")
    app.state.portal.close()

    app2 = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)  # "restart"
    c = TestClient(app2)
    assert list(app2.state.portal.store.tmp.iterdir()) == []  # partial files cleared
    state = c.get(f"/api/v1/federations/{fid}/rounds/1", headers=b).json()
    assert state["num_uploads"] == 1 and state["status"] == "open"
    r = c.put(
        f"/api/v1/federations/{fid}/rounds/1/update",
        content=(blob := plain_update(np.full(6, 2.0), 1)),
        headers={**b, "X-Content-SHA256": sha(blob)},
    )
    assert r.status_code == 200
    agg = c.get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=a).content
    np.testing.assert_allclose(PlainHospital().unprotect(agg).mean, np.full(6, 3.0))
    app2.state.portal.close()


def test_interrupted_aggregation_is_resumed_after_restart(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    app = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    api = Api(app, clock)
    _, a = api.hospital()
    fid = api.federation(quorum=1, num_rounds=1)
    with api.portal.session() as db:  # simulate a crash between claim and publish
        db.execute(update(Round).values(status="aggregating"))
        db.commit()
    app.state.portal.close()
    app2 = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    with app2.state.portal.session() as db:
        assert db.scalar(select(Round.status)) == "open"
    c = TestClient(app2)
    blob = plain_update(np.ones(6), 1)
    assert (
        c.put(
            f"/api/v1/federations/{fid}/rounds/1/update",
            content=blob,
            headers={**a, "X-Content-SHA256": sha(blob)},
        ).status_code
        == 200
    )
    assert c.get(f"/api/v1/federations/{fid}", headers=a).json()["status"] == "finished"
    app2.state.portal.close()


def test_audit_log(api: Api) -> None:
    _, a = api.hospital()
    fid = api.federation(quorum=1)
    api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    events = api.client.get("/api/v1/audit?limit=100", headers=api.admin).json()
    actions = [e["action"] for e in events]
    for expected in (
        "admin.create",
        "hospital.register",
        "hospital.approve",
        "token.issue",
        "federation.create",
        "federation.publish_model",
        "update.upload",
        "round.aggregate",
    ):
        assert expected in actions
    assert events[0]["id"] > events[-1]["id"]  # newest first
    agg = next(e for e in events if e["action"] == "round.aggregate")
    assert agg["actor"] == "portal"
