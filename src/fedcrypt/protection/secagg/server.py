"""The server side of ``secagg``: routes messages, sums masked updates, removes masks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import shamir
from fedcrypt.protection.secagg.config import RoundConfig
from fedcrypt.protection.secagg.errors import (
    ShareVerificationError,
    TooFewSurvivorsError,
    ViewMismatchError,
)
from fedcrypt.protection.secagg.graph import graph_seed, neighbour_graph
from fedcrypt.protection.secagg.hospital import load_x25519_public, raw_public
from fedcrypt.protection.secagg.masking import (
    EXTRA,
    Masker,
    pairwise_key,
    self_mask_key,
    unsigned_dtype,
)
from fedcrypt.protection.secagg.messages import (
    SCHEME,
    Reply,
    digest,
    header_ids,
    open_reply,
    pack_request,
)
from fedcrypt.protection.secagg.primitives import KEY_BYTES, commit

logger = logging.getLogger(__name__)

Requests = dict[int, bytes]


@dataclass(frozen=True)
class _Keys:
    mask_raw: bytes
    enc_raw: bytes
    mask: X25519PublicKey


class SecAggServer:
    """The server's side of one ``secagg`` round; it holds public material only.

    Each ``receive_*`` method takes the hospitals' replies to the previous requests (a
    hospital missing from the mapping has dropped out) and returns the next stage's
    requests, ``hospital id -> bytes``. :meth:`receive_unmask` returns the aggregate.

    Parameters
    ----------
    config : RoundConfig
        The round's configuration (round number, invited hospitals, threshold, params).
    registry : mapping of int to Ed25519PublicKey
        Registered signing keys of (at least) the invited hospitals.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If an invited hospital has no registered key.
    """

    scheme = SCHEME

    def __init__(self, config: RoundConfig, *, registry: Mapping[int, Ed25519PublicKey]) -> None:
        missing = [i for i in config.hospital_ids if i not in registry]
        if missing:
            raise ConfigError(f"hospitals {missing} have no registered signing key")
        self.config = config
        self._registry = {i: registry[i] for i in config.hospital_ids}
        self._session = config.session
        self._session_bytes = bytes.fromhex(config.session)
        self._next = "advertise"
        self._sent: dict[int, str] = {}
        self._keys: dict[int, _Keys] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._commitments: dict[int, bytes] = {}
        self._senders: dict[int, tuple[int, ...]] = {}
        self._u2: tuple[int, ...] = ()
        self._u3: tuple[int, ...] = ()
        self._sum: NDArray[np.unsignedinteger] | None = None
        self._aggregate: bytes | None = None

    # -- helpers -----------------------------------------------------------------------
    def _expect(self, stage: str) -> None:
        if self._next != stage:
            raise ProtocolError(f"secagg server is at stage {self._next!r}, not {stage!r}")

    def _send(self, stage: str, requests: Requests) -> Requests:
        self._sent = {hid: digest(req) for hid, req in requests.items()}
        self._next = stage
        return requests

    def _open(self, stage: str, replies: Mapping[int, bytes]) -> dict[int, Reply]:
        unknown = set(replies) - set(self._sent)
        if unknown:
            raise ProtocolError(f"secagg {stage!r} replies from hospitals never asked: {unknown}")
        opened: dict[int, Reply] = {}
        for hid in sorted(replies):
            rep = open_reply(
                replies[hid],
                registry=self._registry,
                stage=stage,
                round_=self.config.round,
                session=self._session,
                sender=hid,
            )
            if rep.request != self._sent[hid]:
                raise ViewMismatchError(
                    f"hospital {hid} answered a {stage!r} request other than the one sent "
                    "(tampered in transit)"
                )
            opened[hid] = rep
        dropped = len(self._sent) - len(opened)
        if dropped:
            logger.warning(
                "secagg round %d: %d hospital(s) dropped out at stage %r",
                self.config.round,
                dropped,
                stage,
            )
        if len(opened) < self.config.t:
            raise TooFewSurvivorsError(stage, len(opened), self.config.t)
        return opened

    # -- stages ------------------------------------------------------------------------
    def request_advertise(self) -> Requests:
        """Stage 0 requests: the round configuration, to every invited hospital."""
        self._expect("advertise")
        req = pack_request(
            "advertise",
            round_=self.config.round,
            session=self._session,
            extra={"config": self.config.to_json()},
        )
        return self._send("advertise", dict.fromkeys(self.config.hospital_ids, req))

    def receive_advertise(self, replies: Mapping[int, bytes]) -> Requests:
        """Verify advertised keys; return stage 1 requests (all advertisements, to each).

        Raises
        ------
        SignatureError, ReplayError, ViewMismatchError, fedcrypt.exceptions.ProtocolError
            If a reply is forged, replayed, answers a tampered request or repeats a key.
        TooFewSurvivorsError
            If fewer than ``threshold`` hospitals answered.
        """
        self._expect("advertise")
        opened = self._open("advertise", replies)
        raw: dict[int, tuple[bytes, bytes]] = {}
        for hid, rep in opened.items():
            if len(rep.sections) != 2:
                raise ProtocolError(f"malformed advertisement from hospital {hid}")
            raw[hid] = (bytes(rep.sections[0]), bytes(rep.sections[1]))
            self._keys[hid] = _Keys(
                mask_raw=raw[hid][0],
                enc_raw=raw[hid][1],
                mask=load_x25519_public(rep.sections[0], sender=hid),
            )
            load_x25519_public(rep.sections[1], sender=hid)
        flat = [k for pair in raw.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise ProtocolError("secagg advertisements repeat a public key")
        u1 = sorted(opened)
        self._graph = neighbour_graph(
            u1, neighbours=self.config.params.neighbours, seed=graph_seed(self._session, raw)
        )
        req = pack_request(
            "share",
            round_=self.config.round,
            session=self._session,
            extra={"senders": u1},
            sections=[replies[h] for h in u1],
        )
        return self._send("share", dict.fromkeys(u1, req))

    def receive_share(self, replies: Mapping[int, bytes]) -> Requests:
        """Record commitments and encrypted shares; return stage 2 requests (forwarded shares).

        Raises
        ------
        SignatureError, ReplayError, ViewMismatchError, fedcrypt.exceptions.ProtocolError
            If a reply is forged, replayed, malformed or addressed to the wrong hospitals.
        TooFewSurvivorsError
            If fewer than ``threshold`` hospitals answered.
        """
        self._expect("share")
        opened = self._open("share", replies)
        cts: dict[tuple[int, int], bytes | memoryview] = {}
        for hid, rep in opened.items():
            recipients = header_ids(rep.header, "recipients")
            if set(recipients) != self._graph[hid]:
                raise ProtocolError(f"hospital {hid} shared with hospitals outside its graph")
            if len(rep.sections) != 1 + len(recipients) or len(rep.sections[0]) != 32:
                raise ProtocolError(f"malformed share message from hospital {hid}")
            self._commitments[hid] = bytes(rep.sections[0])
            for j, ct in zip(recipients, rep.sections[1:], strict=True):
                cts[(hid, j)] = ct
        u2 = tuple(sorted(opened))
        self._u2 = u2
        requests: Requests = {}
        for j in u2:
            senders = tuple(i for i in u2 if j in self._graph[i])
            self._senders[j] = senders
            requests[j] = pack_request(
                "masked_input",
                round_=self.config.round,
                session=self._session,
                extra={"senders": list(senders)},
                sections=[cts[(i, j)] for i in senders],
            )
        return self._send("masked_input", requests)

    def receive_masked_input(self, replies: Mapping[int, bytes]) -> Requests:
        """Sum the masked updates; return stage 3 requests (the survivor list).

        Raises
        ------
        SignatureError, ReplayError, ViewMismatchError, fedcrypt.exceptions.ProtocolError
            If a reply is forged, replayed or has the wrong size.
        TooFewSurvivorsError
            If fewer than ``threshold`` hospitals answered.
        """
        self._expect("masked_input")
        opened = self._open("masked_input", replies)
        size = self.config.vector_size + EXTRA
        dtype = unsigned_dtype(self.config.params.bits)
        total = np.zeros(size, dtype=dtype)
        for hid, rep in opened.items():
            if (
                rep.header.get("size") != size
                or len(rep.sections) != 1
                or len(rep.sections[0]) != size * dtype.itemsize
            ):
                raise ProtocolError(f"masked update from hospital {hid} has the wrong size")
            np.add(total, np.frombuffer(rep.sections[0], dtype=dtype), out=total)
        self._sum = total
        self._u3 = tuple(sorted(opened))
        req = pack_request(
            "unmask",
            round_=self.config.round,
            session=self._session,
            extra={"survivors": list(self._u3)},
        )
        return self._send("unmask", dict.fromkeys(self._u3, req))

    def receive_unmask(self, replies: Mapping[int, bytes]) -> bytes:
        """Reconstruct self-mask seeds of survivors and mask keys of dropouts; unmask the sum.

        Returns
        -------
        bytes
            The aggregate message: ``sum_i q_i (+ sum_i group masks)`` over the survivors
            of stage 2, for the hospitals to :meth:`~.SecAggHospital.unprotect`.

        Raises
        ------
        SignatureError, ReplayError, ViewMismatchError, fedcrypt.exceptions.ProtocolError
            If a reply is forged, replayed, or reveals the wrong shares.
        TooFewSurvivorsError
            If fewer than ``threshold`` hospitals answered, or fewer than ``threshold``
            shares of some secret arrived.
        ShareVerificationError
            If shares reconstruct a seed that does not match its commitment, or a key that
            does not match the advertised public key.
        """
        self._expect("unmask")
        opened = self._open("unmask", replies)
        u3 = set(self._u3)
        b_shares: dict[int, dict[int, int]] = {}
        s_shares: dict[int, dict[int, int]] = {}
        for hid, rep in opened.items():
            owners = sorted(set(self._senders[hid]) | {hid})
            kinds = "".join("b" if o in u3 else "s" for o in owners)
            if (
                header_ids(rep.header, "owners") != tuple(owners)
                or rep.header.get("kinds") != kinds
            ):
                raise ProtocolError(f"hospital {hid} revealed shares other than those asked")
            if len(rep.sections) != len(owners):
                raise ProtocolError(f"malformed unmask message from hospital {hid}")
            for owner, kind, blob in zip(owners, kinds, rep.sections, strict=True):
                target = b_shares if kind == "b" else s_shares
                target.setdefault(owner, {})[hid + 1] = shamir.decode(blob)
        assert self._sum is not None
        total = self._sum
        cfg = self.config
        masker = Masker(total.shape[0], cfg.params.bits)
        for i in self._u3:
            seed = _reconstruct(b_shares.get(i, {}), cfg.t, owner=i, what="self-mask seed")
            if commit(seed, session=self._session_bytes, owner=i) != self._commitments[i]:
                raise ShareVerificationError(
                    f"shares of hospital {i}'s self-mask seed do not match its commitment"
                )
            masker.apply(total, self_mask_key(seed, session=self._session_bytes, owner=i), sign=-1)
        for j in sorted(set(self._u2) - u3):
            secret = _reconstruct(s_shares.get(j, {}), cfg.t, owner=j, what="mask key")
            key = X25519PrivateKey.from_private_bytes(secret)
            if raw_public(key) != self._keys[j].mask_raw:
                raise ShareVerificationError(
                    f"shares of dropped hospital {j}'s mask key do not match its public key"
                )
            for i in self._senders[j]:
                if i in u3:  # i added +p_ij if i < j else -p_ij; take it back out
                    pkey = pairwise_key(
                        key, self._keys[i].mask, session=self._session_bytes, a=i, b=j
                    )
                    masker.apply(total, pkey, sign=-1 if i < j else 1)
            del key
        masker.wipe()
        header = {
            "scheme": SCHEME,
            "kind": "aggregate",
            "round": cfg.round,
            "session": self._session,
            "survivors": list(self._u3),
            "size": int(total.shape[0]),
            "params": cfg.params.to_json(),
        }
        self._aggregate = wire.pack(header, [total.data.cast("B")])
        self._sum = None
        self._next = "done"
        return self._aggregate

    # -- results -----------------------------------------------------------------------
    def aggregate(self) -> bytes:
        """The aggregate message of the finished round.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If the round has not finished.
        """
        if self._aggregate is None:
            raise ProtocolError("secagg round has not finished: no aggregate yet")
        return self._aggregate

    @property
    def survivors(self) -> tuple[int, ...]:
        """Hospitals whose updates are in the aggregate (known after stage 2)."""
        return self._u3

    @property
    def stage(self) -> str:
        """The stage whose replies the server expects next (``"done"`` at the end)."""
        return self._next


def _reconstruct(shares: Mapping[int, int], threshold: int, *, owner: int, what: str) -> bytes:
    """Combine the first ``threshold`` shares of a 32-byte secret."""
    if len(shares) < threshold:
        raise TooFewSurvivorsError(
            "unmask", len(shares), threshold, f"shares of hospital {owner}'s {what}"
        )
    chosen = {x: shares[x] for x in sorted(shares)[:threshold]}
    value = shamir.combine(chosen)
    if value >= 1 << (8 * KEY_BYTES):
        raise ShareVerificationError(f"shares of hospital {owner}'s {what} are inconsistent")
    return value.to_bytes(KEY_BYTES, "big")
