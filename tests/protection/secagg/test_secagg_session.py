"""The group mask is bound to the session; a hospital's progress survives restarts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from _secagg_helpers import make_consortium, make_inputs

from fedcrypt.exceptions import DecryptionError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import (
    ReplayError,
    RoundConfig,
    SecAggHospital,
    SessionMismatchError,
    StateFileError,
    decode_aggregate,
    run_round,
)
from fedcrypt.protection.secagg import state as state_mod
from fedcrypt.protection.secagg.masking import group_mask_key
from fedcrypt.protection.secagg.messages import pack_request
from fedcrypt.protection.secagg.state import Progress, load_progress

P = 64
KEY = b"\x11" * 32
NONCE = "ab" * 16


# -- the group mask is bound to nonce, invited set and round ------------------------------
def test_group_mask_key_depends_on_nonce_invited_set_round_owner_and_size() -> None:
    base = {"nonce": NONCE, "invited": (1, 2, 3), "round_": 4, "owner": 2, "size": 10}
    k = group_mask_key(KEY, **base)  # type: ignore[arg-type]
    assert group_mask_key(KEY, **{**base, "invited": (3, 2, 1)}) == k  # type: ignore[arg-type]
    for change in (
        {"nonce": "cd" * 16},
        {"invited": (1, 2, 3, 4)},
        {"invited": (1, 2)},
        {"round_": 5},
        {"owner": 3},
        {"size": 11},
    ):
        assert group_mask_key(KEY, **{**base, **change}) != k, change  # type: ignore[arg-type]
    assert group_mask_key(b"\x12" * 32, **base) != k  # type: ignore[arg-type]


def relabel(aggregate: bytes, **changes: object) -> bytes:
    """The aggregate with its configuration changed (and its session made to match)."""
    env = wire.unpack(aggregate)
    cfg = RoundConfig.from_json({**env.header["config"], **changes})
    header = {**env.header, "config": cfg.to_json(), "session": cfg.session}
    return wire.pack(header, env.sections)


@pytest.mark.parametrize(
    "changes",
    [{"nonce": "00" * 16}, {"hospital_ids": [0, 1, 2, 3, 9], "threshold": 4}, {"round": 2}],
)
def test_a_group_mask_of_another_session_or_set_does_not_unmask(changes: dict) -> None:  # type: ignore[type-arg]
    c = make_consortium(range(4))
    report = run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P))
    moved = relabel(report.aggregate, **changes)
    if "round" in changes:
        moved = wire.pack({**wire.unpack(moved).header, "round": 2}, wire.unpack(moved).sections)
    with pytest.raises(DecryptionError):
        decode_aggregate(moved, params=c.params, consortium_key=c.consortium_key)
    # the unchanged aggregate decodes
    decode_aggregate(report.aggregate, params=c.params, consortium_key=c.consortium_key)


def test_an_aggregate_whose_session_does_not_match_its_configuration_is_refused() -> None:
    c = make_consortium(range(3))
    report = run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P))
    env = wire.unpack(report.aggregate)
    forged = wire.pack({**env.header, "session": "0" * 64}, env.sections)
    with pytest.raises(SessionMismatchError):
        decode_aggregate(forged, params=c.params, consortium_key=c.consortium_key)


def test_a_hospital_refuses_the_aggregate_of_another_session_of_its_round() -> None:
    a = make_consortium(range(3), seed=4)
    b = make_consortium(range(3), seed=4)  # same keys, another run of round 1
    inputs = make_inputs(a.ids, P)
    run_round(a.server(vector_size=P), a.hospitals, inputs, unprotect=False)
    other = run_round(b.server(vector_size=P), b.hospitals, inputs, unprotect=False)
    with pytest.raises(SessionMismatchError, match="another session"):
        a.hospitals[0].unprotect(other.aggregate)


# -- the state file -----------------------------------------------------------------------
def hospital_with_state(c, hid: int, path: Path, **kwargs) -> SecAggHospital:  # type: ignore[no-untyped-def]
    return SecAggHospital(
        hid,
        signing_key=c.signing[hid],
        registry=c.registry,
        params=c.params,
        consortium_key=c.consortium_key,
        state_file=path,
        **kwargs,
    )


def test_a_repeated_or_older_round_is_refused_after_a_restart(tmp_path: Path) -> None:
    c = make_consortium(range(3))
    paths = {i: tmp_path / f"h{i}.state" for i in c.ids}
    hospitals = {i: hospital_with_state(c, i, paths[i]) for i in c.ids}
    inputs = make_inputs(c.ids, P)
    c.round = 2
    report = run_round(c.server(vector_size=P), hospitals, inputs)  # round 3
    round3 = report.aggregate
    assert report.result is not None
    # the file: 0600, atomically replaced (no temporary files left), says round 3 done
    assert stat.S_IMODE(os.stat(paths[0]).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h0.state", "h1.state", "h2.state"]
    prog = load_progress(paths[0], hospital_id=0)
    assert (prog.last_round, prog.revealed, prog.last_unprotected) == (3, True, 3)
    assert prog.signed and prog.session == report_session(report.aggregate)
    # "restart": new objects, same files
    restarted = {i: hospital_with_state(c, i, paths[i]) for i in c.ids}
    assert restarted[1].last_round == 3
    for rnd in (3, 2):  # the same round number in a new session (fresh nonce), or older
        cfg = RoundConfig(round=rnd, hospital_ids=c.ids, vector_size=P, params=c.params)
        req = pack_request(
            "advertise", round_=rnd, session=cfg.session, extra={"config": cfg.to_json()}
        )
        with pytest.raises(ReplayError, match="not newer than round 3"):
            restarted[1].stage_advertise(req)
    c.round = 3
    report = run_round(c.server(vector_size=P), restarted, inputs)  # round 4 is accepted
    assert load_progress(paths[2], hospital_id=2).last_round == 4
    with pytest.raises(ReplayError, match="round 3, older than round 4"):
        restarted[0].unprotect(round3)


def report_session(aggregate: bytes) -> str:
    return str(wire.unpack(aggregate).header["session"])


def test_the_round_is_recorded_before_the_reply_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = make_consortium(range(3))
    h = hospital_with_state(c, 0, tmp_path / "h0.state")
    req = c.server(vector_size=P).request_advertise()[0]

    def broken(path: Path, progress: Progress) -> None:
        raise StateFileError("cannot write secagg state file: disk full")

    monkeypatch.setattr("fedcrypt.protection.secagg.hospital.save_progress", broken)
    with pytest.raises(StateFileError, match="disk full"):
        h.stage_advertise(req)
    assert h.last_round == 0 and not (tmp_path / "h0.state").exists()


def rollback_setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Hospital 0 with a state file, stopped just before the consistency stage."""
    c = make_consortium(range(4))
    path = tmp_path / "h0.state"
    hospitals = dict(c.hospitals)
    hospitals[0] = hospital_with_state(c, 0, path)
    server = c.server(vector_size=P)
    inputs = make_inputs(c.ids, P)
    reqs = server.request_advertise()
    reqs = server.receive_advertise({i: hospitals[i].stage_advertise(reqs[i]) for i in c.ids})
    reqs = server.receive_share({i: hospitals[i].stage_share(reqs[i]) for i in c.ids})
    reqs = server.receive_masked_input(
        {
            i: hospitals[i].stage_masked_input(
                reqs[i], update=inputs[i][0], num_examples=inputs[i][1]
            )
            for i in c.ids
        }
    )
    return c, path, hospitals, server, reqs


