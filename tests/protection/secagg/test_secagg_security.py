"""Security properties of secagg: uniformity, tamper and replay detection, no server secrets."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import pytest
from _secagg_helpers import make_consortium, make_inputs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcrypt.exceptions import ConfigError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import (
    STAGES,
    ReplayError,
    SecAggHospital,
    SecAggParams,
    SecAggServer,
    ShareAuthenticationError,
    ShareVerificationError,
    SignatureError,
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


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("direction", ["request", "reply"])
@pytest.mark.parametrize("stage", STAGES)
def test_tampering_with_any_message_is_detected(
    stage: str, direction: str, fraction: float
) -> None:
    c = make_consortium(range(4))
    flip = flip_at(fraction)

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        return flip(msg) if (s, d, hid) == (stage, direction, 2) else msg

    with pytest.raises(ProtocolError):
        run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P), intercept=tamper)


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

    def tamper(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("unmask", "request", 0):
            env = wire.unpack(msg)
            return wire.pack({**env.header, "survivors": [0, 1, 2, 3]}, env.sections)
        return msg

    with pytest.raises(ViewMismatchError):
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
def test_reply_signed_by_another_key_is_rejected() -> None:
    c = make_consortium(range(3))
    impostor_key = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    impostor = SecAggHospital(
        1,
        signing_key=impostor_key,
        registry={**c.registry, 1: impostor_key.public_key()},
        params=c.params,
        consortium_key=c.consortium_key,
    )

    def swap(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("advertise", "request", 1):
            impostor_reply[0] = impostor.stage_advertise(msg)
        if (s, d, hid) == ("advertise", "reply", 1):
            return impostor_reply[0]
        return msg

    impostor_reply = [b""]
    with pytest.raises(SignatureError, match="bad signature"):
        run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P), intercept=swap)


def test_reply_from_unregistered_hospital_is_rejected() -> None:
    c = make_consortium(range(3))

    def relabel(s: str, d: str, hid: int, msg: bytes) -> bytes:
        if (s, d, hid) == ("advertise", "reply", 1):
            env = wire.unpack(msg)
            return wire.pack({**env.header, "sender": 99}, env.sections)
        return msg

    with pytest.raises(SignatureError, match="unregistered"):
        run_round(c.server(vector_size=P), c.hospitals, make_inputs(c.ids, P), intercept=relabel)


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


@pytest.mark.parametrize("direction", ["request", "reply"])
@pytest.mark.parametrize("stage", STAGES)
def test_replay_from_an_earlier_round_is_rejected(stage: str, direction: str) -> None:
    c = make_consortium(range(4))
    inputs = make_inputs(c.ids, P)
    old, _ = record_round(c, inputs)

    def replay(s: str, d: str, hid: int, msg: bytes) -> bytes:
        return old[(s, d, hid)] if (s, d, hid) == (stage, direction, 2) else msg

    with pytest.raises(ReplayError):
        run_round(c.server(vector_size=P), c.hospitals, inputs, intercept=replay)


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
    assert set(params) == {"self", "config", "registry"}
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
