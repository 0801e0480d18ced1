"""The review's findings: hostile counts, wedged rounds, orphan blobs, packed-grid checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from portal_helpers import MODEL_SIZE, Api, FakeClock, make_settings, plain_update, sha
from sqlalchemy import select, update

from fedcrypt.portal.app import create_app
from fedcrypt.portal.models import Round, Upload
from fedcrypt.portal.validation import MAX_EXAMPLES
from fedcrypt.protection import wire
from fedcrypt.protection.plain import PlainHospital


def hostile_plain(num_examples: int, size: int = MODEL_SIZE) -> bytes:
    """A well-framed plain update whose header claims ``num_examples``."""
    header = {"scheme": "plain", "size": size, "num_examples": num_examples, "num_updates": 1}
    return wire.pack(header, [np.ones(size).astype(">f8").tobytes()])


def stored_blobs(api: Api) -> set[str]:
    return set(api.portal.store.list_blobs())


def initial_blobs(api: Api, fid: int) -> set[str]:
    fed = api.client.get(f"/api/v1/federations/{fid}", headers=api.admin).json()
    return {fed["initial_model_sha256"]}


@pytest.mark.parametrize(
    ("claimed", "message"),
    [
        ((1 << 63) - 1, "above the limit"),  # wedged the federation in 'aggregating'
        (10**30, "above the limit"),  # HTTP 500 and an orphan blob
        (MAX_EXAMPLES + 1, "above the limit"),
        (0, "is invalid"),
        (-5, "is invalid"),
    ],
)
def test_hostile_example_counts_are_refused_and_the_round_still_aggregates(
    api: Api, claimed: int, message: str
) -> None:
    _, a = api.hospital()
    _, b = api.hospital()
    _, hostile = api.hospital()
    fid = api.federation(quorum=2, num_rounds=1)
    # the two honest hospitals upload; the hostile one held its upload back until now
    assert api.upload(fid, 1, plain_update(np.full(6, 1.0), 10), a).status_code == 200
    r = api.upload(fid, 1, hostile_plain(claimed), hostile)
    assert r.status_code == 422, r.text
    assert "num_examples" in r.json()["detail"] and message in r.json()["detail"]
    with api.portal.session() as db:
        assert len(list(db.scalars(select(Upload)))) == 1
    assert stored_blobs(api) == initial_blobs(api, fid) | {sha(plain_update(np.full(6, 1.0), 10))}
    assert list(api.portal.store.tmp.iterdir()) == []
    assert api.upload(fid, 1, plain_update(np.full(6, 3.0), 30), b).status_code == 200
    state = api.round(fid, 1)
    assert state["status"] == "aggregated" and state["total_examples"] == 40
    agg = api.client.get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=a).content
    np.testing.assert_allclose(PlainHospital().unprotect(agg).mean, np.full(6, 2.5))


@pytest.mark.parametrize(
    "header",
    [
        {"scheme": "plain", "size": 10**30, "num_examples": 1},
        {"scheme": "plain", "size": 6, "num_examples": 1, "num_updates": 10**30},
        {"scheme": "plain", "size": 6.5, "num_examples": 1},
        {"scheme": "plain", "size": 6, "num_examples": True},
    ],
)
def test_other_header_counts_are_bounded(api: Api, header: dict[str, Any]) -> None:
    _, a = api.hospital()
    fid = api.federation(quorum=1)
    r = api.upload(fid, 1, wire.pack(header, [b"\x00" * 48]), a)
    assert r.status_code == 422, r.text
    assert stored_blobs(api) == initial_blobs(api, fid)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/federations/99999999999999999999999",
        "/api/v1/federations/1/rounds/99999999999999999999",
        "/api/v1/federations/1/rounds/0",
        "/api/v1/uploads/99999999999999999999/content",
        "/api/v1/audit?offset=99999999999999999999",
    ],
)
def test_numbers_in_paths_are_bounded(api: Api, path: str) -> None:
    api.federation(quorum=1)
    assert api.client.get(path, headers=api.admin).status_code == 422


def test_model_size_headers_and_bodies_are_bounded(api: Api) -> None:
    fid = api.federation(publish=False, model_size=None)
    blob = b"model"
    r = api.client.put(
        f"/api/v1/federations/{fid}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(blob), "X-Model-Size": str(10**30)},
    )
    assert r.status_code == 422
    r = api.client.post(
        "/api/v1/federations",
        json={"name": "big", "model_size": 10**30, "protection": "plain"},
        headers=api.admin,
    )
    assert r.status_code == 422
    _, a = api.hospital()
    fid = api.federation(name="metrics", quorum=1)
    api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    r = api.client.post(
        f"/api/v1/federations/{fid}/rounds/1/metrics",
        json={"loss": 1, "accuracy": 0.5, "num_examples": 10**30},
        headers=a,
    )
    assert r.status_code == 422


def _corrupt_stored_upload(api: Api, fid: int, hospital: dict[str, str]) -> int:
    """Store a valid update, then corrupt its blob on disk (as a failing disk would)."""
    up = api.upload(fid, 1, plain_update(np.full(6, 9.0), 5), hospital).json()
    path = api.portal.store.path(up["sha256"])
    path.write_bytes(b"FCRY garbage")
    return int(up["id"])


def test_a_failed_aggregation_is_recoverable_and_names_the_upload(api: Api) -> None:
    _, a = api.hospital()
    _, b = api.hospital()
    _, c = api.hospital()
    fid = api.federation(quorum=2, num_rounds=1)
    bad = _corrupt_stored_upload(api, fid, a)
    assert api.upload(fid, 1, plain_update(np.full(6, 1.0), 10), b).status_code == 200
    state = api.round(fid, 1)  # due with the quorum met: the aggregation fails
    assert state["status"] == "failed" and state["failed_upload_id"] == bad
    assert f"upload {bad}" in state["error"] and "Hospital 1" in state["error"]
    # a failed round still takes uploads; it is never wedged in 'aggregating'
    assert api.upload(fid, 1, plain_update(np.full(6, 3.0), 30), c).status_code == 200
    assert api.round(fid, 1)["status"] == "failed"
    r = api.client.post(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=api.admin)
    assert r.status_code == 200 and r.json()["status"] == "failed"
    path = f"/api/v1/federations/{fid}/rounds/1/uploads/{bad}/exclude"
    r = api.client.post(path, json={"reason": "corrupt on disk"}, headers=b)
    assert r.status_code == 403
    r = api.client.post(path, json={"reason": "corrupt on disk"}, headers=api.admin)
    assert r.status_code == 200 and r.json()["excluded"]
    state = api.round(fid, 1)  # every other expected hospital uploaded: due at once
    assert state["status"] == "aggregated" and state["total_examples"] == 40
    agg = api.client.get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=b).content
    np.testing.assert_allclose(PlainHospital().unprotect(agg).mean, np.full(6, 2.5))
    events = api.client.get("/api/v1/audit?action=round.aggregate_failed", headers=api.admin)
    assert len(events.json()) == 3
    assert api.client.get("/api/v1/audit?action=update.exclude", headers=api.admin).json()
    r = api.client.post(path, json={"reason": "again"}, headers=api.admin)
    assert r.status_code == 409


def test_an_excluded_hospital_cannot_upload_again_in_that_round(api: Api) -> None:
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(quorum=2, num_rounds=2)
    api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    api.upload(fid, 1, plain_update(np.ones(6), 1), b)  # round 1 aggregates
    api.client.patch(f"/api/v1/federations/{fid}", json={"quorum": 1}, headers=api.admin)
    up = api.upload(fid, 2, plain_update(np.ones(6), 1), a).json()
    r = api.client.post(
        f"/api/v1/federations/{fid}/rounds/2/uploads/{up['id']}/exclude",
        json={"reason": "suspicious"},
        headers=api.admin,
    )
    assert r.status_code == 200
    r = api.upload(fid, 2, plain_update(np.ones(6), 1), a)
    assert r.status_code == 409 and "excluded" in r.json()["detail"]
    state = api.round(fid, 2)
    assert state["num_uploads"] == 0 and state["num_excluded"] == 1
    assert state["expected_uploads"] == 1  # the excluded hospital is not waited for
    api.upload(fid, 2, plain_update(np.ones(6), 1), b)
    assert api.round(fid, 2)["status"] == "aggregated"


def test_a_legacy_row_with_a_huge_count_fails_the_round_instead_of_wedging_it(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    """A row stored before the bounds existed: aggregation fails, names it, restart is clean."""
    app = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    api = Api(app, clock)
    _, a = api.hospital()
    _, b = api.hospital()
    fid = api.federation(quorum=2, num_rounds=1)
    api.upload(fid, 1, plain_update(np.ones(6), 3), a)
    with api.portal.session() as db:
        db.execute(update(Upload).values(num_examples=(1 << 63) - 1))
        db.commit()
    api.upload(fid, 1, plain_update(np.ones(6), 4), b)
    state = api.round(fid, 1)
    assert state["status"] == "failed" and state["failed_upload_id"] is not None
    assert "num_examples" in state["error"]
    app.state.portal.close()
    app2 = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)  # restart
    c = TestClient(app2)
    state = c.get(f"/api/v1/federations/{fid}/rounds/1", headers=a).json()
    assert state["status"] == "failed"  # still recoverable, not 'aggregating'
    r = c.post(
        f"/api/v1/federations/{fid}/rounds/1/uploads/{state['failed_upload_id']}/exclude",
        json={"reason": "bogus count"},
        headers=api.admin,
    )
    assert r.status_code == 200
    r = c.post(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=api.admin)
    assert r.status_code == 409 and "quorum" in r.json()["detail"]  # 1 of 2 left
    c.patch(f"/api/v1/federations/{fid}", json={"quorum": 1}, headers=api.admin)
    r = c.post(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=api.admin)
    assert r.json()["status"] == "aggregated" and r.json()["total_examples"] == 4
    app2.state.portal.close()


def test_orphan_blobs_are_removed_at_startup(tmp_path: Path, db_url: str, clock: FakeClock) -> None:
    app = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    api = Api(app, clock)
    _, a = api.hospital()
    fid = api.federation(quorum=2)
    kept = api.upload(fid, 1, plain_update(np.ones(6), 1), a).json()["sha256"]
    orphan = api.portal.store.put_bytes(b"left behind by a crash")
    assert orphan in stored_blobs(api)
    app.state.portal.close()
    app2 = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    blobs = set(app2.state.portal.store.list_blobs())
    assert orphan not in blobs and kept in blobs and initial_blobs(api, fid) <= blobs
    app2.state.portal.close()


def test_a_failed_database_write_leaves_no_orphan_blob(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcrypt.portal.services import rounds

    _, a = api.hospital()
    fid = api.federation(quorum=2)

    def boom(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("database went away")

    monkeypatch.setattr(rounds, "record", boom)
    blob = plain_update(np.ones(6), 1)
    with pytest.raises(RuntimeError):
        api.upload(fid, 1, blob, a)
    assert not api.portal.store.exists(sha(blob))
    with api.portal.session() as db:
        assert db.scalar(select(Round.upload_seq)) == 0


# --- packed (BFV) rounds: mode, step table and capacity checked on arrival --------------


@pytest.fixture(scope="module")
def packed_keys() -> tuple[bytes, bytes]:
    from fedcrypt.protection.he import keys

    return keys.generate_keys("packed")


def _hospitals(hospital_key: bytes, n: int) -> list[Any]:
    from fedcrypt.protection.he import keys

    return [keys.hospital_from_bytes(hospital_key) for _ in range(n)]


def test_packed_round_checks_mode_table_and_capacity(
    api: Api, packed_keys: tuple[bytes, bytes]
) -> None:
    hospital_key, server_key = packed_keys
    h1, h2, h3, late = _hospitals(hospital_key, 4)
    (_, a), (_, b), (_, c) = api.hospital(), api.hospital(), api.hospital()
    fid = api.federation(protection="he", server_key=server_key, quorum=3, num_rounds=2)
    x = [np.linspace(-0.5, 0.5, 6) * (i + 1) for i in range(3)]
    # round 1 calibrates: a calibrated update (its hospital calibrated on something else) is refused
    late.set_reference(np.ones(6), total_examples=10)
    r = api.upload(fid, 1, late.protect(x[0], num_examples=4), a)
    assert r.status_code == 422 and "calibrated-mode packed update in round 1" in r.json()["detail"]
    for hosp, headers, xi, n in zip((h1, h2, h3), (a, b, c), x, (4, 5, 6), strict=True):
        assert api.upload(fid, 1, hosp.protect(xi, num_examples=n), headers).status_code == 200
    assert api.round(fid, 1)["status"] == "aggregated"
    agg1 = api.client.get(f"/api/v1/federations/{fid}/rounds/1/aggregate", headers=a).content
    for hosp in (h1, h2, h3):
        hosp.unprotect(agg1)  # every hospital calibrates on the decrypted global model
    # round 2 is calibrated: the calibration grid of a hospital that skipped round 1 is refused
    fresh = _hospitals(hospital_key, 1)[0]
    r = api.upload(fid, 2, fresh.protect(x[0], num_examples=4), a)
    assert r.status_code == 422
    assert "calibration-mode packed update in round 2, which is calibrated" in r.json()["detail"]
    assert api.upload(fid, 2, h1.protect(x[0], num_examples=4), a).status_code == 200
    # a step table calibrated on another global model is refused
    other = _hospitals(hospital_key, 1)[0]
    other.set_reference(np.full(6, 3.0), total_examples=15)
    r = api.upload(fid, 2, other.protect(x[1], num_examples=5), b)
    assert r.status_code == 422 and "step table" in r.json()["detail"]
    # more examples than the grid's capacity (the aggregate would overflow) are refused
    with api.portal.session() as db:
        capacity = db.scalar(select(Upload.max_examples).where(Upload.mode == "calibrated"))
    assert capacity is not None
    r = api.upload(fid, 2, h2.protect(x[1], num_examples=int(capacity)), b)
    assert r.status_code == 422 and "calibrated for" in r.json()["detail"]
    # the honest uploads still aggregate, and decrypt to the FedAvg of round 2
    assert api.upload(fid, 2, h2.protect(x[1], num_examples=5), b).status_code == 200
    assert api.upload(fid, 2, h3.protect(x[2], num_examples=6), c).status_code == 200
    state = api.round(fid, 2)
    assert state["status"] == "aggregated" and state["total_examples"] == 15
    agg2 = api.client.get(f"/api/v1/federations/{fid}/rounds/2/aggregate", headers=a).content
    res = h1.unprotect(agg2)
    expected = (4 * x[0] + 5 * x[1] + 6 * x[2]) / 15
    np.testing.assert_allclose(res.mean, expected, atol=1e-3)
    rejects = api.client.get("/api/v1/audit?action=update.reject", headers=api.admin).json()
    assert len(rejects) == 4
