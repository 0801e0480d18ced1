"""A malicious server attacks through the protocol's API: it must recover no update.

The attack a review found against the semi-honest protocol: the server gives the target
only ``t - 1`` peers in stage 2 and then tells each hospital a different survivor list,
so that ``t`` hospitals reveal shares of the target's self-mask seed ``b_0`` (they were
told 0 survived) while ``t`` hospitals reveal the mask keys ``s_1, s_2`` of the target's
only peers (they were told 1 and 2 dropped out). With the group mask on, the consortium
key of any one hospital then removes the last mask. The attacker below does exactly that;
``recover`` is everything it can compute from what it collected.

Each test states what the attacker got and checks, with the same code, that the attack
*does* work when the hospitals skip the consistency check (so a pass is not vacuous).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from _secagg_helpers import Consortium, make_consortium, make_inputs
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray

from fedcrypt.exceptions import ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import (
    ConsistencyError,
    RoundConfig,
    SecAggHospital,
    SecAggParams,
    SecAggServer,
    TooFewSurvivorsError,
    shamir,
)
from fedcrypt.protection.secagg.hospital import raw_public
from fedcrypt.protection.secagg.masking import (
    Masker,
    group_mask_key,
    pairwise_key,
    quantize,
    self_mask_key,
)
from fedcrypt.protection.secagg.messages import consistency_message, pack_request
from fedcrypt.protection.secagg.primitives import commit

P = 256
TARGET = 0


@dataclass
class Loot:
    """What the malicious server holds at the end."""

    config: RoundConfig
    adverts: dict[int, bytes] = field(default_factory=dict)  # mask public keys c_i^PK
    commitments: dict[int, bytes] = field(default_factory=dict)
    masked: dict[int, NDArray[np.unsignedinteger]] = field(default_factory=dict)
    b_shares: dict[int, dict[int, int]] = field(default_factory=dict)  # owner -> {x: share}
    s_shares: dict[int, dict[int, int]] = field(default_factory=dict)
    known_mask_keys: dict[int, X25519PrivateKey] = field(default_factory=dict)  # colluders
    consortium_key: bytes | None = None
    target_peers: tuple[int, ...] = ()

    def add_shares(self, holder: int, owners: Sequence[int], kinds: str, values: Sequence[int]):  # type: ignore[no-untyped-def]
        for owner, kind, value in zip(owners, kinds, values, strict=True):
            target = self.b_shares if kind == "b" else self.s_shares
            target.setdefault(owner, {})[holder + 1] = value


def _combine(shares: Mapping[int, int] | None, t: int) -> bytes | None:
    if shares is None or len(shares) < t:
        return None
    value = shamir.combine({x: shares[x] for x in sorted(shares)[:t]})
    return value.to_bytes(32, "big") if value < 1 << 256 else None


def recover(loot: Loot, target: int) -> NDArray[np.unsignedinteger] | None:
    """The attacker's best effort: ``q_target`` (quantized update + count), or None."""
    cfg = loot.config
    session = bytes.fromhex(cfg.session)
    seed = _combine(loot.b_shares.get(target), cfg.t)
    if seed is None or commit(seed, session=session, owner=target) != loot.commitments[target]:
        return None
    y = loot.masked[target].copy()
    masker = Masker(y.shape[0], cfg.params.bits)
    masker.apply(y, self_mask_key(seed, session=session, owner=target), sign=-1)

    def mask_key_of(owner: int) -> X25519PrivateKey | None:
        if owner in loot.known_mask_keys:
            return loot.known_mask_keys[owner]
        raw = _combine(loot.s_shares.get(owner), cfg.t)
        if raw is None:
            return None
        key = X25519PrivateKey.from_private_bytes(raw)
        return key if raw_public(key) == loot.adverts[owner] else None

    for j in loot.target_peers:
        s_j, s_t = mask_key_of(j), mask_key_of(target)
        if s_j is not None:
            pk = X25519PublicKey.from_public_bytes(loot.adverts[target])
            key = pairwise_key(s_j, pk, session=session, a=target, b=j)
        elif s_t is not None:
            pk = X25519PublicKey.from_public_bytes(loot.adverts[j])
            key = pairwise_key(s_t, pk, session=session, a=target, b=j)
        else:
            return None
        masker.apply(y, key, sign=-1 if target < j else 1)
    if cfg.params.group_mask:
        if loot.consortium_key is None:
            return None
        gkey = group_mask_key(
            loot.consortium_key,
            nonce=cfg.nonce,
            invited=cfg.hospital_ids,
            round_=cfg.round,
            owner=target,
            size=y.shape[0],
        )
        masker.apply(y, gkey, sign=-1)
    return y


