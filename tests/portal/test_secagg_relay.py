"""The secagg relay through the API: federations, enrolment, rounds, dropouts, failures.

Hospitals are in-process :class:`~fedcrypt.protection.secagg.SecAggHospital` objects
that poll the portal's API like ``fedcrypt portal participate`` does (tests of that
loop: ``test_secagg_participant.py``; end to end: ``test_e2e_secagg.py``).
"""

from __future__ import annotations

import shlex

import numpy as np
import pytest
from portal_helpers import MODEL_SIZE, Api, plain_update, sha
from secagg_helpers import (
    API,
    aggregate,
    consortium,
    enrol,
    fedavg,
    federation_params,
    make_sites,
    secagg_federation,
    sessions,
    step,
    turn,
)

from fedcrypt.exceptions import ConfigError, DecryptionError, ProtocolError
from fedcrypt.protection.secagg import decode_aggregate


def _unprotect(site, blob: bytes, protocol_round: int):  # type: ignore[no-untyped-def]
    return site.hospital.unprotect_missed(blob, expected_round=protocol_round)


def test_a_secagg_federation_holds_only_the_public_registry(api: Api) -> None:
    cons = consortium(3)
    fid = secagg_federation(api, cons, quorum=3)
    fed = api.client.get(f"{API}/federations/{fid}", headers=api.admin).json()
    assert fed["protection"] == "secagg" and fed["status"] == "running"
    assert fed["key_fingerprint"] == cons.registry.fingerprint
    assert fed["secagg_params"]["max_hospitals"] == 3
    assert fed["secagg_params"]["group_mask"] is True
    assert fed["secagg_params"]["colluders"] == 1
    cmd = shlex.split(fed["join_command"])
    assert cmd[cmd.index("--key") + 1] == "hospital-ID.key"
    assert cmd[cmd.index("--group-mask-key") + 1] == "group-mask.key"
    r = api.client.get(f"{API}/federations/{fid}/registry", headers=api.admin)
    assert r.status_code == 200 and r.content == cons.keys.registry
    # there is no single update to upload under secagg
    _, h = api.hospital()
    r = api.upload(fid, 1, plain_update([0.0] * MODEL_SIZE, 3), h)
    assert r.status_code == 409 and "secagg" in r.json()["detail"]


@pytest.mark.parametrize("which", ["identity", "group-mask", "garbage"])
def test_a_secret_key_file_is_refused_as_registry(api: Api, which: str) -> None:
    cons = consortium(3)
    r = api.client.post(
        f"{API}/federations",
        json={"name": "xx", "protection": "secagg", "quorum": 2, "model_size": MODEL_SIZE},
        headers=api.admin,
    )
    fid = r.json()["id"]
    data = {
        "identity": cons.keys.identities[0],
        "group-mask": cons.keys.group_mask,
        "garbage": b"FCRY not a registry",
    }[which]
    r = api.client.put(f"{API}/federations/{fid}/registry", content=data, headers=api.admin)
    assert r.status_code == 422, r.text
    if which != "garbage":
        assert "refusing a secret" in r.json()["detail"]
    fed = api.client.get(f"{API}/federations/{fid}", headers=api.admin).json()
    assert fed["server_key_sha256"] is None
    blobs = [p.read_bytes() for p in (api.portal.store.blobs).rglob("*") if p.is_file()]
    assert data not in blobs
    # without a registry the federation cannot start
    blob = b"initial"
    r = api.client.put(
        f"{API}/federations/{fid}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(blob)},
    )
    assert r.status_code == 409 and "registry.pub" in r.json()["detail"]


def test_secagg_needs_two_hospitals_and_the_registry_goes_to_secagg_only(api: Api) -> None:
    r = api.client.post(
        f"{API}/federations",
        json={"name": "qq", "protection": "secagg", "quorum": 1},
        headers=api.admin,
    )
    assert r.status_code == 422 and "quorum must be >= 2" in r.text
    fid = api.federation(name="pp", protection="plain", publish=False)
    r = api.client.put(
        f"{API}/federations/{fid}/registry", content=consortium(2).keys.registry, headers=api.admin
    )
    assert r.status_code == 409 and "takes no registry" in r.json()["detail"]