def test_a_hospital_signs_one_survivor_set_per_session_even_after_a_rollback(
    tmp_path: Path,
) -> None:
    c, path, hospitals, server, reqs = rollback_setup(tmp_path)
    before = hospitals[0].export_state()
    hospitals[0].stage_consistency(reqs[0])
    # a restarted host fed the pre-consistency state, then asked to sign another set
    again = hospital_with_state(c, 0, path)
    again.import_state(before)
    cfg = server.config
    other = pack_request(
        "consistency", round_=1, session=cfg.session, extra={"survivors": [0, 1, 2]}
    )
    with pytest.raises(ReplayError, match="already signed a survivor set in this session"):
        again.stage_consistency(other)


def test_a_hospital_reveals_once_per_session_even_after_a_rollback(tmp_path: Path) -> None:
    c, path, hospitals, server, reqs = rollback_setup(tmp_path)
    reqs = server.receive_consistency({i: hospitals[i].stage_consistency(reqs[i]) for i in c.ids})
    before = hospitals[0].export_state()
    hospitals[0].stage_unmask(reqs[0])
    with pytest.raises(ReplayError, match="already answered"):
        hospitals[0].stage_unmask(reqs[0])  # same object: the stage is done
    again = hospital_with_state(c, 0, path)
    again.import_state(before)
    with pytest.raises(ReplayError, match="already revealed its shares in this session"):
        again.stage_unmask(reqs[0])