def truth(inputs: Mapping[int, tuple[np.ndarray, int]], params: SecAggParams) -> np.ndarray:
    x, n = inputs[TARGET]
    return quantize(np.asarray(x, dtype=np.float64).copy(), n, params)


def _sections(reply: bytes) -> list[bytes]:
    return [bytes(s) for s in wire.unpack(reply).sections[:-1]]  # drop the reply signature


@dataclass
class Attack:
    """A malicious server driving the honest hospitals of ``c`` through the protocol API."""

    c: Consortium
    inputs: dict[int, tuple[np.ndarray, int]]
    colluder: int | None = None  # hands the server every secret it has
    key_leaker: int | None = None  # hands the server only the consortium key
    errors: dict[int, Exception] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = self.c.server(vector_size=P)
        self.cfg = self.server.config
        self.loot = Loot(config=self.cfg)
        if self.colluder is not None or self.key_leaker is not None:
            self.loot.consortium_key = self.c.consortium_key
        self.honest = [i for i in self.c.ids if i != self.colluder]

    def _ask(self, hid: int, call, *args, **kwargs) -> bytes | None:  # type: ignore[no-untyped-def]
        try:
            return call(*args, **kwargs)
        except ProtocolError as exc:  # an honest hospital refusing: what we want to see
            self.errors[hid] = exc
        except TooFewSurvivorsError as exc:
            self.errors[hid] = exc
        return None

    def setup(self, *, target_peers: Sequence[int]) -> None:
        """Stages 0-2, honestly except that the target gets only ``target_peers``."""
        c, cfg = self.c, self.cfg
        reqs = self.server.request_advertise()
        adv = {i: c.hospitals[i].stage_advertise(reqs[i]) for i in c.ids}
        self.loot.adverts = {i: _sections(adv[i])[0] for i in c.ids}
        reqs = self.server.receive_advertise(adv)
        shares = {i: c.hospitals[i].stage_share(reqs[i]) for i in c.ids}
        self.loot.commitments = {i: _sections(shares[i])[0] for i in c.ids}
        if self.colluder is not None:
            st = c.hospitals[self.colluder]._round
            assert st is not None and st.mask_key is not None
            self.loot.known_mask_keys[self.colluder] = st.mask_key
        reqs = self.server.receive_share(shares)
        env = wire.unpack(reqs[TARGET])
        senders = list(env.header["senders"])
        keep = [k for k, s in enumerate(senders) if s in target_peers]
        reqs[TARGET] = pack_request(
            "masked_input",
            round_=cfg.round,
            session=cfg.session,
            extra={"senders": [senders[k] for k in keep]},
            sections=[env.sections[k] for k in keep],
        )
        self.loot.target_peers = tuple(sorted(target_peers))
        for i in c.ids:
            x, n = self.inputs[i]
            rep = self._ask(i, c.hospitals[i].stage_masked_input, reqs[i], update=x, num_examples=n)
            if rep is not None:
                self.loot.masked[i] = np.frombuffer(_sections(rep)[0], dtype="<u4").copy()
        if self.colluder is not None:
            st = c.hospitals[self.colluder]._round
            assert st is not None
            me = self.colluder
            owners = [*sorted(st.received), me]
            for idx, kind in enumerate("bs"):
                vals = [st.received[o][idx] for o in owners[:-1]]
                vals.append(st.own_shares[idx])
                self.loot.add_shares(me, owners, kind * len(owners), vals)

    def survivor_views(self, views: Mapping[int, Sequence[int]], *, forward: str) -> None:
        """Stages 3-4: tell each hospital its own survivor list, then ask for shares.

        ``forward="matching"``: each hospital gets the signatures the server holds over
        its list (the colluder signs any list); ``"all"``: for every member of its list,
        that member's signature, whichever list it signed.
        """
        c, cfg = self.c, self.cfg
        signed: dict[int, tuple[tuple[int, ...], bytes]] = {}
        for i, view in views.items():
            u3 = tuple(sorted(view))
            if i == self.colluder:
                continue
            req = pack_request(
                "consistency", round_=cfg.round, session=cfg.session, extra={"survivors": list(u3)}
            )
            rep = self._ask(i, c.hospitals[i].stage_consistency, req)
            if rep is not None:
                signed[i] = (u3, _sections(rep)[0])
        for i, (u3, _) in list(signed.items()):
            if forward == "matching":
                sigs = {j: s for j, (v, s) in signed.items() if v == u3}
            else:
                sigs = {j: s for j, (_, s) in signed.items()}
            if self.colluder is not None:
                msg = consistency_message(cfg.session, cfg.round, u3)
                sigs[self.colluder] = c.signing[self.colluder].sign(msg)
            signers = sorted(set(sigs) & set(u3))
            req = pack_request(
                "unmask",
                round_=cfg.round,
                session=cfg.session,
                extra={"survivors": list(u3), "signers": signers},
                sections=[sigs[j] for j in signers],
            )
            rep = self._ask(i, c.hospitals[i].stage_unmask, req)
            if rep is not None:
                hdr = wire.unpack(rep).header
                values = [shamir.decode(s) for s in _sections(rep)]
                self.loot.add_shares(i, hdr["owners"], hdr["kinds"], values)