def test_enrolment_needs_the_hospitals_own_signature(api: Api) -> None:
    cons, other = consortium(3), consortium(3)
    fid = secagg_federation(api, cons)
    _, a = api.hospital("Site A")
    _, b = api.hospital("Site B")
    assert enrol(api, fid, other, 0, a).status_code == 403  # another consortium's key
    r = enrol(api, fid, cons, 0, a)
    assert r.status_code == 201 and r.json()["hospital_id"] == 0
    assert enrol(api, fid, cons, 0, a).status_code == 200  # idempotent
    r = enrol(api, fid, cons, 0, b)
    assert r.status_code == 409 and "already enrolled by another account (Site A)" in r.text
    r = enrol(api, fid, cons, 1, a)
    assert r.status_code == 409 and "already enrolled" in r.text
    # a proof made for account A is worthless for account B
    me_a = api.client.get(f"{API}/users/me", headers=a).json()["id"]
    from fedcrypt.portal.secagg import sign_enrolment

    sig = sign_enrolment(
        cons.signing_key(1),
        registry_fingerprint=cons.registry.fingerprint,
        federation_id=fid,
        account_id=me_a,
        hospital_id=1,
    )
    r = api.client.post(
        f"{API}/federations/{fid}/secagg/members",
        json={"hospital_id": 1, "signature": sig},
        headers=b,
    )
    assert r.status_code == 403 and "not signed by hospital 1" in r.text
    r = api.client.post(
        f"{API}/federations/{fid}/secagg/members",
        json={"hospital_id": 7, "signature": sig},
        headers=b,
    )
    assert r.status_code == 422 and "not in the federation's registry" in r.text
    members = api.client.get(f"{API}/federations/{fid}/secagg/members", headers=b).json()
    assert [m["hospital_id"] for m in members] == [0]


def test_two_rounds_with_three_hospitals_equal_fedavg(api: Api) -> None:
    cons = consortium(3)
    fid = secagg_federation(api, cons, quorum=3)
    params = federation_params(api, fid)
    rng = np.random.default_rng(1)
    sites = make_sites(api, fid, cons, 3, rng=rng, params=params)
    for number in (1, 2):
        for s in sites:
            s.update = rng.normal(0, 0.05, size=MODEL_SIZE)
        step(api, fid, number, sites)
        state = api.round(fid, number)
        assert state["status"] == "aggregated", state
        assert state["num_updates"] == 3 and state["total_examples"] is None
        assert state["protocol_round"] == number
        blob = aggregate(api, fid, number, sites[0].headers)
        expected, total = fedavg(sites, [0, 1, 2])
        results = [_unprotect(s, blob, number) for s in sites]
        bound = params.error_bound(3, total)
        for res in results:
            assert res.total_examples == total and res.num_updates == 3
            assert np.max(np.abs(res.mean - expected)) <= bound
            np.testing.assert_array_equal(res.mean, results[0].mean)
        (att,) = sessions(api, fid, number)
        assert att["stage"] == "done" and att["threshold"] == 3
        assert {h["status"] for h in att["hospitals"]} == {"contributed"}
        assert [st["stage"] for st in att["stages"]] == [
            "join",
            "advertise",
            "share",
            "masked_input",
            "consistency",
            "unmask",
        ]
        assert all(h["bytes_up"] > 0 and h["bytes_down"] > 0 for h in att["hospitals"])
    fed = api.client.get(f"{API}/federations/{fid}", headers=api.admin).json()
    assert fed["status"] == "finished"
    # the portal's disk: the registry, the initial model, the two aggregates; no secret, and
    # the session messages are gone once their session ended
    blobs = {p.name: p.read_bytes() for p in api.portal.store.blobs.rglob("*") if p.is_file()}
    assert len(blobs) == 4
    secrets_ = [*cons.keys.identities.values(), cons.keys.group_mask]
    assert not any(s in b for s in secrets_ for b in blobs.values())
    assert cons.group_mask not in b"".join(blobs.values())
    # without the group-mask key the aggregate does not unmask
    with pytest.raises(ConfigError):
        decode_aggregate(blob, params=params)
    with pytest.raises((DecryptionError, ProtocolError)):
        decode_aggregate(blob, params=params, consortium_key=bytes(32))
    # everyone sees the metrics-free progress; the page shows the sessions
    page = api.client.get(f"/federations/{fid}")
    assert page.status_code in (200, 303)


