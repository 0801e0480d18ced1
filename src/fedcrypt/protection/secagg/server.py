"""The server side of ``secagg``: routes messages, sums masked updates, removes masks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import shamir
from fedcrypt.protection.secagg.config import RoundConfig
from fedcrypt.protection.secagg.errors import (
    DeadlineError,
    ReplayError,
    ShareVerificationError,
    SignatureError,
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
    SIGNATURE_BYTES,
    STAGES,
    consistency_message,
    digest,
    header_ids,
    open_reply,
    pack_request,
    verify_consistency,
)
from fedcrypt.protection.secagg.primitives import KEY_BYTES, commit

logger = logging.getLogger(__name__)

Requests = dict[int, bytes]
Clock = Callable[[], float]


@dataclass(frozen=True)
class _Keys:
    mask_raw: bytes
    enc_raw: bytes
    mask: X25519PublicKey


@dataclass(frozen=True)
class Rejection:
    """A hospital reply the server refused (the hospital then counts as dropped out).

    Attributes
    ----------
    stage : str
        The stage it answered.
    hospital : int
        The hospital it claimed to come from.
    error : fedcrypt.exceptions.ProtocolError
        Why: :class:`SignatureError` (unregistered key, bad signature),
        :class:`ReplayError`, :class:`SessionMismatchError`, :class:`DeadlineError`,
        :class:`ViewMismatchError`, or a plain ``ProtocolError`` (malformed).
    """

    stage: str
    hospital: int
    error: ProtocolError


class SecAggServer:
    """The server's side of one ``secagg`` round; it holds public material only.

    Five stages (:data:`~.messages.STAGES`). Each ``receive_*`` method takes the
    hospitals' replies to the previous requests (a hospital missing from the mapping has
    dropped out) and returns the next stage's requests, ``hospital id -> bytes``;
    :meth:`receive_unmask` returns the aggregate. Replies may also be handed in one at a
    time as they arrive (:meth:`submit`, e.g. by an asynchronous relay), then the stage
    closed with ``receive_*()`` without arguments.

    A reply that fails a check (signed by an unregistered key, replayed, for another
    session, after the stage's deadline, answering a tampered request, malformed) is
    refused: it is recorded in :attr:`rejections`, logged, and its hospital counts as
    dropped out. The round then completes without it if enough hospitals remain, or
    fails loudly with :class:`TooFewSurvivorsError` (a ``DropoutError``).

    Parameters
    ----------
    config : RoundConfig
        The round's configuration (round number, invited hospitals, threshold, params).
    registry : mapping of int to Ed25519PublicKey
        Registered signing keys of (at least) the invited hospitals.
    clock : callable, optional
        Monotonic seconds (default: ``time.monotonic``; inject in tests).
    stage_timeout : float, optional
        Seconds hospitals have to answer each stage, from when its requests are made;
        later replies are refused with :class:`DeadlineError` (default: None, no
        deadline).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If an invited hospital has no registered key, or ``stage_timeout`` is not
        positive.
    """

    scheme = SCHEME

    def __init__(
        self,
        config: RoundConfig,
        *,
        registry: Mapping[int, Ed25519PublicKey],
        clock: Clock = time.monotonic,
        stage_timeout: float | None = None,
    ) -> None:
        missing = [i for i in config.hospital_ids if i not in registry]
        if missing:
            raise ConfigError(f"hospitals {missing} have no registered signing key")
        if stage_timeout is not None and not stage_timeout > 0:
            raise ConfigError(f"stage_timeout must be positive seconds, got {stage_timeout}")
        self.config = config
        self._registry = {i: registry[i] for i in config.hospital_ids}
        self._session = config.session
        self._session_bytes = bytes.fromhex(config.session)
        self._clock = clock
        self._timeout = stage_timeout
        self._next = "advertise"
        self._sent: dict[int, str] = {}
        self._deadline: float | None = None
        self._accepted: dict[int, Any] = {}
        self.rejections: list[Rejection] = []
        self._keys: dict[int, _Keys] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._commitments: dict[int, bytes] = {}
        self._senders: dict[int, tuple[int, ...]] = {}
        self._u2: tuple[int, ...] = ()
        self._u3: tuple[int, ...] = ()
        self._u4: tuple[int, ...] = ()
        self._consistency_message = b""
        self._sum: NDArray[np.unsignedinteger] | None = None
        self._aggregate: bytes | None = None

    # -- helpers -----------------------------------------------------------------------
    def _expect(self, stage: str) -> None:
        if self._next != stage:
            raise ProtocolError(f"secagg server is at stage {self._next!r}, not {stage!r}")

    def _send(self, stage: str, requests: Requests) -> Requests:
        self._sent = {hid: digest(req) for hid, req in requests.items()}
        self._accepted = {}
        self._next = stage
        self._deadline = None if self._timeout is None else self._clock() + self._timeout
        return requests

    def _required(self, stage: str) -> int:
        """Fewest valid replies a stage needs for the round to be able to finish."""
        return self.config.t if stage == "unmask" else self.config.signatures_needed

    def submit(self, hospital_id: int, reply: bytes) -> None:
        """Check and keep one hospital's reply to the current stage, as it arrives.

        Parameters
        ----------
        hospital_id : int
            The hospital the reply came from (as the transport authenticated it).
        reply : bytes
            Its reply.

        Raises
        ------
        DeadlineError
            If the stage's deadline has passed.
        SignatureError
            If the reply names an unregistered sender or its signature does not verify
            (e.g. signed by an unregistered key).
        ReplayError
            If it is for another round or stage, or this hospital already answered.
        SessionMismatchError
            If it is for another session.
        ViewMismatchError
            If it answers another request than the one sent to this hospital.
        fedcrypt.exceptions.ProtocolError
            If it is malformed, or the hospital was not asked. Every refusal is also
            recorded in :attr:`rejections`; the hospital counts as dropped out unless a
            later valid reply arrives before the stage closes.
        """
        stage = self._next
        try:
            self._accepted[hospital_id] = self._check(stage, hospital_id, reply)
        except ProtocolError as exc:
            self.rejections.append(Rejection(stage=stage, hospital=hospital_id, error=exc))
            logger.warning(
                "secagg round %d: refused hospital %s's %r reply: %s",
                self.config.round,
                hospital_id,
                stage,
                exc,
            )
            raise

    def _check(self, stage: str, hid: int, reply: bytes) -> Any:
        if stage not in STAGES or not self._sent:
            raise ProtocolError(f"secagg server expects no replies now (stage {stage!r})")
        if hid not in self._sent:
            raise ProtocolError(f"secagg {stage!r} reply from hospital {hid}, who was not asked")
        if hid in self._accepted:
            raise ReplayError(f"hospital {hid} already answered stage {stage!r}")
        if self._deadline is not None:
            late = self._clock() - self._deadline
            if late > 0:
                raise DeadlineError(
                    f"hospital {hid}'s {stage!r} reply arrived {late:.1f} s after the deadline",
                    late_by=late,
                )
        rep = open_reply(
            reply,
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
        if stage == "advertise":
            return self._check_advertise(hid, rep.sections, reply)
        if stage == "share":
            return self._check_share(hid, rep.header, rep.sections)
        if stage == "masked_input":
            return self._check_masked_input(hid, rep.header, rep.sections)
        if stage == "consistency":
            return self._check_consistency(hid, rep.header, rep.sections)
        return self._check_unmask(hid, rep.header, rep.sections)

    def _collect(self, stage: str, replies: Mapping[int, bytes] | None) -> dict[int, Any]:
        """Submit ``replies`` (refusals are recorded, not raised) and close ``stage``."""
        self._expect(stage)
        for hid in sorted(replies or {}):
            try:
                self.submit(hid, (replies or {})[hid])
            except ProtocolError:
                pass  # recorded in self.rejections; the hospital counts as dropped out
        accepted = dict(sorted(self._accepted.items()))
        dropped = len(self._sent) - len(accepted)
        if dropped:
            logger.warning(
                "secagg round %d: %d hospital(s) dropped out or were refused at stage %r",
                self.config.round,
                dropped,
                stage,
            )
        need = self._required(stage)
        if len(accepted) < need:
            refused = [r for r in self.rejections if r.stage == stage]
            detail = "; ".join(f"hospital {r.hospital} refused: {r.error}" for r in refused)
            self._next = "aborted"
            raise TooFewSurvivorsError(stage, len(accepted), need, detail)
        self._sent = {}
        return accepted

    # -- per-stage checks --------------------------------------------------------------
    def _check_advertise(self, hid: int, sections: Any, reply: bytes) -> tuple[_Keys, bytes]:
        if len(sections) != 2:
            raise ProtocolError(f"malformed advertisement from hospital {hid}")
        mask_raw, enc_raw = bytes(sections[0]), bytes(sections[1])
        keys = _Keys(mask_raw, enc_raw, load_x25519_public(mask_raw, sender=hid))
        load_x25519_public(enc_raw, sender=hid)
        seen = {k for other, _ in self._accepted.values() for k in (other.mask_raw, other.enc_raw)}
        if mask_raw == enc_raw or mask_raw in seen or enc_raw in seen:
            raise ProtocolError(f"hospital {hid}'s advertisement repeats a public key")
        return keys, reply

    def _check_share(self, hid: int, header: dict[str, Any], sections: Any) -> Any:
        recipients = header_ids(header, "recipients")
        if set(recipients) != self._graph[hid]:
            raise ProtocolError(f"hospital {hid} shared with hospitals outside its graph")
        if len(sections) != 1 + len(recipients) or len(sections[0]) != 32:
            raise ProtocolError(f"malformed share message from hospital {hid}")
        return bytes(sections[0]), dict(zip(recipients, sections[1:], strict=True))

    def _check_masked_input(self, hid: int, header: dict[str, Any], sections: Any) -> Any:
        size = self.config.vector_size + EXTRA
        dtype = unsigned_dtype(self.config.params.bits)
        if (
            header.get("size") != size
            or len(sections) != 1
            or len(sections[0]) != size * dtype.itemsize
        ):
            raise ProtocolError(f"masked update from hospital {hid} has the wrong size")
        return np.frombuffer(sections[0], dtype=dtype)

    def _check_consistency(self, hid: int, header: dict[str, Any], sections: Any) -> bytes:
        if header_ids(header, "survivors") != self._u3:
            raise ProtocolError(f"hospital {hid} signed a survivor set other than the one sent")
        if len(sections) != 1 or len(sections[0]) != SIGNATURE_BYTES:
            raise ProtocolError(f"malformed consistency reply from hospital {hid}")
        sig = bytes(sections[0])
        if not verify_consistency(self._registry[hid], sig, self._consistency_message):
            raise SignatureError(f"hospital {hid}'s consistency signature does not verify")
        return sig

    def _check_unmask(self, hid: int, header: dict[str, Any], sections: Any) -> Any:
        u3 = set(self._u3)
        owners = sorted(set(self._senders[hid]) | {hid})
        kinds = "".join("b" if o in u3 else "s" for o in owners)
        if header_ids(header, "owners") != tuple(owners) or header.get("kinds") != kinds:
            raise ProtocolError(f"hospital {hid} revealed shares other than those asked")
        if len(sections) != len(owners):
            raise ProtocolError(f"malformed unmask message from hospital {hid}")
        return [
            (owner, kind, shamir.decode(blob))
            for owner, kind, blob in zip(owners, kinds, sections, strict=True)
        ]

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

    def receive_advertise(self, replies: Mapping[int, bytes] | None = None) -> Requests:
        """Keep the valid advertisements; return stage 1 requests (all of them, to each).

        Raises
        ------
        TooFewSurvivorsError
            If fewer valid replies than :attr:`RoundConfig.signatures_needed` (``t`` with
            the complete graph) arrived.
        """
        opened = self._collect("advertise", replies)
        raw: dict[int, tuple[bytes, bytes]] = {}
        for hid, (keys, _) in opened.items():
            self._keys[hid] = keys
            raw[hid] = (keys.mask_raw, keys.enc_raw)
        u1 = sorted(opened)
        self._graph = neighbour_graph(
            u1, neighbours=self.config.params.neighbours, seed=graph_seed(self._session, raw)
        )
        req = pack_request(
            "share",
            round_=self.config.round,
            session=self._session,
            extra={"senders": u1},
            sections=[opened[h][1] for h in u1],
        )
        return self._send("share", dict.fromkeys(u1, req))

    def receive_share(self, replies: Mapping[int, bytes] | None = None) -> Requests:
        """Record commitments and encrypted shares; return stage 2 requests (forwarded shares).

        Raises
        ------
        TooFewSurvivorsError
            If too few valid replies arrived.
        """
        opened = self._collect("share", replies)
        cts: dict[tuple[int, int], bytes | memoryview] = {}
        for hid, (commitment, by_recipient) in opened.items():
            self._commitments[hid] = commitment
            for j, ct in by_recipient.items():
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

    def receive_masked_input(self, replies: Mapping[int, bytes] | None = None) -> Requests:
        """Sum the masked updates; return stage 3 requests (the survivor set ``U3`` to sign).

        Raises
        ------
        TooFewSurvivorsError
            If too few valid replies arrived.
        """
        opened = self._collect("masked_input", replies)
        size = self.config.vector_size + EXTRA
        total = np.zeros(size, dtype=unsigned_dtype(self.config.params.bits))
        for vec in opened.values():
            np.add(total, vec, out=total)
        self._sum = total
        self._u3 = tuple(sorted(opened))
        self._consistency_message = consistency_message(self._session, self.config.round, self._u3)
        req = pack_request(
            "consistency",
            round_=self.config.round,
            session=self._session,
            extra={"survivors": list(self._u3)},
        )
        return self._send("consistency", dict.fromkeys(self._u3, req))

    def receive_consistency(self, replies: Mapping[int, bytes] | None = None) -> Requests:
        """Collect signatures over ``U3``; return stage 4 requests (``U3`` and the signatures).

        Raises
        ------
        TooFewSurvivorsError
            If fewer valid signatures than :attr:`RoundConfig.signatures_needed` arrived.
        """
        opened = self._collect("consistency", replies)
        self._u4 = tuple(sorted(opened))
        req = pack_request(
            "unmask",
            round_=self.config.round,
            session=self._session,
            extra={"survivors": list(self._u3), "signers": list(self._u4)},
            sections=[opened[h] for h in self._u4],
        )
        return self._send("unmask", dict.fromkeys(self._u4, req))

    def receive_unmask(self, replies: Mapping[int, bytes] | None = None) -> bytes:
        """Reconstruct self-mask seeds of survivors and mask keys of dropouts; unmask the sum.

        Returns
        -------
        bytes
            The aggregate message: ``sum_i q_i (+ sum_i group masks)`` over ``U3``, with
            the round configuration and ``U3``, for the hospitals to
            :meth:`~.SecAggHospital.unprotect`.

        Raises
        ------
        TooFewSurvivorsError
            If fewer than ``threshold`` valid replies arrived, or fewer than
            ``threshold`` shares of some secret.
        ShareVerificationError
            If shares reconstruct a seed that does not match its commitment, or a key that
            does not match the advertised public key.
        """
        opened = self._collect("unmask", replies)
        b_shares: dict[int, dict[int, int]] = {}
        s_shares: dict[int, dict[int, int]] = {}
        for hid, revealed in opened.items():
            for owner, kind, value in revealed:
                target = b_shares if kind == "b" else s_shares
                target.setdefault(owner, {})[hid + 1] = value
        assert self._sum is not None
        total = self._sum
        cfg = self.config
        u3 = set(self._u3)
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
            "config": cfg.to_json(),
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
        """``U3``: hospitals whose updates are in the aggregate (known after stage 2)."""
        return self._u3

    @property
    def signers(self) -> tuple[int, ...]:
        """``U4``: hospitals whose consistency signatures were forwarded (after stage 3)."""
        return self._u4

    @property
    def rejected(self) -> dict[int, ProtocolError]:
        """The last refusal per hospital over the round (see :attr:`rejections`)."""
        return {r.hospital: r.error for r in self.rejections}

    @property
    def stage(self) -> str:
        """The stage whose replies the server expects next (``"done"``, ``"aborted"``)."""
        return self._next

    @property
    def deadline(self) -> float | None:
        """Clock time after which replies to the current stage are refused (or None)."""
        return self._deadline

    @property
    def awaiting(self) -> tuple[int, ...]:
        """Hospitals asked in the current stage that have not yet given a valid reply."""
        return tuple(sorted(set(self._sent) - set(self._accepted)))


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
