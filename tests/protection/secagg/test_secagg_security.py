"""Security properties of secagg: uniformity, tamper and replay detection, no server secrets."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import pytest
from _secagg_helpers import make_consortium, make_inputs, plain_fedavg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcrypt.exceptions import ConfigError, DropoutError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import (
    STAGES,
    ConsistencyError,
    ReplayError,
    SecAggHospital,
    SecAggParams,
    SecAggServer,
    ShareAuthenticationError,
    ShareVerificationError,
    SignatureError,
    TooFewSurvivorsError,
    ViewMismatchError,
    run_round,
)
from fedcrypt.protection.secagg.masking import quantize
from fedcrypt.protection.secagg.messages import _signed_digest
from fedcrypt.protection.secagg.primitives import agree

P = 64

# chi-square critical value for 255 degrees of freedom at significance 0.001
# (scipy.stats.chi2.ppf(0.999, 255) = 330.52; checked below when scipy is installed)
CHI2_CRIT_255_0001 = 330.52


def chi2_bytes(values: np.ndarray, shift: int) -> float:
    """Chi-square statistic of byte ``(v >> shift) & 0xFF`` against uniform over 256 bins."""
    counts = np.bincount(
        ((values >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64), minlength=256
    )
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_chi2_critical_value() -> None:
    stats = pytest.importorskip("scipy.stats")
    assert stats.chi2.ppf(0.999, 255) == pytest.approx(CHI2_CRIT_255_0001, abs=0.01)


def masked_vectors(group_mask: bool, size: int) -> tuple[np.ndarray, np.ndarray, dict[int, Any]]:
    """Hospital 0's masked upload and the server's aggregate for all-zero updates."""
    c = make_consortium(range(5), SecAggParams(group_mask=group_mask), seed=42)
    seen: dict[int, bytes] = {}

    def grab(stage: str, direction: str, hid: int, msg: bytes) -> bytes:
        if stage == "masked_input" and direction == "reply" and hid == 0:
            seen[hid] = msg
        return msg

    inputs = {i: (np.zeros(size), 100) for i in c.ids}
    report = run_round(c.server(vector_size=size), c.hospitals, inputs, intercept=grab)
    upload = np.frombuffer(wire.unpack(seen[0]).sections[0], dtype="<u4").astype(np.uint64)
    agg = np.frombuffer(wire.unpack(report.aggregate).sections[0], dtype="<u4").astype(np.uint64)
    return upload, agg, inputs


@pytest.mark.parametrize("shift", [0, 8, 16, 24])
def test_masked_update_is_uniform_over_z_2k(shift: int) -> None:
    upload, agg, _ = masked_vectors(True, 60_000)
    assert chi2_bytes(upload, shift) < CHI2_CRIT_255_0001
    # with the group mask, the server's aggregate is uniform too
    assert chi2_bytes(agg, shift) < CHI2_CRIT_255_0001


def test_chi2_has_power_on_unmasked_data() -> None:
    _, agg, _ = masked_vectors(False, 60_000)  # no group mask: aggregate is the plain sum
    assert chi2_bytes(agg, 24) > 100 * CHI2_CRIT_255_0001
    q = quantize(np.random.default_rng(0).normal(0, 1, 60_000), 10, SecAggParams())
    assert chi2_bytes(q.astype(np.uint64), 24) > 100 * CHI2_CRIT_255_0001


# -- tampering ---------------------------------------------------------------------------
def flip_at(fraction: float):  # type: ignore[no-untyped-def]
    def flip(msg: bytes) -> bytes:
        i = min(int(fraction * len(msg)), len(msg) - 1)
        return msg[:i] + bytes([msg[i] ^ 0x01]) + msg[i + 1 :]

    return flip


FRACTIONS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_tampered_request_is_refused_by_the_hospital(stage: str, fraction: float) -> None:
    c = make_consortium(range(4))
    flip = flip_at(fraction)

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        return flip(msg) if (s, d, hid) == (stage, "request", 2) else msg

    with pytest.raises(ProtocolError):
        run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P), intercept=tamper)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_tampered_reply_is_refused_and_the_round_completes_without_it(
    stage: str, fraction: float
) -> None:
    """4 hospitals, t = 3: the server refuses hospital 2's altered reply, 3 remain."""
    c = make_consortium(range(4))
    flip = flip_at(fraction)
    inputs = make_inputs(c.ids, P)

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        return flip(msg) if (s, d, hid) == (stage, "reply", 2) else msg

    server = c.server(vector_size=P)
    report = run_round(server, c.hospitals, inputs, intercept=tamper)
    assert set(report.rejected) == {2} and report.rejected[2].startswith(stage)
    assert isinstance(server.rejected[2], ProtocolError)
    in_sum = STAGES.index(stage) > STAGES.index("masked_input")  # its update was summed
    expected = list(c.ids) if in_sum else [0, 1, 3]
    assert report.survivors == tuple(expected)
    mean, total = plain_fedavg(inputs, expected)
    assert report.result is not None and report.result.total_examples == total
    assert np.abs(report.result.mean - mean).max() <= c.params.error_bound(len(expected), total)