@pytest.mark.parametrize(("stage", "contributors"), [("masked_input", 4), ("consistency", 5)])
def test_a_dropout_after_masked_input_with_five_hospitals(
    api: Api, stage: str, contributors: int
) -> None:
    """Hospital 2 stops answering at ``stage``: the round completes at the stage deadline."""
    cons = consortium(5)
    fid = secagg_federation(api, cons, quorum=3, deadline_minutes=10)
    params = federation_params(api, fid)
    sites = make_sites(api, fid, cons, 5, rng=np.random.default_rng(2), params=params)
    sites[2].stop_at = stage
    step(api, fid, 1, sites)
    assert api.round(fid, 1)["stage"] == stage
    api.clock.advance(minutes=11)
    step(api, fid, 1, sites)  # the first poll past the deadline closes the stage
    state = api.round(fid, 1)
    assert state["status"] == "aggregated", state
    assert state["num_updates"] == contributors
    (att,) = sessions(api, fid, 1)
    assert att["threshold"] == 4
    h2 = next(h for h in att["hospitals"] if h["hospital_id"] == 2)
    assert h2["status"] == "dropped" and h2["stage"] == stage
    assert "no valid answer by the deadline" in h2["reason"]
    ids = [s.hid for s in sites if contributors == 5 or s.hid != 2]
    expected, total = fedavg(sites, ids)
    res = _unprotect(sites[0], aggregate(api, fid, 1, sites[0].headers), 1)
    assert res.num_updates == contributors and res.total_examples == total
    assert np.max(np.abs(res.mean - expected)) <= params.error_bound(contributors, total)
    # the dropped hospital follows from the aggregate and takes part in round 2
    res2 = _unprotect(sites[2], aggregate(api, fid, 1, sites[2].headers), 1)
    np.testing.assert_array_equal(res2.mean, res.mean)
    sites[2].stop_at = None
    step(api, fid, 2, sites)
    assert api.round(fid, 2)["status"] == "aggregated"
    assert api.round(fid, 2)["num_updates"] == 5


def test_too_few_hospitals_fail_the_round_loudly_and_it_recovers(api: Api) -> None:
    """3 hospitals (t = 3): one drops at share; the round fails; a new session completes."""
    cons = consortium(3)
    fid = secagg_federation(api, cons, quorum=2, deadline_minutes=5)
    sites = make_sites(api, fid, cons, 3, rng=np.random.default_rng(3))
    sites[1].stop_at = "share"
    step(api, fid, 1, sites)
    api.clock.advance(minutes=6)
    turn(api, fid, 1, sites[0])
    state = api.round(fid, 1)
    assert state["status"] == "failed", state
    assert "stage share" in state["error"] and "threshold is 3" in state["error"]
    assert "A new session starts" in state["error"]
    first, second = sessions(api, fid, 1)
    assert first["stage"] == "failed" and second["stage"] == "join"
    assert first["protocol_round"] == 1
    # the hospitals rejoin (their protocol objects start the new protocol round)
    sites[1].stop_at = None
    step(api, fid, 1, sites)
    state = api.round(fid, 1)
    assert state["status"] == "aggregated" and state["protocol_round"] == 2
    assert state["error"] is None and state["num_updates"] == 3
    res = _unprotect(sites[0], aggregate(api, fid, 1, sites[0].headers), 2)
    assert res.num_updates == 3
