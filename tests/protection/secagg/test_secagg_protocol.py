"""Full secagg rounds: the sum equals plain FedAvg, dropouts, SecAgg+ graphs, group mask."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _secagg_helpers import make_consortium, make_inputs, plain_fedavg

from fedcrypt.exceptions import ConfigError, DecryptionError, DropoutError, ProtocolError
from fedcrypt.protection.secagg import (
    ReplayError,
    RoundConfig,
    SecAggHospital,
    SecAggParams,
    SecAggServer,
    TooFewSurvivorsError,
    decode_aggregate,
    run_round,
)

P = 2_000


def check_against_plain(report, inputs, survivors, params) -> None:  # type: ignore[no-untyped-def]
    expected, total = plain_fedavg(inputs, survivors)
    assert report.survivors == tuple(survivors)
    assert report.result is not None
    assert report.result.total_examples == total
    assert report.result.num_updates == len(survivors)
    bound = params.error_bound(len(survivors), total)
    assert np.abs(report.result.mean - expected).max() <= bound + 1e-12


@pytest.mark.parametrize("group_mask", [True, False])
def test_sum_equals_plain_fedavg_within_quantization_bound(group_mask: bool) -> None:
    params = SecAggParams(group_mask=group_mask)
    c = make_consortium([11, 4, 7, 30], params)
    inputs = make_inputs(c.ids, P)
    report = run_round(c.server(vector_size=P), c.hospitals, inputs)
    check_against_plain(report, inputs, c.ids, params)
    # every hospital (and only a consortium member when the group mask is on) decodes it
    assert report.result is not None
    for h in c.hospitals.values():
        np.testing.assert_array_equal(h.unprotect(report.aggregate).mean, report.result.mean)


def test_float32_update_and_many_rounds() -> None:
    c = make_consortium([1, 2, 3])
    for _ in range(3):
        inputs = {
            i: (x.astype(np.float32), n)
            for i, (x, n) in make_inputs(c.ids, 300, seed=c.round).items()
        }
        report = run_round(c.server(vector_size=300), c.hospitals, inputs)
        check_against_plain(report, inputs, c.ids, c.params)


@pytest.mark.parametrize("stage", ["consistency", "unmask"])
@pytest.mark.parametrize("dropped", [{2}, {0, 4}])
def test_one_or_two_dropping_after_masking_still_recover_the_full_sum(
    dropped: set[int], stage: str
) -> None:
    """7 hospitals, t = 5 (colluders = 1): up to 2 may leave after sending their update."""
    c = make_consortium(range(7))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    assert server.config.t == 5
    report = run_round(server, c.hospitals, inputs, dropouts={stage: dropped})
    check_against_plain(report, inputs, c.ids, c.params)
    expected_signers = [i for i in c.ids if stage == "unmask" or i not in dropped]
    assert report.signers == tuple(expected_signers)


@pytest.mark.parametrize("dropped", [{3}, {1, 3}])
def test_one_or_two_dropping_before_masking_recover_the_survivors_sum(dropped: set[int]) -> None:
    c = make_consortium(range(7))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    report = run_round(server, c.hospitals, inputs, dropouts={"masked_input": dropped})
    survivors = [i for i in c.ids if i not in dropped]
    check_against_plain(report, inputs, survivors, c.params)


def test_dropouts_at_several_stages() -> None:
    c = make_consortium(range(10))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    assert server.config.t == 6
    drops = {"share": {6}, "masked_input": {2}, "consistency": {9}, "unmask": {0}}
    report = run_round(server, c.hospitals, inputs, dropouts=drops)
    check_against_plain(report, inputs, [0, 1, 3, 4, 5, 7, 8, 9], c.params)
    assert report.signers == (0, 1, 3, 4, 5, 7, 8)


def test_two_dropping_after_signing_fails_loudly(caplog: pytest.LogCaptureFixture) -> None:
    c = make_consortium(range(5))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    with caplog.at_level(logging.WARNING), pytest.raises(TooFewSurvivorsError) as info:
        run_round(server, c.hospitals, inputs, dropouts={"unmask": {0, 2}})
    assert isinstance(info.value, DropoutError)
    assert (info.value.stage, info.value.survivors, info.value.threshold) == ("unmask", 3, 4)
    assert "threshold is 4" in str(info.value)
    assert "dropped out" in caplog.text
    with pytest.raises(ProtocolError, match="not finished"):
        server.aggregate()
    assert server.stage == "aborted"


@pytest.mark.parametrize("stage", ["advertise", "share", "masked_input", "consistency"])
def test_two_dropping_at_earlier_stages_fails_loudly(stage: str) -> None:
    c = make_consortium(range(5))
    server = c.server(vector_size=P)
    with pytest.raises(TooFewSurvivorsError) as info:
        run_round(server, c.hospitals, make_inputs(c.ids, P), dropouts={stage: {1, 3}})
    assert info.value.stage == stage


def test_weaker_consortium_threshold_tolerates_more_dropouts() -> None:
    """colluders = 0 (warned): t = 3 of 5, two hospitals may leave after masking."""
    c = make_consortium(range(5), SecAggParams(colluders=0))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    assert server.config.t == 3
    report = run_round(server, c.hospitals, inputs, dropouts={"unmask": {1, 4}})
    check_against_plain(report, inputs, c.ids, c.params)


def test_secagg_plus_neighbour_graph_with_dropouts() -> None:
    params = SecAggParams(neighbours=6)
    c = make_consortium(range(12), params)
    inputs = make_inputs(c.ids, 500)
    server = c.server(vector_size=500)
    assert (server.config.t, server.config.signatures_needed) == (5, 7)
    drops = {"masked_input": {5}, "unmask": {8}}
    report = run_round(server, c.hospitals, inputs, dropouts=drops)
    check_against_plain(report, inputs, [i for i in c.ids if i != 5], params)
    # each hospital shared with 6 neighbours only: its share message is small
    complete = make_consortium(range(12))
    full = run_round(complete.server(vector_size=500), complete.hospitals, inputs)
    assert max(report.bytes_up.values()) < min(full.bytes_up.values()) - 4 * 150


def test_secagg_plus_needs_a_majority_to_sign() -> None:
    """Share groups of 5 tolerate dropouts, but the survivor set needs 7 of 12 signatures."""
    c = make_consortium(range(12), SecAggParams(neighbours=4))
    server = c.server(vector_size=50)
    with pytest.raises(TooFewSurvivorsError) as info:
        run_round(server, c.hospitals, make_inputs(c.ids, 50), dropouts={"share": set(range(6))})
    assert (info.value.stage, info.value.threshold) == ("share", 7)


def test_group_mask_off_lets_the_server_decode_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = SecAggParams(group_mask=False)
    with caplog.at_level(logging.WARNING):
        c = make_consortium([1, 2, 3], params)
    assert "group mask is OFF" in caplog.text
    inputs = make_inputs(c.ids, 100)
    report = run_round(c.server(vector_size=100), c.hospitals, inputs)
    server_view, _ = decode_aggregate(report.aggregate, params=params)
    assert report.result is not None
    np.testing.assert_array_equal(server_view.mean, report.result.mean)


def test_group_mask_on_the_server_cannot_decode() -> None:
    c = make_consortium([1, 2, 3])
    report = run_round(c.server(vector_size=100), c.hospitals, make_inputs(c.ids, 100))
    with pytest.raises(ConfigError, match="consortium key"):
        decode_aggregate(report.aggregate, params=c.params)
    with pytest.raises(DecryptionError):
        decode_aggregate(report.aggregate, params=c.params, consortium_key=b"\x01" * 32)


def test_upload_is_about_one_times_float32() -> None:
    c = make_consortium(range(10))
    report = run_round(c.server(vector_size=50_000), c.hospitals, make_inputs(c.ids, 50_000))
    for hid in c.ids:
        assert report.bytes_up[hid] / (50_000 * 4) < 1.1
        assert report.protect_seconds(hid) > 0


def test_caller_mistakes() -> None:
    c = make_consortium([1, 2, 3], SecAggParams(max_examples=100))
    x = np.zeros(10)
    with pytest.raises(ValueError, match="expects 10"):
        run_round(c.server(vector_size=10), c.hospitals, {i: (np.zeros(9), 5) for i in c.ids})
    with pytest.raises(ConfigError, match="max_examples"):
        run_round(c.server(vector_size=10), c.hospitals, {i: (x, 101) for i in c.ids})
    with pytest.raises(ValueError, match="unknown stages"):
        run_round(c.server(vector_size=10), c.hospitals, {}, dropouts={"nope": {1}})
    with pytest.raises(ConfigError, match="registered"):
        SecAggServer(
            RoundConfig(round=1, hospital_ids=(1, 2, 9), vector_size=3, params=c.params),
            registry=c.registry,
        )


def test_round_survives_stateless_hosts_via_export_import() -> None:
    """Like a Flower ClientApp: a new hospital object for every message, state carried over."""
    c = make_consortium(range(5))
    inputs = make_inputs(c.ids, P)
    hospitals = dict(c.hospitals)

    def fresh(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if d == "request":
            state = hospitals[hid].export_state()
            new = SecAggHospital(
                hid,
                signing_key=c.signing[hid],
                registry=c.registry,
                params=c.params,
                consortium_key=c.consortium_key,
            )
            new.import_state(state)
            hospitals[hid] = new
        return msg

    server = c.server(vector_size=P)
    report = run_round(server, hospitals, inputs, intercept=fresh, dropouts={"unmask": {4}})
    check_against_plain(report, inputs, c.ids, c.params)
    assert hospitals[0].last_round == 1
    with pytest.raises(ProtocolError, match="another hospital"):
        hospitals[1].import_state(hospitals[0].export_state())
    old = hospitals[0].export_state()
    run_round(c.server(vector_size=P), hospitals, inputs)
    with pytest.raises(ProtocolError, match="older"):
        hospitals[0].import_state(old)


def test_last_round_persisted_across_runs_refuses_old_rounds() -> None:
    c = make_consortium(range(3))
    h = SecAggHospital(
        0,
        signing_key=c.signing[0],
        registry=c.registry,
        params=c.params,
        consortium_key=c.consortium_key,
        last_round=5,
    )
    with pytest.raises(ReplayError, match="not newer"):
        h.stage_advertise(c.server(vector_size=P).request_advertise()[0])


def test_nonce_separates_runs_that_reuse_a_round_number() -> None:
    params = SecAggParams()
    a = RoundConfig(round=1, hospital_ids=(1, 2, 3), vector_size=4, params=params)
    b = RoundConfig(round=1, hospital_ids=(1, 2, 3), vector_size=4, params=params)
    assert a.nonce != b.nonce and a.session != b.session
    with pytest.raises(ConfigError, match="nonce"):
        RoundConfig(round=1, hospital_ids=(1, 2, 3), vector_size=4, params=params, nonce="xy")


def test_five_hospitals_one_gone_before_its_masked_input_leaves_four_contributors() -> None:
    """The issue's scenario (``--clients 5 --drop 2@1:masked_input``) at the protocol level:
    the default t = 4 of 5 recovers the sum of the other four."""
    c = make_consortium(range(5))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    report = run_round(server, c.hospitals, inputs, dropouts={"masked_input": {2}})
    check_against_plain(report, inputs, [0, 1, 3, 4], c.params)
    assert report.result is not None and report.result.num_updates == 4


def test_a_missed_aggregate_is_accepted_only_for_the_expected_round() -> None:
    """A catch-up: after round 2, round 1's aggregate unprotects only as the expected one."""
    c = make_consortium([1, 2, 3])
    first = run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P, seed=1))
    run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P, seed=2))
    h = c.hospitals[c.ids[0]]
    with pytest.raises(ReplayError):
        h.unprotect(first.aggregate)  # older than the newest round it joined
    with pytest.raises(ReplayError, match="expected round 2"):
        h.unprotect_missed(first.aggregate, expected_round=2)
    assert first.result is not None
    np.testing.assert_array_equal(
        h.unprotect_missed(first.aggregate, expected_round=1).mean, first.result.mean
    )