def test_a_tampered_reply_with_too_few_left_fails_loudly() -> None:
    """3 hospitals, t = 3: one refused reply leaves 2, so the round aborts (DropoutError)."""
    c = make_consortium(range(3))

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        return flip_at(0.5)(msg) if (s, d, hid) == ("share", "reply", 1) else msg

    with pytest.raises(TooFewSurvivorsError, match=r"'share'.*hospital 1 refused") as info:
        run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P), intercept=tamper)
    assert isinstance(info.value, DropoutError)


def test_tampered_encrypted_share_fails_authentication() -> None:
    c = make_consortium(range(4))

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("masked_input", "request", 1):
            env = wire.unpack(msg)
            secs = [bytes(x) for x in env.sections]
            secs[0] = secs[0][:-1] + bytes([secs[0][-1] ^ 0x80])
            return wire.pack(env.header, secs)
        return msg

    with pytest.raises(ShareAuthenticationError):
        run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P), intercept=tamper)


def test_altered_request_is_caught_by_the_server() -> None:
    """A survivor list changed in transit still parses; the signed request digest exposes it."""
    c = make_consortium(range(5))
    inputs = make_inputs(c.ids, P)

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("consistency", "request", 0):
            env = wire.unpack(msg)
            return wire.pack({**env.header, "survivors": [0, 1, 2, 3]}, env.sections)
        return msg

    server = c.server(vector_size=P)
    report = run_round(server, c.hospitals, inputs, intercept=tamper)
    assert isinstance(server.rejected[0], ViewMismatchError)
    assert report.signers == (1, 2, 3, 4) and report.survivors == c.ids


def test_altered_unmask_request_is_refused_by_the_hospital() -> None:
    c = make_consortium(range(5))

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("unmask", "request", 0):
            env = wire.unpack(msg)
            return wire.pack({**env.header, "survivors": [0, 1, 2, 3]}, env.sections)
        return msg

    with pytest.raises(ConsistencyError, match="other than the one this hospital signed"):
        run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P), intercept=tamper)


def resign(msg: bytes, key: Ed25519PrivateKey, mutate) -> bytes:  # type: ignore[no-untyped-def]
    """A malicious but registered hospital: change the payload and sign it properly."""
    env = wire.unpack(msg)
    payload = [bytes(s) for s in env.sections[:-1]]
    mutate(payload)
    return wire.pack(env.header, [*payload, key.sign(_signed_digest(env.header, payload))])


def bump_first_share(payload: list[bytes]) -> None:
    payload[0] = (int.from_bytes(payload[0], "big") + 1).to_bytes(66, "big")