REVIEW_VIEWS = {0: (0, 1, 2), 1: (0, 1, 3, 4), 2: (0, 2, 3, 4), 3: (0, 3, 4), 4: (0, 3, 4)}
"""The review's survivor lists (5 hospitals, t = 3): 0, 1, 2 and 3 reveal b_0; 2, 3, 4
reveal s_1; 1, 3, 4 reveal s_2 -- every list passes the subset and size checks."""


def review_attack(*, check: bool, forward: str, monkeypatch: pytest.MonkeyPatch) -> Attack:
    """The review's attack at its threshold t = 3 of 5 (colluders = 0; the consistency
    check must stop an active server alone), hospital 4 leaking the consortium key."""
    if not check:
        monkeypatch.setattr(SecAggHospital, "_check_consistency", lambda self, st, env: None)
    c = make_consortium(range(5), SecAggParams(colluders=0), seed=5)
    inputs = make_inputs(c.ids, P, seed=6)
    attack = Attack(c, inputs, key_leaker=4)
    assert attack.cfg.t == 3
    attack.setup(target_peers=(1, 2))  # t - 1 peers
    attack.survivor_views(REVIEW_VIEWS, forward=forward)
    return attack


def test_the_attack_works_without_the_consistency_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: hospitals that do not verify signatures hand the server hospital 0's update."""
    attack = review_attack(check=False, forward="matching", monkeypatch=monkeypatch)
    assert attack.errors == {}
    got = recover(attack.loot, TARGET)
    assert got is not None
    expected = truth(attack.inputs, attack.c.params)
    np.testing.assert_array_equal(got, expected)  # update and example count, in clear


