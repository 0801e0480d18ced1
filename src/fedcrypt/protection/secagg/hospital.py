"""The hospital side of ``secagg``: one state machine per hospital, one round at a time."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.base import AggregateResult, check_update
from fedcrypt.protection.secagg import shamir
from fedcrypt.protection.secagg.config import RoundConfig, SecAggParams
from fedcrypt.protection.secagg.errors import (
    ConsistencyError,
    ReplayError,
    SessionMismatchError,
    TooFewSurvivorsError,
    ViewMismatchError,
)
from fedcrypt.protection.secagg.graph import graph_seed, neighbour_graph
from fedcrypt.protection.secagg.masking import (
    EXTRA,
    Masker,
    dequantize,
    group_mask_key,
    pairwise_key,
    quantize,
    self_mask_key,
    unsigned_dtype,
)
from fedcrypt.protection.secagg.messages import (
    SCHEME,
    STAGES,
    consistency_message,
    digest,
    header_ids,
    open_reply,
    pack_reply,
    parse_request,
    verify_consistency,
)
from fedcrypt.protection.secagg.primitives import (
    KEY_BYTES,
    NONCE_BYTES,
    agree,
    commit,
    open_sealed,
    seal,
    u64,
)
from fedcrypt.protection.secagg.state import Progress, load_progress, save_progress

logger = logging.getLogger(__name__)

RandomBytes = Callable[[int], bytes]
MIN_CONSORTIUM_KEY_BYTES = 32
_STATE_SCHEME = "secagg-hospital-state"
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw


def generate_consortium_key() -> bytes:
    """A fresh 32-byte consortium key (share it among hospitals only, never the server)."""
    return secrets.token_bytes(MIN_CONSORTIUM_KEY_BYTES)


def raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(_RAW, _RAW_PUB)


def load_x25519_public(data: bytes | memoryview, *, sender: int) -> X25519PublicKey:
    """Parse an advertised raw X25519 public key.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If it is not 32 bytes.
    """
    if len(data) != KEY_BYTES:
        raise ProtocolError(f"hospital {sender} advertised a malformed X25519 key")
    return X25519PublicKey.from_public_bytes(bytes(data))


def share_key(
    enc_private: X25519PrivateKey,
    peer_public: X25519PublicKey,
    *,
    session: bytes,
    sender: int,
    receiver: int,
) -> bytes:
    """AES-256-GCM key for shares sent from ``sender`` to ``receiver`` (one per direction)."""
    info = b"share-key\x00" + u64(sender) + u64(receiver)
    return agree(enc_private, peer_public, info=info, salt=session)


def share_aad(*, session: bytes, round_: int, sender: int, receiver: int) -> bytes:
    """Associated data binding an encrypted share to its round, sender and receiver."""
    return b"fedcrypt/secagg/v1/share\x00" + session + u64(round_) + u64(sender) + u64(receiver)


@dataclass(frozen=True)
class AggregateInfo:
    """What a ``secagg`` aggregate says about itself (header, validated).

    Attributes
    ----------
    config : RoundConfig
        The round's configuration (nonce, invited hospitals, threshold, parameters).
    session : str
        Its session digest (recomputed from ``config``).
    survivors : tuple of int
        The hospitals whose updates it sums (``U3``).
    """

    config: RoundConfig
    session: str
    survivors: tuple[int, ...]


def read_aggregate(
    aggregate: bytes | memoryview,
    *,
    params: SecAggParams,
    consortium_key: bytes | None = None,
    masker: Masker | None = None,
) -> tuple[AggregateResult, AggregateInfo]:
    """Remove the group mask from a server aggregate, decode the FedAvg mean, and say whose.

    Like :func:`decode_aggregate`, also returning the aggregate's :class:`AggregateInfo`.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the aggregate is malformed, for other parameters, its session does not match
        its configuration (:class:`SessionMismatchError`), or it decodes to an impossible
        example count.
    fedcrypt.exceptions.DecryptionError
        If it does not unmask (wrong consortium key, or corrupted check element).
    fedcrypt.exceptions.ConfigError
        If a group mask is used and no consortium key is given.
    """
    env = wire.unpack(aggregate, expect_scheme=SCHEME)
    hdr = env.header
    if hdr.get("kind") != "aggregate":
        raise ProtocolError("expected a secagg aggregate")
    round_ = wire.header_int(hdr, "round", minimum=1)
    size = wire.header_int(hdr, "size", minimum=EXTRA + 1)
    survivors = header_ids(hdr, "survivors")
    if hdr.get("params") != params.to_json():
        raise ProtocolError("secagg aggregate was made with other parameters")
    try:
        config = RoundConfig.from_json(hdr.get("config"))
    except ConfigError as exc:
        raise ProtocolError(f"secagg aggregate carries an invalid configuration: {exc}") from exc
    if config.params.to_json() != params.to_json() or config.round != round_:
        raise ProtocolError("secagg aggregate does not match its configuration")
    if hdr.get("session") != config.session:
        raise SessionMismatchError("secagg aggregate's session does not match its configuration")
    if config.vector_size + EXTRA != size:
        raise ProtocolError("secagg aggregate's size does not match its configuration")
    if not survivors:
        raise ProtocolError("secagg aggregate names no contributing hospital")
    if not set(survivors) <= set(config.hospital_ids):
        raise ProtocolError("secagg aggregate names contributors that were not invited")
    dtype = unsigned_dtype(params.bits)
    if len(env.sections) != 1 or len(env.sections[0]) != size * dtype.itemsize:
        raise ProtocolError("malformed secagg aggregate: payload does not match its size")
    total = np.frombuffer(env.sections[0], dtype=dtype).copy()
    if params.group_mask:
        if consortium_key is None:
            raise ConfigError("this consortium uses a group mask: a consortium key is required")
        if masker is None or masker.size != size or masker.dtype != dtype:
            masker = Masker(size, params.bits)
        for owner in survivors:
            key = group_mask_key(
                consortium_key,
                nonce=config.nonce,
                invited=config.hospital_ids,
                round_=round_,
                owner=owner,
                size=size,
            )
            masker.apply(total, key, sign=-1)
        masker.wipe()
    mean, count = dequantize(total, params)
    result = AggregateResult(mean=mean, total_examples=count, num_updates=len(survivors))
    return result, AggregateInfo(config=config, session=config.session, survivors=survivors)


def decode_aggregate(
    aggregate: bytes | memoryview,
    *,
    params: SecAggParams,
    consortium_key: bytes | None = None,
    masker: Masker | None = None,
) -> tuple[AggregateResult, int]:
    """Remove the group mask from a server aggregate and decode the FedAvg mean.

    Parameters
    ----------
    aggregate : bytes
        The server's aggregate message.
    params : SecAggParams
        The consortium's parameters; the aggregate must name the same.
    consortium_key : bytes, optional
        Required when ``params.group_mask`` (the default).
    masker : Masker, optional
        Reusable PRG buffers of the right size (default: allocate).

    Returns
    -------
    result : AggregateResult
        Mean of shape ``(P,)``, float64; total examples; number of updates.
    round : int
        The aggregate's round number.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the aggregate is malformed, for other parameters, or decodes to an impossible
        example count.
    fedcrypt.exceptions.DecryptionError
        If it does not unmask (wrong consortium key, or corrupted check element).
    fedcrypt.exceptions.ConfigError
        If a group mask is used and no consortium key is given.
    """
    result, info = read_aggregate(
        aggregate, params=params, consortium_key=consortium_key, masker=masker
    )
    return result, info.config.round


@dataclass
class _Round:
    """A hospital's secrets and view of one round (dropped when the round ends)."""

    config: RoundConfig
    session: str
    session_bytes: bytes
    mask_key: X25519PrivateKey | None
    enc_key: X25519PrivateKey | None
    seed: bytes | None
    next_stage: str = "share"
    advertise_digest: str = ""
    u1: tuple[int, ...] = ()
    peers: dict[int, tuple[X25519PublicKey, X25519PublicKey]] = field(default_factory=dict)
    group: frozenset[int] = frozenset()
    own_shares: tuple[int, int] = (0, 0)
    received: dict[int, tuple[int, int]] = field(default_factory=dict)
    senders: tuple[int, ...] = ()
    u3: tuple[int, ...] = ()