def test_without_a_state_file_the_progress_travels_in_the_exported_state() -> None:
    c = make_consortium(range(3))
    run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P))
    blob = c.hospitals[1].export_state()
    fresh = SecAggHospital(
        1,
        signing_key=c.signing[1],
        registry=c.registry,
        params=c.params,
        consortium_key=c.consortium_key,
    )
    fresh.import_state(blob)
    assert fresh.progress == c.hospitals[1].progress and fresh.last_round == 1


@pytest.mark.parametrize(
    "content",
    [b"garbage", Progress(hospital=7, last_round=3).to_bytes(), b"FCRY" + bytes(20)],
)
def test_a_corrupt_or_foreign_state_file_is_refused(tmp_path: Path, content: bytes) -> None:
    c = make_consortium(range(3))
    path = tmp_path / "h0.state"
    path.write_bytes(content)
    with pytest.raises(StateFileError):
        hospital_with_state(c, 0, path)


def test_state_file_fields_are_validated(tmp_path: Path) -> None:
    good = Progress(hospital=0, last_round=2).to_bytes()
    env = wire.unpack(good)
    for bad in ({"last_round": -1}, {"revealed": "yes"}, {"session": "xyz"}, {"kind": "other"}):
        data = wire.pack({**env.header, **bad}, [])
        with pytest.raises(StateFileError):
            Progress.from_bytes(data, hospital_id=0)
    (tmp_path / "big").write_bytes(b"x" * (state_mod.MAX_STATE_BYTES + 1))
    with pytest.raises(StateFileError, match="larger"):
        load_progress(tmp_path / "big", hospital_id=0)
    assert load_progress(tmp_path / "missing", hospital_id=0) == Progress(hospital=0)


def test_an_unwritable_state_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="cannot write"):
        state_mod.save_progress(tmp_path / "no-such-dir" / "h.state", Progress(hospital=0))


def test_never_both_shares_of_one_peer() -> None:
    """One reveal per session, one kind per owner: b of survivors, s of the dropped."""
    c = make_consortium(range(5))
    seen: dict[int, bytes] = {}

    def grab(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d) == ("unmask", "reply"):
            seen[hid] = msg
        return msg

    run_round(
        c.server(vector_size=P),
        c.hospitals,
        make_inputs(c.ids, P),
        dropouts={"masked_input": {3}},
        intercept=grab,
    )
    for hid, msg in seen.items():
        hdr = wire.unpack(msg).header
        owners, kinds = hdr["owners"], hdr["kinds"]
        assert len(set(owners)) == len(owners) == len(kinds)
        assert dict(zip(owners, kinds, strict=True)) == {
            o: ("s" if o == 3 else "b") for o in owners
        }, hid
    assert np.all([3 in wire.unpack(m).header["owners"] for m in seen.values()])