@pytest.mark.parametrize("dropout", [False, True])
def test_wrong_share_is_caught_by_commitment_or_public_key(dropout: bool) -> None:
    """A registered hospital reveals a wrong (validly signed) share in the unmask stage."""
    c = make_consortium(range(5))
    # Hospital 1's first revealed share is of hospital 0's secret: of the self-mask seed b_0
    # if 0 survived (checked against 0's commitment), of the mask key s_0 if 0 dropped out
    # (checked against 0's advertised public key).
    drops = {"masked_input": {0}} if dropout else {}

    def cheat(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("unmask", "reply", 1):
            return resign(msg, c.signing[1], bump_first_share)
        return msg

    with pytest.raises(ShareVerificationError):
        run_round(
            c.server(vector_size=P),
            c.hospitals,
            make_inputs(c.ids, P),
            intercept=cheat,
            dropouts=drops,
        )


# -- signatures --------------------------------------------------------------------------
def impostor_swap(c, target: int):  # type: ignore[no-untyped-def]
    """Replace ``target``'s advertise reply by one signed with an unregistered key."""
    impostor_key = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    impostor = SecAggHospital(
        target,
        signing_key=impostor_key,
        registry={**c.registry, target: impostor_key.public_key()},
        params=c.params,
        consortium_key=c.consortium_key,
    )
    forged = [b""]

    def swap(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("advertise", "request", target):
            forged[0] = impostor.stage_advertise(msg)
        if (s, d, hid) == ("advertise", "reply", target):
            return forged[0]
        return msg

    return swap


def test_reply_signed_by_an_unregistered_key_is_refused() -> None:
    c = make_consortium(range(4))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    report = run_round(server, c.hospitals, inputs, intercept=impostor_swap(c, 1))
    assert isinstance(server.rejected[1], SignatureError)
    assert "bad signature" in str(server.rejected[1])
    assert report.survivors == (0, 2, 3)
    # with 3 hospitals (t = 3) the round cannot complete without it: it fails loudly
    c3 = make_consortium(range(3))
    with pytest.raises(TooFewSurvivorsError, match="bad signature"):
        run_round(
            c3.server(vector_size=P),
            c3.hospitals,
            make_inputs(c3.ids, P),
            intercept=impostor_swap(c3, 1),
        )


def test_reply_from_unregistered_hospital_is_refused() -> None:
    c = make_consortium(range(4))

    def relabel(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("masked_input", "reply", 1):
            env = wire.unpack(msg)
            return wire.pack({**env.header, "sender": 99}, env.sections)
        return msg

    server = c.server(vector_size=P)
    report = run_round(server, c.hospitals, make_inputs(c.ids, P), intercept=relabel)
    assert isinstance(server.rejected[1], SignatureError)
    assert "unregistered" in str(server.rejected[1])
    assert report.survivors == (0, 2, 3)


def test_hospital_construction_checks_keys() -> None:
    c = make_consortium(range(3))
    other = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
    with pytest.raises(ConfigError, match="signing_key"):
        SecAggHospital(
            0, signing_key=other, registry=c.registry, params=c.params, consortium_key=b"k" * 32
        )
    with pytest.raises(ConfigError, match="consortium_key"):
        SecAggHospital(0, signing_key=c.signing[0], registry=c.registry, params=c.params)
    with pytest.raises(ConfigError, match="consortium_key"):
        SecAggHospital(
            0, signing_key=c.signing[0], registry=c.registry, params=c.params, consortium_key=b"s"
        )


def test_hospital_refuses_other_parameters_or_an_uninvited_round() -> None:
    c = make_consortium(range(4))
    other = make_consortium(range(4), SecAggParams(clip=2.0))
    other.registry = c.registry
    with pytest.raises(ProtocolError, match="parameters"):
        run_round(other.server(vector_size=P), c.hospitals, make_inputs(c.ids, P))
    c2 = make_consortium(range(4))
    c2.ids = (0, 1, 2)
    server = c2.server(vector_size=P)
    reqs = server.request_advertise()
    with pytest.raises(ProtocolError, match="not invited"):
        c2.hospitals[3].stage_advertise(reqs[0])


# -- replay ------------------------------------------------------------------------------
def record_round(c, inputs):  # type: ignore[no-untyped-def]
    log: dict[tuple[str, str, int], bytes] = {}

    def rec(s: str, d: str, hid: int, msg: bytes) -> bytes:
        log[(s, d, hid)] = msg
        return msg

    report = run_round(c.server(vector_size=P), c.hospitals, inputs, intercept=rec)
    return log, report


@pytest.mark.parametrize("stage", STAGES)
def test_request_replayed_from_an_earlier_round_is_refused(stage: str) -> None:
    c = make_consortium(range(4))
    inputs = make_inputs(c.ids, P)
    old, _ = record_round(c, inputs)

    def replay(s: str, d: str, hid: int, msg: bytes) -> bytes:
        return old[(s, d, hid)] if (s, d, hid) == (stage, "request", 2) else msg

    with pytest.raises(ReplayError):
        run_round(c.server(vector_size=P), c.hospitals, inputs, intercept=replay)


@pytest.mark.parametrize("stage", STAGES)
def test_reply_replayed_from_an_earlier_round_is_refused(stage: str) -> None:
    c = make_consortium(range(4))
    inputs = make_inputs(c.ids, P)
    old, _ = record_round(c, inputs)

    def replay(s: str, d: str, hid: int, msg: bytes) -> bytes:
        return old[(s, d, hid)] if (s, d, hid) == (stage, "reply", 2) else msg

    server = c.server(vector_size=P)
    run_round(server, c.hospitals, inputs, intercept=replay)
    assert isinstance(server.rejected[2], ReplayError)
    assert "round 1, this is round 2" in str(server.rejected[2])


def test_a_stage_answered_twice_is_a_replay() -> None:
    c = make_consortium(range(3))
    server = c.server(vector_size=P)
    adv = server.request_advertise()
    replies = {i: c.hospitals[i].stage_advertise(adv[i]) for i in c.ids}
    with pytest.raises(ReplayError, match="not newer"):
        c.hospitals[1].stage_advertise(adv[1])
    reqs = server.receive_advertise(replies)
    c.hospitals[0].stage_share(reqs[0])
    with pytest.raises(ReplayError, match="already answered"):
        c.hospitals[0].stage_share(reqs[0])


def test_old_aggregate_is_rejected() -> None:
    c = make_consortium(range(3))
    inputs = make_inputs(c.ids, P)
    _, first = record_round(c, inputs)
    _, second = record_round(c, inputs)
    c.hospitals[0].unprotect(second.aggregate)
    with pytest.raises(ReplayError):
        c.hospitals[0].unprotect(first.aggregate)


# -- what the server holds ---------------------------------------------------------------
def reachable(obj: object) -> list[object]:
    seen: set[int] = set()
    out: list[object] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        out.append(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        elif dataclasses.is_dataclass(o) or hasattr(o, "__dict__"):
            if hasattr(o, "__dict__") and not isinstance(o, type):
                stack.extend(vars(o).values())
    return out


def test_server_never_holds_a_secret() -> None:
    c = make_consortium(range(5))
    inputs = make_inputs(c.ids, P)
    server = c.server(vector_size=P)
    # hospital 3 drops after sharing keys: the server must reconstruct its mask key
    run_round(server, c.hospitals, inputs, dropouts={"masked_input": {3}})
    params = inspect.signature(SecAggServer.__init__).parameters
    assert set(params) == {"self", "config", "registry", "clock", "stage_timeout"}
    secrets_ = {s for s in c.rng.outputs if len(s) == 32}  # signing, consortium, X25519, seeds
    assert c.consortium_key in secrets_
    secret_ints = {int.from_bytes(s, "big") for s in secrets_}
    for o in reachable(server):
        assert not isinstance(o, X25519PrivateKey | Ed25519PrivateKey), o
        if isinstance(o, bytes | bytearray | memoryview):
            assert bytes(o) not in secrets_
        if isinstance(o, int):
            assert o not in secret_ints


def test_hospital_erases_round_secrets() -> None:
    c = make_consortium(range(3))
    run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P))
    st = c.hospitals[0]._round
    assert st is not None
    assert st.mask_key is None and st.enc_key is None and st.seed is None
    assert st.received == {} and st.own_shares == (0, 0)


def test_low_order_x25519_key_is_a_protocol_error() -> None:
    zero = X25519PublicKey.from_public_bytes(bytes(32))
    with pytest.raises(ProtocolError, match="low-order"):
        agree(X25519PrivateKey.generate(), zero, info=b"x", salt=b"s")
