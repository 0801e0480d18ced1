"""The secagg relay refuses bad replies with the protocol's error, names the hospital (4xx),
and completes the round without it when enough hospitals remain; restarts and cancels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from portal_helpers import ADMIN_EMAIL, ADMIN_PASSWORD, MODEL_SIZE, Api, FakeClock, make_settings
from secagg_helpers import (
    API,
    aggregate,
    answer,
    consortium,
    fedavg,
    federation_params,
    get_request,
    make_sites,
    put_reply,
    secagg_federation,
    sessions,
    step,
    turn,
)
from test_pages import csrf, sign_in

from fedcrypt.portal.app import create_app
from fedcrypt.protection.secagg import RoundConfig, SecAggServer


def test_bad_replies_are_refused_and_the_round_completes_without_that_hospital(
    api: Api,
) -> None:
    cons = consortium(5)
    fid = secagg_federation(api, cons, quorum=3, deadline_minutes=10)
    params = federation_params(api, fid)
    sites = make_sites(api, fid, cons, 5, rng=np.random.default_rng(5), params=params)
    step(api, fid, 1, sites, until_stage="advertise")
    assert turn(api, fid, 1, sites[0])["action"] == "answer"

    # a reply signed by an unregistered key (hospital 0 of another consortium)
    rogue = consortium(5).hospital(0, params)
    _, request = get_request(api, fid, 1, sites[0])
    r = put_reply(api, fid, 1, sites[0], rogue.stage_advertise(request))
    assert r.status_code == 403, r.text
    assert "hospital 0 (Hospital 0)" in r.json()["detail"]
    assert "SignatureError" in r.json()["detail"]
    # hospital 1's (valid) reply sent with hospital 0's token
    _, request1 = get_request(api, fid, 1, sites[1])
    reply1 = answer(sites[1], "advertise", request1)
    r = put_reply(api, fid, 1, sites[0], reply1)
    assert r.status_code == 422 and "arrived as hospital 0" in r.json()["detail"]
    assert put_reply(api, fid, 1, sites[1], reply1).status_code == 200
    sites[1].sent.append(("advertise", reply1))
    # hospital 0 still answers validly before the stage closes
    step(api, fid, 1, sites, until_stage="share")
    assert turn(api, fid, 1, sites[0])["stage"] == "share"

    # a replayed stage message: hospital 2 sends its advertise reply again
    r = put_reply(api, fid, 1, sites[2], sites[2].sent[-1][1])
    assert r.status_code == 409 and "ReplayError" in r.json()["detail"]
    assert "hospital 2" in r.json()["detail"]

    # shares for another session: hospital 3's real key, same protocol round, other nonce
    ident = api.client.get(f"{API}/federations/{fid}/rounds/1/secagg", headers=api.admin)
    invited = tuple(h["hospital_id"] for h in ident.json()[0]["hospitals"])
    fake = SecAggServer(
        RoundConfig(round=1, hospital_ids=invited, vector_size=MODEL_SIZE, params=params),
        registry=cons.registry.keys,
    )
    clones = {i: cons.hospital(i, params) for i in range(4)}
    adv = fake.request_advertise()
    shares = fake.receive_advertise({i: clones[i].stage_advertise(adv[i]) for i in clones})
    other_session = clones[3].stage_share(shares[3])
    r = put_reply(api, fid, 1, sites[3], other_session)
    assert r.status_code == 409, r.text
    assert "SessionMismatchError" in r.json()["detail"] and "hospital 3" in r.json()["detail"]

    # a reply beyond the stage's bound is not even read
    r = put_reply(api, fid, 1, sites[3], b"x" * (200 << 10))
    assert r.status_code == 413 and "at most" in r.json()["detail"]

    # hospitals 0, 2, 3, 4 answer; 4 answers twice
    sites[1].stop_at = "share"
    step(api, fid, 1, sites, until_stage="masked_input")
    assert turn(api, fid, 1, sites[0])["stage"] == "share"  # hospital 1 is awaited
    r = put_reply(api, fid, 1, sites[4], sites[4].sent[-1][1])
    assert r.status_code == 409 and "already answered" in r.json()["detail"]

    # an answer after the deadline
    _, request1 = get_request(api, fid, 1, sites[1])
    late = answer(sites[1], "share", request1)
    api.clock.advance(minutes=11)
    r = put_reply(api, fid, 1, sites[1], late)
    assert r.status_code == 409, r.text
    assert "DeadlineError" in r.json()["detail"] and "hospital 1" in r.json()["detail"]
    assert turn(api, fid, 1, sites[1])["action"] == "follow"  # the stage closed without it
    r = put_reply(api, fid, 1, sites[1], late)
    assert r.status_code == 409 and "dropped out" in r.json()["detail"]

    # the round completes with the four others (t = 4)
    step(api, fid, 1, sites)
    state = api.round(fid, 1)
    assert state["status"] == "aggregated" and state["num_updates"] == 4, state
    (att,) = sessions(api, fid, 1)
    h1 = next(h for h in att["hospitals"] if h["hospital_id"] == 1)
    assert h1["status"] == "dropped" and h1["stage"] == "share"
    assert "DeadlineError" in h1["reason"]
    expected, total = fedavg(sites, [0, 2, 3, 4])
    res = sites[0].hospital.unprotect_missed(
        aggregate(api, fid, 1, sites[0].headers), expected_round=1
    )
    assert np.max(np.abs(res.mean - expected)) <= params.error_bound(4, total)
    # every refusal is in the audit log, naming the hospital
    events = api.client.get(
        f"{API}/audit", params={"action": "secagg.reject"}, headers=api.admin
    ).json()
    details = " | ".join(e["detail"] for e in events)
    for name in ("SignatureError", "ReplayError", "SessionMismatchError", "DeadlineError"):
        assert name in details
    # the federation page shows the stage progress and who dropped out
    c = TestClient(api.app)
    sign_in(c, ADMIN_EMAIL, ADMIN_PASSWORD)
    page = c.get(f"/federations/{fid}")
    assert page.status_code == 200
    assert "Secure aggregation" in page.text and "DeadlineError" in page.text
    assert "dropped at share" in page.text


def _reopen(api: Api, tmp_path: Path, db_url: str, clock: FakeClock) -> Api:
    """The same portal after a restart (same database and data directory)."""
    api.portal.close()
    app = create_app(make_settings(tmp_path, db_url=db_url), clock=clock)
    new = Api.__new__(Api)
    new.app, new.clock, new.client, new.portal = app, clock, TestClient(app), app.state.portal
    new.admin_token, new._n = api.admin_token, api._n
    return new


def test_a_restarted_portal_rebuilds_the_running_session(
    api: Api, tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    cons = consortium(3)
    fid = secagg_federation(api, cons, quorum=3)
    params = federation_params(api, fid)
    sites = make_sites(api, fid, cons, 3, rng=np.random.default_rng(6), params=params)
    sites[2].stop_at = "masked_input"
    step(api, fid, 1, sites)
    assert turn(api, fid, 1, sites[0])["stage"] == "masked_input"
    api = _reopen(api, tmp_path, db_url, clock)
    assert api.portal.relays == {}
    sites[2].stop_at = None
    step(api, fid, 1, sites)
    assert api.round(fid, 1)["status"] == "aggregated"
    expected, total = fedavg(sites, [0, 1, 2])
    res = sites[1].hospital.unprotect_missed(
        aggregate(api, fid, 1, sites[1].headers), expected_round=1
    )
    assert np.max(np.abs(res.mean - expected)) <= params.error_bound(3, total)


def test_cancelling_drops_the_running_session(api: Api) -> None:
    cons = consortium(3)
    fid = secagg_federation(api, cons, quorum=3)
    sites = make_sites(api, fid, cons, 3, rng=np.random.default_rng(7))
    step(api, fid, 1, sites, until_stage="share")
    r = api.client.post(
        f"{API}/federations/{fid}/cancel", json={"reason": "wrong data"}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert turn(api, fid, 1, sites[0])["action"] == "closed"
    (att,) = sessions(api, fid, 1)
    assert att["stage"] == "abandoned"
    assert len(list(api.portal.store.blobs.rglob("*/*"))) == 2  # registry, initial model


def test_the_admin_can_start_a_session_and_close_a_stage(api: Api) -> None:
    cons = consortium(5)
    fid = secagg_federation(api, cons, quorum=3)
    sites = make_sites(api, fid, cons, 5, rng=np.random.default_rng(8))
    for s in sites[3:]:
        s.stop_at = "join"  # enrolled, never joins
    step(api, fid, 1, sites)
    assert api.round(fid, 1)["stage"] == "join"
    r = api.client.post(f"{API}/federations/{fid}/rounds/1/aggregate", headers=api.admin)
    assert r.status_code == 200 and r.json()["stage"] == "advertise", r.text
    assert turn(api, fid, 1, sites[4])["action"] == "follow"
    r = api.client.post(f"{API}/federations/{fid}/rounds/1/secagg/join", headers=sites[4].headers)
    assert r.status_code == 409 and "started without hospital 4" in r.json()["detail"]
    sites[2].stop_at = "consistency"
    step(api, fid, 1, sites)
    r = api.client.post(f"{API}/federations/{fid}/rounds/1/aggregate", headers=api.admin)
    # 3 invited, t = 3: closing the consistency stage without hospital 2 fails the session
    assert r.status_code == 200 and r.json()["status"] == "failed"
    assert "consistency" in r.json()["error"]


def test_the_web_form_creates_a_secagg_federation(api: Api) -> None:
    cons = consortium(3)
    c = TestClient(api.app)
    sign_in(c, ADMIN_EMAIL, ADMIN_PASSWORD)
    token = csrf(c, "/federations/new")
    assert 'value="secagg"' in c.get("/federations/new").text
    fields = {
        "csrf_token": token,
        "name": "web sa",
        "model": "mlp",
        "protection": "secagg",
        "quorum": "3",
        "round_deadline_minutes": "30",
        "num_rounds": "2",
        "model_size": str(MODEL_SIZE),
    }
    r = c.post(
        "/federations/new",
        data=fields,
        files={
            "initial_model": ("m.pt", b"abc"),
            "registry": ("hospital-0.key", cons.keys.identities[0]),
        },
    )
    assert r.status_code == 422 and "refusing a secret" in r.text
    assert api.client.get(f"{API}/federations", headers=api.admin).json() == []
    r = c.post("/federations/new", data=fields, files={"initial_model": ("m.pt", b"abc")})
    assert r.status_code == 422 and "registry.pub" in r.text
    r = c.post(
        "/federations/new",
        data=fields,
        files={"initial_model": ("m.pt", b"abc"), "registry": ("registry.pub", cons.keys.registry)},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    page = c.get(r.headers["location"])
    assert "secagg" in page.text and cons.registry.fingerprint in page.text
    assert "--group-mask-key group-mask.key" in page.text
    fed = api.client.get(f"{API}/federations", headers=api.admin).json()[0]
    assert fed["protection"] == "secagg" and fed["key_fingerprint"] == cons.registry.fingerprint
