"""Bad input at the server: each refused with its documented error; the round goes on or fails."""

from __future__ import annotations

import numpy as np
import pytest
from _secagg_helpers import make_consortium, make_inputs, plain_fedavg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcrypt.exceptions import ConfigError, DropoutError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import (
    DeadlineError,
    ReplayError,
    SecAggServer,
    SessionMismatchError,
    ShareAuthenticationError,
    SignatureError,
    TooFewSurvivorsError,
)
from fedcrypt.protection.secagg.messages import _signed_digest, pack_request

P = 64


class FakeClock:
    """Injectable monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finish(server: SecAggServer, c, inputs, requests):  # type: ignore[no-untyped-def]
    """Run the remaining stages honestly from ``requests`` (share stage onwards)."""
    h = c.hospitals
    requests = server.receive_advertise(requests)
    requests = server.receive_share({i: h[i].stage_share(r) for i, r in requests.items()})
    requests = server.receive_masked_input(
        {
            i: h[i].stage_masked_input(r, update=inputs[i][0], num_examples=inputs[i][1])
            for i, r in requests.items()
        }
    )
    requests = server.receive_consistency(
        {i: h[i].stage_consistency(r) for i, r in requests.items()}
    )
    aggregate = server.receive_unmask({i: h[i].stage_unmask(r) for i, r in requests.items()})
    return h[0].unprotect(aggregate)


def check_mean(result, inputs, ids, params) -> None:  # type: ignore[no-untyped-def]
    mean, total = plain_fedavg(inputs, ids)
    assert result.total_examples == total and result.num_updates == len(ids)
    assert np.abs(result.mean - mean).max() <= params.error_bound(len(ids), total)


# -- answers after the deadline ----------------------------------------------------------
def test_an_answer_after_the_deadline_is_refused_and_the_round_completes_without_it() -> None:
    c = make_consortium(range(4))
    inputs = make_inputs(c.ids, P)
    clock = FakeClock()
    server = c.server(vector_size=P)
    server = SecAggServer(server.config, registry=c.registry, clock=clock, stage_timeout=30.0)
    reqs = server.request_advertise()
    assert server.deadline == 1030.0
    replies = {i: c.hospitals[i].stage_advertise(reqs[i]) for i in c.ids}
    clock.now = 1010.0
    for i in (0, 1, 2):
        server.submit(i, replies[i])
    assert server.awaiting == (3,)
    clock.now = 1031.5
    with pytest.raises(DeadlineError, match=r"1\.5 s after the deadline") as info:
        server.submit(3, replies[3])
    assert info.value.late_by == pytest.approx(1.5)
    assert isinstance(server.rejected[3], DeadlineError)
    result = finish(server, c, inputs, {})  # close the advertise stage with what arrived
    check_mean(result, inputs, [0, 1, 2], c.params)


def test_answers_after_the_deadline_below_the_threshold_fail_loudly() -> None:
    c = make_consortium(range(4))
    clock = FakeClock()
    cfg = c.server(vector_size=P).config
    server = SecAggServer(cfg, registry=c.registry, clock=clock, stage_timeout=5.0)
    reqs = server.request_advertise()
    replies = {i: c.hospitals[i].stage_advertise(reqs[i]) for i in c.ids}
    clock.now += 6.0
    with pytest.raises(TooFewSurvivorsError, match="after the deadline") as info:
        server.receive_advertise(replies)
    assert isinstance(info.value, DropoutError)
    assert {type(r.error) for r in server.rejections} == {DeadlineError}
    assert server.stage == "aborted"


def test_each_stage_gets_a_fresh_deadline() -> None:
    c = make_consortium(range(3))
    clock = FakeClock()
    cfg = c.server(vector_size=P).config
    server = SecAggServer(cfg, registry=c.registry, clock=clock, stage_timeout=5.0)
    reqs = server.request_advertise()
    clock.now += 4.0
    reqs = server.receive_advertise({i: c.hospitals[i].stage_advertise(reqs[i]) for i in c.ids})
    assert server.deadline == clock.now + 5.0
    clock.now += 4.0  # 8 s into the round, 4 s into this stage
    server.receive_share({i: c.hospitals[i].stage_share(reqs[i]) for i in c.ids})
    assert server.rejections == []


def test_stage_timeout_must_be_positive() -> None:
    c = make_consortium(range(3))
    with pytest.raises(ConfigError, match="stage_timeout"):
        SecAggServer(c.server(vector_size=P).config, registry=c.registry, stage_timeout=0)


# -- replayed stage messages -------------------------------------------------------------
def test_a_reply_submitted_twice_or_to_another_stage_is_a_replay() -> None:
    c = make_consortium(range(4))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    reqs = server.request_advertise()
    adv = {i: c.hospitals[i].stage_advertise(reqs[i]) for i in c.ids}
    server.submit(0, adv[0])
    with pytest.raises(ReplayError, match="already answered"):
        server.submit(0, adv[0])
    for i in (1, 2, 3):
        server.submit(i, adv[i])
    share_reqs = server.receive_advertise()
    with pytest.raises(ReplayError, match="stage 'advertise', expected 'share'"):
        server.submit(2, adv[2])  # stage-0 message replayed in stage 1
    replies = {i: c.hospitals[i].stage_share(share_reqs[i]) for i in (0, 1, 3)}
    reqs = server.receive_share(replies)  # 2's real share never arrived: it dropped out
    assert set(reqs) == {0, 1, 3}
    h = c.hospitals
    reqs = server.receive_masked_input(
        {
            i: h[i].stage_masked_input(r, update=inputs[i][0], num_examples=inputs[i][1])
            for i, r in reqs.items()
        }
    )
    reqs = server.receive_consistency({i: h[i].stage_consistency(r) for i, r in reqs.items()})
    check_mean(
        h[0].unprotect(server.receive_unmask({i: h[i].stage_unmask(r) for i, r in reqs.items()})),
        inputs,
        [0, 1, 3],
        c.params,
    )
    assert [type(r.error) for r in server.rejections] == [ReplayError, ReplayError]


def test_a_reply_from_a_hospital_never_asked_is_refused() -> None:
    c = make_consortium(range(4))
    server = c.server(vector_size=P)
    reqs = server.request_advertise()
    adv = {i: c.hospitals[i].stage_advertise(reqs[i]) for i in c.ids}
    server.receive_advertise({i: adv[i] for i in (0, 1, 2)})  # 3 dropped out
    with pytest.raises(ProtocolError, match="not asked"):
        server.submit(3, adv[3])  # 3 was not sent a share request


# -- a reply signed by an unregistered key -----------------------------------------------
def test_submit_refuses_a_reply_signed_by_an_unregistered_key() -> None:
    c = make_consortium(range(4))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    reqs = server.request_advertise()
    adv = {i: c.hospitals[i].stage_advertise(reqs[i]) for i in c.ids}
    outsider = Ed25519PrivateKey.from_private_bytes(b"\x42" * 32)
    env = wire.unpack(adv[1])
    payload = [bytes(s) for s in env.sections[:-1]]
    forged = wire.pack(env.header, [*payload, outsider.sign(_signed_digest(env.header, payload))])
    with pytest.raises(SignatureError, match="bad signature"):
        server.submit(1, forged)
    # the genuine reply may still arrive in time and counts
    server.submit(1, adv[1])
    check_mean(finish(server, c, inputs, {i: adv[i] for i in (0, 2, 3)}), inputs, c.ids, c.params)


# -- shares (and other replies) for another session --------------------------------------
def two_sessions():  # type: ignore[no-untyped-def]
    """The same consortium (same keys) in two sessions of round 1 (e.g. two runs)."""
    a = make_consortium(range(4), seed=3)
    b = make_consortium(range(4), seed=3)
    assert a.registry[1].public_bytes_raw() == b.registry[1].public_bytes_raw()
    return a, a.server(vector_size=P), b, b.server(vector_size=P)


def test_shares_for_another_session_are_refused_by_the_server() -> None:
    a, server_a, b, server_b = two_sessions()
    assert server_a.config.round == server_b.config.round == 1
    assert server_a.config.session != server_b.config.session
    inputs = make_inputs(a.ids, P)
    ra = server_a.request_advertise()
    rb = server_b.request_advertise()
    ra = server_a.receive_advertise({i: a.hospitals[i].stage_advertise(ra[i]) for i in a.ids})
    rb = server_b.receive_advertise({i: b.hospitals[i].stage_advertise(rb[i]) for i in b.ids})
    foreign = b.hospitals[2].stage_share(rb[2])  # validly signed by hospital 2, session B
    with pytest.raises(SessionMismatchError, match="another session"):
        server_a.submit(2, foreign)
    replies = {i: a.hospitals[i].stage_share(ra[i]) for i in (0, 1, 3)}
    reqs = server_a.receive_share(replies)
    h = a.hospitals
    reqs = server_a.receive_masked_input(
        {
            i: h[i].stage_masked_input(r, update=inputs[i][0], num_examples=inputs[i][1])
            for i, r in reqs.items()
        }
    )
    reqs = server_a.receive_consistency({i: h[i].stage_consistency(r) for i, r in reqs.items()})
    aggregate = server_a.receive_unmask({i: h[i].stage_unmask(r) for i, r in reqs.items()})
    check_mean(h[0].unprotect(aggregate), inputs, [0, 1, 3], a.params)


def test_shares_for_another_session_are_refused_by_the_hospital() -> None:
    """A server forwarding an encrypted share of session B into session A: AEAD fails."""
    a, server_a, b, server_b = two_sessions()
    ra = server_a.request_advertise()
    rb = server_b.request_advertise()
    ra = server_a.receive_advertise({i: a.hospitals[i].stage_advertise(ra[i]) for i in a.ids})
    rb = server_b.receive_advertise({i: b.hospitals[i].stage_advertise(rb[i]) for i in b.ids})
    ra = server_a.receive_share({i: a.hospitals[i].stage_share(ra[i]) for i in a.ids})
    rb = server_b.receive_share({i: b.hospitals[i].stage_share(rb[i]) for i in b.ids})
    env_a, env_b = wire.unpack(ra[0]), wire.unpack(rb[0])
    mixed = pack_request(
        "masked_input",
        round_=1,
        session=server_a.config.session,
        extra={"senders": env_a.header["senders"]},
        sections=[env_b.sections[0], *env_a.sections[1:]],
    )
    with pytest.raises(ShareAuthenticationError):
        a.hospitals[0].stage_masked_input(mixed, update=np.zeros(P), num_examples=5)


def test_a_request_for_another_session_is_refused_by_the_hospital() -> None:
    a, server_a, b, server_b = two_sessions()
    ra = server_a.request_advertise()
    rb = server_b.request_advertise()
    server_a.receive_advertise({i: a.hospitals[i].stage_advertise(ra[i]) for i in a.ids})
    rb = server_b.receive_advertise({i: b.hospitals[i].stage_advertise(rb[i]) for i in b.ids})
    with pytest.raises(SessionMismatchError):
        a.hospitals[0].stage_share(rb[0])


def test_advertised_keys_of_another_session_are_refused_by_the_hospital() -> None:
    """Advertised keys are signed with the session and round: a server cannot splice in a
    (validly signed) advertisement of another session to control a hospital's peers."""
    a, server_a, b, server_b = two_sessions()
    ra = server_a.request_advertise()
    rb = server_b.request_advertise()
    ra = server_a.receive_advertise({i: a.hospitals[i].stage_advertise(ra[i]) for i in a.ids})
    rb = server_b.receive_advertise({i: b.hospitals[i].stage_advertise(rb[i]) for i in b.ids})
    env_a, env_b = wire.unpack(ra[0]), wire.unpack(rb[0])
    spliced = pack_request(
        "share",
        round_=1,
        session=server_a.config.session,
        extra={"senders": env_a.header["senders"]},
        sections=[*env_a.sections[:3], env_b.sections[3]],  # hospital 3's keys from session B
    )
    with pytest.raises(SessionMismatchError, match="hospital 3 is for another session"):
        a.hospitals[0].stage_share(spliced)