@pytest.mark.parametrize("forward", ["matching", "all"])
def test_inconsistent_survivor_lists_recover_nothing_and_hospitals_abort(
    forward: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attack = review_attack(check=True, forward=forward, monkeypatch=monkeypatch)
    # every honest hospital refused to reveal, with the documented error
    assert set(attack.errors) == set(attack.c.ids)
    assert all(isinstance(e, ConsistencyError) for e in attack.errors.values())
    reason = r"only [12] consistency signature" if forward == "matching" else "does not verify"
    assert all(re.search(reason, str(e)) for e in attack.errors.values()), attack.errors
    assert attack.loot.b_shares == {} and attack.loot.s_shares == {}
    assert recover(attack.loot, TARGET) is None
    # nor is the update hidden in what it holds: y_0 minus the group mask is not q_0
    loot = attack.loot
    y = loot.masked[TARGET].copy()
    assert loot.consortium_key is not None
    gkey = group_mask_key(
        loot.consortium_key,
        nonce=attack.cfg.nonce,
        invited=attack.cfg.hospital_ids,
        round_=attack.cfg.round,
        owner=TARGET,
        size=y.shape[0],
    )
    Masker(y.shape[0], 32).apply(y, gkey, sign=-1)
    assert np.mean(y == truth(attack.inputs, attack.c.params)) < 0.01


def test_target_refuses_a_survivor_list_outside_its_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Telling the t-1-peer target that its peers dropped (U3 not in U2): it refuses to sign."""
    c = make_consortium(range(5), SecAggParams(colluders=0), seed=5)
    attack = Attack(c, make_inputs(c.ids, P, seed=6), key_leaker=4)
    attack.setup(target_peers=(1, 2))
    attack.survivor_views({0: (0, 3, 4)}, forward="matching")
    assert isinstance(attack.errors[0], ConsistencyError)
    assert "not a subset of U2" in str(attack.errors[0])


def test_t_minus_one_peers_with_a_consistent_list_gives_only_the_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The target alone with t - 1 peers, consistent U3 = {0, 1, 2}: the round completes,
    the server learns the sum of three updates and still not hospital 0's."""
    c = make_consortium(range(5), SecAggParams(colluders=0), seed=5)
    attack = Attack(c, make_inputs(c.ids, P, seed=6), key_leaker=4)
    attack.setup(target_peers=(1, 2))
    views = dict.fromkeys(c.ids, (0, 1, 2))
    attack.survivor_views({i: views[i] for i in (0, 1, 2)}, forward="matching")
    assert attack.errors == {}
    assert set(attack.loot.b_shares) == {0, 1, 2}
    assert recover(attack.loot, TARGET) is None


def test_fewer_than_t_minus_one_peers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    c = make_consortium(range(5), SecAggParams(colluders=0), seed=5)
    attack = Attack(c, make_inputs(c.ids, P, seed=6), key_leaker=4)
    attack.setup(target_peers=(1,))  # t - 2 peers
    err = attack.errors[TARGET]
    assert isinstance(err, TooFewSurvivorsError)
    assert (err.stage, err.survivors, err.threshold) == ("masked_input", 2, 3)
    assert TARGET not in attack.loot.masked  # it sent nothing


@pytest.mark.parametrize("forward", ["matching", "all"])
def test_default_threshold_resists_the_server_and_a_colluding_hospital(
    forward: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default colluders = 1 (t = 4 of 5), hospital 4 colluding fully (signs any list,
    hands over every share and key): the same attack recovers nothing."""
    c = make_consortium(range(5), seed=8)
    attack = Attack(c, make_inputs(c.ids, P, seed=9), colluder=4)
    assert attack.cfg.t == 4
    attack.setup(target_peers=(1, 2, 4))
    views = {0: (0, 1, 2, 4), 1: (0, 1, 3, 4), 2: (0, 2, 3, 4), 3: (0, 1, 3, 4)}
    attack.survivor_views(views, forward=forward)
    assert set(attack.errors) == {0, 1, 2, 3}
    assert all(isinstance(e, ConsistencyError) for e in attack.errors.values())
    assert recover(attack.loot, TARGET) is None
    # what it does hold: the colluder's single share of each secret, below t = 4
    assert all(len(v) == 1 for v in attack.loot.b_shares.values())


def test_the_default_threshold_blocks_the_attack_even_without_signatures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Why 2t > n + colluders: with t = 4 of 5 the subset and size checks alone leave the
    attacker short of t shares of the peers' mask keys (the consistency check is a second,
    independent barrier)."""
    monkeypatch.setattr(SecAggHospital, "_check_consistency", lambda self, st, env: None)
    c = make_consortium(range(5), seed=8)
    attack = Attack(c, make_inputs(c.ids, P, seed=9), colluder=4)
    attack.setup(target_peers=(1, 2, 4))
    views = {0: (0, 1, 2, 4), 1: (0, 1, 3, 4), 2: (0, 2, 3, 4), 3: (0, 1, 3, 4)}
    attack.survivor_views(views, forward="matching")
    assert recover(attack.loot, TARGET) is None
    assert len(attack.loot.s_shares.get(1, {})) < 4 or len(attack.loot.s_shares.get(2, {})) < 4


def test_the_honest_server_path_is_unchanged_by_the_attack_helpers() -> None:
    """Sanity of the helpers: an honest run through ``Attack`` completes and decodes."""
    c = make_consortium(range(5), seed=11)
    attack = Attack(c, make_inputs(c.ids, P, seed=12))
    attack.setup(target_peers=(1, 2, 3, 4))
    attack.survivor_views(dict.fromkeys(c.ids, c.ids), forward="matching")
    assert attack.errors == {}
    assert set(attack.loot.b_shares) == set(c.ids) and attack.loot.s_shares == {}
    assert isinstance(attack.server, SecAggServer)
