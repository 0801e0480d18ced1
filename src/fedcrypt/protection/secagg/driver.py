"""Runs one ``secagg`` round in process between hospital objects and a server object."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from numpy.typing import NDArray

from fedcrypt.protection.base import AggregateResult
from fedcrypt.protection.secagg.config import SecAggParams
from fedcrypt.protection.secagg.hospital import SecAggHospital
from fedcrypt.protection.secagg.messages import STAGES
from fedcrypt.protection.secagg.server import SecAggServer

Intercept = Callable[[str, str, int, bytes], bytes | None]
"""``intercept(stage, direction, hospital_id, message) -> message or None``.

``direction`` is ``"request"`` (server to hospital) or ``"reply"``; returning ``None``
drops the message (the hospital then counts as dropped out from that stage on).
"""


@dataclass
class RoundReport:
    """What one in-process round produced and cost.

    Attributes
    ----------
    aggregate : bytes
        The server's aggregate message.
    result : AggregateResult or None
        The aggregate as unprotected by the first hospital still present at the end
        (``None`` when ``unprotect=False``).
    survivors : tuple of int
        Hospitals whose updates are in the aggregate.
    bytes_up : dict of int to int
        Bytes each hospital sent over the whole round.
    bytes_down : dict of int to int
        Bytes each hospital received (requests, plus the aggregate if still present).
    masked_bytes : dict of int to int
        Size of each hospital's masked-input message (the bulk of the upload).
    hospital_seconds : dict of int to dict of str to float
        Per hospital and stage (``advertise``, ``share``, ``masked_input``,
        ``consistency``, ``unmask``, ``unprotect``), seconds of wall time spent in the
        hospital object.
    server_seconds : dict of str to float
        Per stage, seconds spent in the server object.
    signers : tuple of int
        Hospitals whose consistency signatures the server forwarded (``U4``).
    rejected : dict of int to str
        Replies the server refused (the hospital then counted as dropped out), as
        ``hospital id -> "stage: ErrorClass: message"``.
    """

    aggregate: bytes
    result: AggregateResult | None
    survivors: tuple[int, ...]
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    masked_bytes: dict[int, int] = field(default_factory=dict)
    hospital_seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    signers: tuple[int, ...] = ()
    rejected: dict[int, str] = field(default_factory=dict)

    def protect_seconds(self, hospital_id: int) -> float:
        """Seconds hospital ``hospital_id`` spent in the five protocol stages."""
        per = self.hospital_seconds.get(hospital_id, {})
        return sum(v for k, v in per.items() if k in STAGES)


def run_round(
    server: SecAggServer,
    hospitals: Mapping[int, SecAggHospital],
    inputs: Mapping[int, tuple[NDArray[np.floating], int]],
    *,
    dropouts: Mapping[str, Collection[int]] | None = None,
    intercept: Intercept | None = None,
    unprotect: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> RoundReport:
    """Drive a full round: five request/response stages, then unprotect.

    Exceptions raised by a hospital propagate (a hospital that detects tampering or an
    inconsistent view aborts the round loudly rather than silently dropping out). A
    reply the server refuses (see :class:`~.server.SecAggServer`) only drops that
    hospital; too few remaining raises :class:`~.errors.TooFewSurvivorsError`.

    Parameters
    ----------
    server : SecAggServer
        A fresh server for the round.
    hospitals : mapping of int to SecAggHospital
        At least the invited hospitals.
    inputs : mapping of int to (numpy.ndarray, int)
        ``hospital id -> (update of shape (P,), num_examples)``.
    dropouts : mapping of str to collection of int, optional
        ``stage -> hospitals`` that stop before answering that stage (and every later
        one). ``"consistency"`` means after sending the masked update (their update is
        still in the sum); ``"unmask"`` after signing the survivor set.
    intercept : callable, optional
        Sees (and may replace or drop) every request and reply; see :data:`Intercept`.
    unprotect : bool, optional
        Unprotect the aggregate at the first remaining hospital (default: True).
    clock : callable, optional
        Monotonic seconds (default: ``time.perf_counter``).

    Raises
    ------
    ValueError
        If ``dropouts`` names an unknown stage.
    fedcrypt.exceptions.FedcryptError
        Whatever the protocol raises (tampering, replay, too few survivors, ...).
    """
    drops = {s: set(v) for s, v in (dropouts or {}).items()}
    bad = set(drops) - set(STAGES)
    if bad:
        raise ValueError(f"dropouts names unknown stages {sorted(bad)}; use {STAGES}")
    gone: set[int] = set()
    ids = server.config.hospital_ids
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    masked: dict[int, int] = {}
    h_secs: dict[int, dict[str, float]] = {i: {} for i in ids}
    s_secs: dict[str, float] = {}

    t0 = clock()
    requests = server.request_advertise()
    s_secs["request_advertise"] = clock() - t0
    aggregate = b""
    for stage in STAGES:
        gone |= drops.get(stage, set())
        replies: dict[int, bytes] = {}
        for hid, req in requests.items():
            if hid in gone:
                continue
            msg = intercept(stage, "request", hid, req) if intercept else req
            if msg is None:
                gone.add(hid)
                continue
            down[hid] += len(msg)
            hosp = hospitals[hid]
            t0 = clock()
            if stage == "advertise":
                reply = hosp.stage_advertise(msg)
            elif stage == "share":
                reply = hosp.stage_share(msg)
            elif stage == "masked_input":
                update, n = inputs[hid]
                reply = hosp.stage_masked_input(msg, update=update, num_examples=n)
            elif stage == "consistency":
                reply = hosp.stage_consistency(msg)
            else:
                reply = hosp.stage_unmask(msg)
            h_secs[hid][stage] = clock() - t0
            out = intercept(stage, "reply", hid, reply) if intercept else reply
            if out is None:
                gone.add(hid)
                continue
            up[hid] += len(out)
            if stage == "masked_input":
                masked[hid] = len(out)
            replies[hid] = out
        t0 = clock()
        if stage == "advertise":
            requests = server.receive_advertise(replies)
        elif stage == "share":
            requests = server.receive_share(replies)
        elif stage == "masked_input":
            requests = server.receive_masked_input(replies)
        elif stage == "consistency":
            requests = server.receive_consistency(replies)
        else:
            aggregate = server.receive_unmask(replies)
        s_secs[stage] = clock() - t0

    result: AggregateResult | None = None
    present = [i for i in ids if i not in gone]
    for hid in present:
        down[hid] += len(aggregate)
    if unprotect and present:
        first = present[0]
        t0 = clock()
        result = hospitals[first].unprotect(aggregate)
        h_secs[first]["unprotect"] = clock() - t0
    return RoundReport(
        aggregate=aggregate,
        result=result,
        survivors=server.survivors,
        bytes_up=up,
        bytes_down=down,
        masked_bytes=masked,
        hospital_seconds=h_secs,
        server_seconds=s_secs,
        signers=server.signers,
        rejected={
            r.hospital: f"{r.stage}: {type(r.error).__name__}: {r.error}" for r in server.rejections
        },
    )


def new_consortium(
    hospital_ids: Collection[int],
    *,
    params: SecAggParams,
    consortium_key: bytes | None = None,
    rng: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[dict[int, SecAggHospital], dict[int, Ed25519PublicKey]]:
    """Fresh hospitals with new Ed25519 keys and their registry (simulation and tests).

    Parameters
    ----------
    hospital_ids : collection of int
        Distinct ids.
    params : SecAggParams
        Shared parameters.
    consortium_key : bytes, optional
        Shared by all hospitals; generated when ``params.group_mask`` and not given.
    rng : callable, optional
        Randomness for every key and hospital (default: ``secrets.token_bytes``).

    Returns
    -------
    hospitals : dict of int to SecAggHospital
    registry : dict of int to Ed25519PublicKey
        What the server is given.
    """
    signing = {i: Ed25519PrivateKey.from_private_bytes(rng(32)) for i in hospital_ids}
    registry = {i: k.public_key() for i, k in signing.items()}
    if params.group_mask and consortium_key is None:
        consortium_key = rng(32)
    hospitals = {
        i: SecAggHospital(
            i,
            signing_key=signing[i],
            registry=registry,
            params=params,
            consortium_key=consortium_key,
            rng=rng,
        )
        for i in hospital_ids
    }
    return hospitals, registry