class SecAggHospital:
    """One hospital's side of secure aggregation (Bonawitz et al. 2017; Bell et al. 2020).

    Secure against an active server (the malicious-server variant of Bonawitz et al.,
    §4): the hospital checks ``U1 ⊇ U2 ⊇ U3 ⊇ U4`` and every set's size, signs the
    survivor set ``U3`` once per session, and reveals shares (once per session, one kind
    per peer) only after verifying enough signatures of registered hospitals over the
    same ``U3``.

    Holds the hospital's long-term Ed25519 signing key, the consortium's registry of
    Ed25519 public keys, and (with the group mask) the consortium key. Each round's X25519
    keys and self-mask seed are generated at :meth:`stage_advertise` and erased after
    :meth:`stage_masked_input`; the Shamir shares received are erased after
    :meth:`stage_unmask`. Each stage answers one server request with one signed reply.

    Parameters
    ----------
    hospital_id : int
        This hospital's id in ``[0, 2^64)``.
    signing_key : Ed25519PrivateKey
        Long-term key whose public half is ``registry[hospital_id]``.
    registry : mapping of int to Ed25519PublicKey
        The consortium's registered hospital keys (from a source the hospital trusts:
        the registry file generated with its identity key, never the server).
    params : SecAggParams
        The consortium's parameters; requests with other parameters are refused.
    consortium_key : bytes, optional
        At least 32 bytes shared by the hospitals only; required when
        ``params.group_mask`` (default: None).
    rng : callable, optional
        ``rng(n) -> n random bytes`` for keys, seeds, nonces and Shamir coefficients
        (default: ``secrets.token_bytes``; inject only in tests).
    last_round : int, optional
        The last round this hospital joined, if the caller persists it itself; rounds
        not newer are refused (default: 0).
    state_file : path, optional
        Where to persist this hospital's progress (:mod:`~.secagg.state`: last round
        joined, survivor set signed, shares revealed; mode 0600, atomic) so that a
        repeated or older round, a second signature or a second reveal in one session is
        refused across process restarts (default: None, in memory only; then
        :meth:`export_state` carries it).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the signing key does not match the registry or the consortium key is missing
        or short.
    StateFileError
        If ``state_file`` exists but is unreadable, corrupt or another hospital's.
    """

    scheme = SCHEME

    def __init__(
        self,
        hospital_id: int,
        *,
        signing_key: Ed25519PrivateKey,
        registry: Mapping[int, Ed25519PublicKey],
        params: SecAggParams,
        consortium_key: bytes | None = None,
        rng: RandomBytes = secrets.token_bytes,
        last_round: int = 0,
        state_file: str | os.PathLike[str] | None = None,
    ) -> None:
        own = registry.get(hospital_id)
        if own is None or raw_ed25519(own) != raw_ed25519(signing_key.public_key()):
            raise ConfigError(
                f"signing_key does not match the registered key of hospital {hospital_id}"
            )
        if params.group_mask:
            if consortium_key is None or len(consortium_key) < MIN_CONSORTIUM_KEY_BYTES:
                raise ConfigError(
                    "consortium_key of at least 32 bytes is required with the group mask"
                )
        else:
            logger.warning(
                "secagg group mask is OFF: the server will learn the aggregate of each round"
            )
        self.hospital_id = hospital_id
        self.params = params
        self._signing_key = signing_key
        self._registry = dict(registry)
        self._consortium_key = consortium_key if params.group_mask else None
        self._rng = rng
        self._state_file = None if state_file is None else Path(state_file)
        progress = Progress(hospital=hospital_id, last_round=last_round)
        if self._state_file is not None:
            stored = load_progress(self._state_file, hospital_id=hospital_id)
            if stored.last_round >= progress.last_round:
                progress = stored
        self._progress = progress
        self._round: _Round | None = None
        self._masker: Masker | None = None

    # -- helpers -----------------------------------------------------------------------
    def _reply(
        self,
        stage: str,
        request: bytes,
        *,
        extra: Mapping[str, Any] | None = None,
        sections: list[bytes | memoryview] | None = None,
    ) -> bytes:
        st = self._state()
        return pack_reply(
            stage,
            round_=st.config.round,
            session=st.session,
            sender=self.hospital_id,
            request=request,
            signing_key=self._signing_key,
            extra=extra,
            sections=sections or [],
        )

    def _persist(self, progress: Progress) -> None:
        """Record ``progress``; with a state file, on disk before any reply that needs it."""
        if self._state_file is not None:
            save_progress(self._state_file, progress)
        self._progress = progress

    def _masker_for(self, size: int) -> Masker:
        """PRG buffers kept across rounds (no page faults on 2 x 4 bytes x P each round)."""
        if self._masker is None or self._masker.size != size:
            self._masker = Masker(size, self.params.bits)
        return self._masker

    def _state(self) -> _Round:
        if self._round is None:
            raise ProtocolError("no secagg round in progress at this hospital")
        return self._round

    def _begin(self, request: bytes, stage: str) -> tuple[_Round, wire.Envelope]:
        env = parse_request(request, stage=stage)
        st = self._round
        got = env.header["round"]
        if st is None or got != st.config.round:
            raise ReplayError(
                f"secagg {stage!r} request for round {got}, this hospital is in round "
                f"{st.config.round if st else None}"
            )
        if env.header["session"] != st.session:
            raise SessionMismatchError(
                f"secagg {stage!r} request is for another session (round configuration)"
            )
        if st.next_stage != stage:
            if st.next_stage == "done" or STAGES.index(stage) < STAGES.index(st.next_stage):
                raise ReplayError(f"secagg stage {stage!r} was already answered in this round")
            raise ProtocolError(f"secagg stage {stage!r} requested before {st.next_stage!r}")
        return st, env

    # -- stages ------------------------------------------------------------------------
    def stage_advertise(self, request: bytes) -> bytes:
        """Stage 0: check the round configuration; advertise fresh signed X25519 keys.

        The reply is signed over its header, which names the round and the session (the
        digest of the configuration, including the server's nonce): the keys are bound
        to this session. The round is recorded as joined (on disk, with a state file)
        before the reply is returned.

        Raises
        ------
        ReplayError
            If the round is not newer than the last round this hospital joined.
        fedcrypt.exceptions.ProtocolError
            If the configuration is invalid (including a threshold below the
            consortium's ``colluders`` bound), uses other consortium parameters, does
            not invite this hospital, or invites an unregistered one.
        StateFileError
            If the state file cannot be written (no reply is sent).
        """
        env = parse_request(request, stage="advertise")
        got = env.header["round"]
        if got <= self._progress.last_round:
            raise ReplayError(
                f"secagg round {got} is not newer than round {self._progress.last_round} "
                "already joined"
            )
        try:
            config = RoundConfig.from_json(env.header.get("config"))
        except ConfigError as exc:
            raise ProtocolError(f"secagg request carries an invalid configuration: {exc}") from exc
        if config.round != got:
            raise ProtocolError("secagg advertise request does not match its configuration")
        if config.session != env.header["session"]:
            raise SessionMismatchError("secagg advertise request's session does not match")
        if config.params.to_json() != self.params.to_json():
            raise ProtocolError("secagg round uses parameters other than the consortium's")
        if self.hospital_id not in config.hospital_ids:
            raise ProtocolError(f"hospital {self.hospital_id} is not invited to this round")
        unknown = [i for i in config.hospital_ids if i not in self._registry]
        if unknown:
            raise ProtocolError(f"secagg round invites unregistered hospitals {unknown}")
        self._persist(self._progress.joined(got, config.session))
        mask_key = X25519PrivateKey.from_private_bytes(self._rng(KEY_BYTES))
        enc_key = X25519PrivateKey.from_private_bytes(self._rng(KEY_BYTES))
        self._round = _Round(
            config=config,
            session=config.session,
            session_bytes=bytes.fromhex(config.session),
            mask_key=mask_key,
            enc_key=enc_key,
            seed=self._rng(KEY_BYTES),
            advertise_digest=digest(request),
        )
        return self._reply(
            "advertise", request, sections=[raw_public(mask_key), raw_public(enc_key)]
        )

    def stage_share(self, request: bytes) -> bytes:
        """Stage 1: verify every advertisement; send Shamir shares of ``b_i`` and ``s_i``.

        Each share pair goes to one neighbour, encrypted with AES-256-GCM under an
        X25519+HKDF key, with the round, sender and receiver as associated data.

        Raises
        ------
        SignatureError, ReplayError, SessionMismatchError, ViewMismatchError
            If an advertisement is forged or signed by an unregistered key, from another
            round or session, or answers another request.
        fedcrypt.exceptions.ProtocolError
            If advertisements are malformed, name uninvited hospitals (``U1`` not a
            subset of the invited set), or keys repeat.
        TooFewSurvivorsError
            If fewer hospitals advertised than the round needs
            (:attr:`RoundConfig.signatures_needed`, ``t`` with the complete graph).
        """
        st, env = self._begin(request, "share")
        cfg = st.config
        senders = header_ids(env.header, "senders")
        if len(env.sections) != len(senders) or not set(senders) <= set(cfg.hospital_ids):
            raise ProtocolError("malformed secagg share request: advertisements do not match")
        raw: dict[int, tuple[bytes, bytes]] = {}
        for hid, blob in zip(senders, env.sections, strict=True):
            rep = open_reply(
                blob,
                registry=self._registry,
                stage="advertise",
                round_=cfg.round,
                session=st.session,
                sender=hid,
            )
            if rep.request != st.advertise_digest:
                raise ViewMismatchError(f"hospital {hid} answered another advertise request")
            if len(rep.sections) != 2:
                raise ProtocolError(f"malformed advertisement from hospital {hid}")
            raw[hid] = (bytes(rep.sections[0]), bytes(rep.sections[1]))
        assert st.mask_key is not None and st.enc_key is not None and st.seed is not None
        if raw.get(self.hospital_id) != (raw_public(st.mask_key), raw_public(st.enc_key)):
            raise ProtocolError("secagg share request lacks or alters this hospital's keys")
        if len(senders) < cfg.signatures_needed:
            raise TooFewSurvivorsError("share", len(senders), cfg.signatures_needed)
        flat = [k for pair in raw.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise ProtocolError("secagg advertisements repeat a public key")
        st.peers = {
            hid: (load_x25519_public(m, sender=hid), load_x25519_public(e, sender=hid))
            for hid, (m, e) in raw.items()
        }
        st.u1 = senders
        graph = neighbour_graph(
            senders, neighbours=cfg.params.neighbours, seed=graph_seed(st.session, raw)
        )
        st.group = graph[self.hospital_id]
        holders = sorted(st.group | {self.hospital_id})
        xs = [h + 1 for h in holders]
        b_sh = shamir.split(int.from_bytes(st.seed, "big"), xs, cfg.t, rng=self._rng)
        s_secret = int.from_bytes(st.mask_key.private_bytes_raw(), "big")
        s_sh = shamir.split(s_secret, xs, cfg.t, rng=self._rng)
        me = self.hospital_id
        st.own_shares = (b_sh[me + 1], s_sh[me + 1])
        cts: list[bytes | memoryview] = []
        for j in sorted(st.group):
            key = share_key(
                st.enc_key, st.peers[j][1], session=st.session_bytes, sender=me, receiver=j
            )
            plain = u64(me) + u64(j) + shamir.encode(b_sh[j + 1]) + shamir.encode(s_sh[j + 1])
            aad = share_aad(session=st.session_bytes, round_=cfg.round, sender=me, receiver=j)
            cts.append(seal(key, plain, aad=aad, nonce=self._rng(NONCE_BYTES)))
        commitment = commit(st.seed, session=st.session_bytes, owner=me)
        st.next_stage = "masked_input"
        return self._reply(
            "share",
            request,
            extra={"recipients": sorted(st.group)},
            sections=[commitment, *cts],
        )

    def stage_masked_input(
        self, request: bytes, *, update: NDArray[np.floating], num_examples: int
    ) -> bytes:
        """Stage 2: decrypt received shares; send the masked, quantized, weighted update.

        Sends ``y_i = q_i + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)
        [+ PRG(g_i)] (mod 2^bits)`` where ``q_i`` is :func:`~.masking.quantize` of
        ``num_examples * update`` (with the count appended), ``j`` ranges over the
        neighbours that sent shares (this hospital's view of ``U2``), and ``g_i`` is the
        session-bound group-mask key (:func:`~.masking.group_mask_key`).

        Parameters
        ----------
        request : bytes
            The server's request (forwarded encrypted shares).
        update : numpy.ndarray
            Shape ``(P,)``, floating, finite; ``P`` is the round's ``vector_size``.
        num_examples : int
            ``n_i``, in ``[1, params.max_examples]``.

        Raises
        ------
        ValueError
            If ``update`` or ``num_examples`` is invalid (a
            :class:`~fedcrypt.exceptions.ConfigError` if above ``max_examples``).
        ShareAuthenticationError
            If a forwarded share fails authentication (tampered, or encrypted for
            another session, round, sender or receiver).
        fedcrypt.exceptions.ProtocolError
            If the request names senders outside this hospital's share group (``U2``
            not a subset of ``U1``).
        TooFewSurvivorsError
            If the server forwarded fewer peers than the protocol needs: this hospital's
            view of ``U2`` within its share group (peers plus itself) is below ``t``.
        """
        vec = check_update(update, num_examples)
        st, env = self._begin(request, "masked_input")
        cfg = st.config
        if vec.shape[0] != cfg.vector_size:
            raise ValueError(
                f"update has {vec.shape[0]} values, this round expects {cfg.vector_size}"
            )
        senders = header_ids(env.header, "senders")
        if len(env.sections) != len(senders) or not set(senders) <= st.group:
            raise ProtocolError("malformed secagg masked-input request: senders do not match")
        if len(senders) + 1 < cfg.t:
            raise TooFewSurvivorsError(
                "masked_input", len(senders) + 1, cfg.t, "peers forwarded to this hospital"
            )
        assert st.enc_key is not None and st.mask_key is not None and st.seed is not None
        me = self.hospital_id
        received: dict[int, tuple[int, int]] = {}
        for i, blob in zip(senders, env.sections, strict=True):
            key = share_key(
                st.enc_key, st.peers[i][1], session=st.session_bytes, sender=i, receiver=me
            )
            aad = share_aad(session=st.session_bytes, round_=cfg.round, sender=i, receiver=me)
            plain = open_sealed(key, blob, aad=aad)
            if len(plain) != 16 + 2 * shamir.SHARE_BYTES or plain[:16] != u64(i) + u64(me):
                raise ProtocolError(f"share from hospital {i} is malformed")
            b_share = shamir.decode(plain[16 : 16 + shamir.SHARE_BYTES])
            s_share = shamir.decode(plain[16 + shamir.SHARE_BYTES :])
            received[i] = (b_share, s_share)
        y = quantize(vec, int(num_examples), self.params)
        masker = self._masker_for(y.shape[0])
        masker.apply(y, self_mask_key(st.seed, session=st.session_bytes, owner=me), sign=1)
        for j in senders:
            key = pairwise_key(st.mask_key, st.peers[j][0], session=st.session_bytes, a=me, b=j)
            masker.apply(y, key, sign=1 if me < j else -1)
        if self.params.group_mask:
            assert self._consortium_key is not None
            gkey = group_mask_key(
                self._consortium_key,
                nonce=cfg.nonce,
                invited=cfg.hospital_ids,
                round_=cfg.round,
                owner=me,
                size=y.shape[0],
            )
            masker.apply(y, gkey, sign=1)
        masker.wipe()
        st.received = received
        st.senders = senders
        # Forward secrecy: the round's private keys and seed are no longer needed here.
        st.mask_key = st.enc_key = st.seed = None
        st.next_stage = "consistency"
        return self._reply(
            "masked_input",
            request,
            extra={"size": int(y.shape[0])},
            sections=[y.data.cast("B")],
        )

    def _check_survivors(self, st: _Round, survivors: tuple[int, ...]) -> None:
        """``U3`` against this hospital's views of ``U1`` and ``U2``, and its size."""
        cfg = st.config
        me = self.hospital_id
        if me not in survivors:
            raise ConsistencyError("secagg survivor set does not list this hospital")
        if not set(survivors) <= set(st.u1):
            raise ConsistencyError(
                "secagg survivor set names hospitals that never advertised keys (U3 is not "
                "a subset of U1)"
            )
        mine = st.group | {me}
        if (set(survivors) & mine) - (set(st.senders) | {me}):
            raise ConsistencyError(
                "secagg survivor set names share-group members whose shares the server did "
                "not forward to this hospital (U3 is not a subset of U2)"
            )
        in_group = len(set(survivors) & mine)
        if in_group < cfg.t:
            raise TooFewSurvivorsError("consistency", in_group, cfg.t, "this share group")
        if len(survivors) < cfg.signatures_needed:
            raise TooFewSurvivorsError("consistency", len(survivors), cfg.signatures_needed)

    def stage_consistency(self, request: bytes) -> bytes:
        """Stage 3: check the survivor set ``U3``; sign it (once per session).

        The reply carries a detached Ed25519 signature over
        :func:`~.messages.consistency_message` (session, round, ``U3``) that the server
        forwards to the other hospitals. The signature is recorded (on disk, with a state
        file) before the reply is returned, so this hospital never signs two survivor
        sets in one session, also across restarts.

        Raises
        ------
        ConsistencyError
            If this hospital is not in ``U3``, or ``U3`` names hospitals outside its view
            of ``U1`` or share-group members outside its view of ``U2``.
        TooFewSurvivorsError
            If ``U3`` has fewer than ``t`` members of this hospital's share group or
            fewer than :attr:`RoundConfig.signatures_needed` members.
        ReplayError
            If asked twice, or it already signed a survivor set in this session.
        """
        st, env = self._begin(request, "consistency")
        cfg = st.config
        survivors = header_ids(env.header, "survivors")
        self._check_survivors(st, survivors)
        if self._progress.session == st.session and self._progress.signed:
            raise ReplayError("this hospital already signed a survivor set in this session")
        message = consistency_message(st.session, cfg.round, survivors)
        self._persist(replace(self._progress, signed=digest(message)))
        signature = self._signing_key.sign(message)
        st.u3 = survivors
        st.next_stage = "unmask"
        return self._reply(
            "consistency", request, extra={"survivors": list(survivors)}, sections=[signature]
        )

    def _check_consistency(self, st: _Round, env: wire.Envelope) -> None:
        """Verify the forwarded consistency signatures (Bonawitz et al. 2017, round 4).

        Raises
        ------
        ConsistencyError
            Signers outside ``U3`` (``U4`` not a subset of ``U3``) or unregistered, any
            signature that does not verify over the ``U3`` this hospital signed, or fewer
            than :attr:`RoundConfig.signatures_needed` of them.
        """
        cfg = st.config
        signers = header_ids(env.header, "signers")
        if len(env.sections) != len(signers):
            raise ProtocolError("malformed secagg unmask request: signatures do not match")
        if not set(signers) <= set(st.u3):
            raise ConsistencyError(
                "secagg unmask request lists signers outside the survivor set (U4 is not a "
                "subset of U3)"
            )
        message = consistency_message(st.session, cfg.round, st.u3)
        for who, sig in zip(signers, env.sections, strict=True):
            key = self._registry.get(who)
            if key is None or not verify_consistency(key, sig, message):
                raise ConsistencyError(
                    f"hospital {who}'s consistency signature does not verify over the "
                    "survivor set this hospital signed: the server showed hospitals "
                    "different survivor sets (refusing to reveal shares)"
                )
        if len(signers) < cfg.signatures_needed:
            raise ConsistencyError(
                f"only {len(signers)} consistency signature(s) over the survivor set, "
                f"{cfg.signatures_needed} needed: refusing to reveal shares"
            )

    def stage_unmask(self, request: bytes) -> bytes:
        """Stage 4: after the consistency check, reveal per share-group member one share.

        Reveals the share of ``b_j`` if ``j`` is in ``U3``, of ``s_j`` if not, for each
        share-group member ``j`` whose shares this hospital received (and itself): never
        both for one member, and at most once per session (recorded, on disk with a
        state file, before the reply is returned).

        Raises
        ------
        ConsistencyError
            If the request names another survivor set than the one this hospital signed,
            or its signatures fail the check (:meth:`_check_consistency`).
        ReplayError
            If asked twice, or this hospital already revealed shares in this session.
        """
        st, env = self._begin(request, "unmask")
        survivors = header_ids(env.header, "survivors")
        if survivors != st.u3:
            raise ConsistencyError(
                "secagg unmask request names a survivor set other than the one this "
                "hospital signed (refusing to reveal shares)"
            )
        self._check_consistency(st, env)
        if self._progress.session == st.session and self._progress.revealed:
            raise ReplayError("this hospital already revealed its shares in this session")
        me = self.hospital_id
        owners = sorted(set(st.senders) | {me})
        shares = dict(st.received)
        shares[me] = st.own_shares
        kinds = "".join("b" if o in survivors else "s" for o in owners)
        sections: list[bytes | memoryview] = [
            shamir.encode(shares[o][0] if k == "b" else shares[o][1])
            for o, k in zip(owners, kinds, strict=True)
        ]
        self._persist(replace(self._progress, revealed=True))
        reply = self._reply(
            "unmask", request, extra={"owners": owners, "kinds": kinds}, sections=sections
        )
        st.received = {}
        st.own_shares = (0, 0)
        st.next_stage = "done"
        return reply

    def unprotect(self, aggregate: bytes) -> AggregateResult:
        """Remove the group mask from the server's aggregate and return the FedAvg mean.

        Works at any consortium hospital, also one not invited to the aggregate's round.
        For the round this hospital took part in, the aggregate must be of the same
        session.

        Raises
        ------
        ReplayError
            If the aggregate is older than a round this hospital joined or unprotected.
        SessionMismatchError
            If it is for this hospital's current round but another session.
        fedcrypt.exceptions.ProtocolError
            If malformed, for other parameters, or the unmasked example count is
            impossible.
        fedcrypt.exceptions.DecryptionError
            If it does not unmask with this hospital's consortium key.
        """
        header = wire.unpack(aggregate, expect_scheme=SCHEME).header
        claimed = wire.header_int(header, "round", minimum=1)
        newest = max(self._progress.last_round, self._progress.last_unprotected)
        if claimed < newest:
            raise ReplayError(f"secagg aggregate is for round {claimed}, older than round {newest}")
        return self._unmask_aggregate(aggregate)

    def unprotect_missed(self, aggregate: bytes, *, expected_round: int) -> AggregateResult:
        """Unprotect the aggregate of a round this hospital missed (a catch-up).

        A hospital that dropped out of round ``r`` (or was offline) gets round ``r``'s
        aggregate later, with its next request, and applies the missed mean deltas in
        order. Unlike :meth:`unprotect` this accepts a round older than the newest it
        joined, but only the one the caller expects (the round after the global model it
        holds), so a server cannot make it adopt an aggregate out of order.

        Raises
        ------
        ReplayError
            If the aggregate is not for ``expected_round``.
        fedcrypt.exceptions.ProtocolError, fedcrypt.exceptions.DecryptionError
            As :meth:`unprotect`.
        """
        header = wire.unpack(aggregate, expect_scheme=SCHEME).header
        claimed = wire.header_int(header, "round", minimum=1)
        if claimed != expected_round:
            raise ReplayError(
                f"catch-up aggregate is for round {claimed}, this hospital expected round "
                f"{expected_round}"
            )
        return self._unmask_aggregate(aggregate)

    def _unmask_aggregate(self, aggregate: bytes) -> AggregateResult:
        size = self._masker.size if self._masker is not None else 0
        result, info = read_aggregate(
            aggregate,
            params=self.params,
            consortium_key=self._consortium_key,
            masker=self._masker_for(size) if size else None,
        )
        round_ = info.config.round
        st = self._round
        if st is not None and st.config.round == round_ and info.session != st.session:
            raise SessionMismatchError(f"secagg aggregate of round {round_} is for another session")
        if round_ > self._progress.last_unprotected:
            self._persist(replace(self._progress, last_unprotected=round_))
        return result

    def forget_round(self) -> None:
        """Erase the current round's secrets (e.g. after the server aborted the round)."""
        self._round = None

    @property
    def last_round(self) -> int:
        """The last round this hospital joined (persisted with ``state_file``)."""
        return self._progress.last_round

    @property
    def progress(self) -> Progress:
        """What this hospital has agreed to so far (:class:`~.state.Progress`)."""
        return self._progress

    # -- state for stateless hosts (e.g. a Flower ClientApp between messages) -----------
    def export_state(self) -> bytes:
        """Serialize the round state, so a new object can continue the round.

        SECRET: the result holds the round's X25519 private keys, self-mask seed and the
        Shamir shares received. Keep it at the hospital (e.g. in Flower's node-local
        ``context.state``); never send it. Long-term keys are not included.
        """
        st = self._round
        rnd: dict[str, Any] | None = None
        if st is not None:
            rnd = {
                "config": st.config.to_json(),
                "next_stage": st.next_stage,
                "advertise_digest": st.advertise_digest,
                "mask_key": None if st.mask_key is None else st.mask_key.private_bytes_raw().hex(),
                "enc_key": None if st.enc_key is None else st.enc_key.private_bytes_raw().hex(),
                "seed": None if st.seed is None else st.seed.hex(),
                "u1": list(st.u1),
                "peers": {
                    str(i): [raw_public(m).hex(), raw_public(e).hex()]
                    for i, (m, e) in st.peers.items()
                },
                "group": sorted(st.group),
                "own_shares": [shamir.encode(v).hex() for v in st.own_shares],
                "received": {
                    str(i): [shamir.encode(b).hex(), shamir.encode(s).hex()]
                    for i, (b, s) in st.received.items()
                },
                "senders": list(st.senders),
                "u3": list(st.u3),
            }
        header = {
            "scheme": _STATE_SCHEME,
            "hospital": self.hospital_id,
            "progress": asdict(self._progress),
            "round": rnd,
        }
        return wire.pack(header, [])

    def import_state(self, data: bytes) -> None:
        """Continue from :meth:`export_state` output of this hospital.

        With a ``state_file`` the file stays authoritative for what this hospital has
        agreed to (an older blob cannot make it sign or reveal twice).

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If ``data`` is malformed or belongs to another hospital, or would move
            ``last_round`` backwards.
        """
        hdr = wire.unpack(data, expect_scheme=_STATE_SCHEME).header
        if hdr.get("hospital") != self.hospital_id:
            raise ProtocolError("secagg state belongs to another hospital")
        try:
            p = dict(hdr["progress"])
            progress = Progress(
                hospital=self.hospital_id,
                last_round=int(p["last_round"]),
                session=str(p["session"]),
                signed=str(p["signed"]),
                revealed=bool(p["revealed"]),
                last_unprotected=int(p["last_unprotected"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed secagg hospital state: {exc}") from exc
        if progress.last_round < self._progress.last_round:
            raise ProtocolError("secagg state is older than this hospital's last round")
        try:
            rnd = hdr["round"]
            st: _Round | None = None
            if rnd is not None:
                config = RoundConfig.from_json(rnd["config"])

                def key(v: str | None) -> X25519PrivateKey | None:
                    return (
                        None if v is None else X25519PrivateKey.from_private_bytes(bytes.fromhex(v))
                    )

                def pub(v: str) -> X25519PublicKey:
                    return X25519PublicKey.from_public_bytes(bytes.fromhex(v))

                def num(v: str) -> int:
                    return shamir.decode(bytes.fromhex(v))

                st = _Round(
                    config=config,
                    session=config.session,
                    session_bytes=bytes.fromhex(config.session),
                    mask_key=key(rnd["mask_key"]),
                    enc_key=key(rnd["enc_key"]),
                    seed=None if rnd["seed"] is None else bytes.fromhex(rnd["seed"]),
                    next_stage=str(rnd["next_stage"]),
                    advertise_digest=str(rnd["advertise_digest"]),
                    u1=tuple(int(i) for i in rnd["u1"]),
                    peers={int(i): (pub(m), pub(e)) for i, (m, e) in rnd["peers"].items()},
                    group=frozenset(int(i) for i in rnd["group"]),
                    own_shares=(num(rnd["own_shares"][0]), num(rnd["own_shares"][1])),
                    received={int(i): (num(b), num(s)) for i, (b, s) in rnd["received"].items()},
                    senders=tuple(int(i) for i in rnd["senders"]),
                    u3=tuple(int(i) for i in rnd["u3"]),
                )
                if st.next_stage not in (*STAGES, "done"):
                    raise ValueError(f"unknown stage {st.next_stage!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed secagg hospital state: {exc}") from exc
        if self._state_file is None:
            self._progress = progress
        self._round = st


def raw_ed25519(key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte Ed25519 public key."""
    return key.public_bytes(_RAW, _RAW_PUB)
