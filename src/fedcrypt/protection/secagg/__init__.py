"""``secagg``: pairwise-masking secure aggregation, safe against an active server.

The protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, in its malicious-server variant (§4: signed keys, the
consistency-check round, the subset and size checks), with the SecAgg+ neighbour graph of
Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020,
and a session-bound consortium *group mask* so the server cannot read even the sum.
Transport-agnostic: each stage is one request (bytes) from the server to each hospital and
one signed reply (bytes) back. See ``docs/secagg.md`` for the protocol, bounds and threat
model.

Roles
-----
:class:`SecAggHospital` (long-term Ed25519 signing key, consortium key, registry of public
keys; a state file so old rounds are refused across restarts)::

    reply = h.stage_advertise(request)                  # 0: signed X25519 keys
    reply = h.stage_share(request)                      # 1: encrypted Shamir shares
    reply = h.stage_masked_input(request, update=x, num_examples=n)   # 2: masked update
    reply = h.stage_consistency(request)                # 3: signs the survivor set U3
    reply = h.stage_unmask(request)                     # 4: shares, after >= t signatures
    result = h.unprotect(aggregate)                     # AggregateResult (FedAvg mean)
    blob = h.export_state(); h2.import_state(blob)      # stateless hosts (SECRET blob)

:class:`SecAggServer` (one per round; public keys only)::

    reqs = s.request_advertise()          # {hospital_id: bytes}
    reqs = s.receive_advertise(replies)   # replies: {hospital_id: bytes}; missing = dropped
    reqs = s.receive_share(replies)
    reqs = s.receive_masked_input(replies)
    reqs = s.receive_consistency(replies)
    aggregate = s.receive_unmask(replies) # bytes, broadcast to the hospitals
    s.submit(hospital_id, reply)          # or one reply at a time, then receive_*()

:func:`run_round` drives all of this in process (tests, benchmarks, simulation), with
optional dropouts per stage and a hook to tamper with messages. Key files for real sites:
:mod:`fedcrypt.protection.secagg.keys`.

Errors (all :class:`~fedcrypt.exceptions.FedcryptError`): :class:`SignatureError`,
:class:`ReplayError`, :class:`SessionMismatchError`, :class:`DeadlineError`,
:class:`ConsistencyError`, :class:`ShareAuthenticationError`,
:class:`ShareVerificationError`, :class:`ViewMismatchError` (all
:class:`~fedcrypt.exceptions.ProtocolError`), :class:`TooFewSurvivorsError` (a
:class:`~fedcrypt.exceptions.DropoutError`) and :class:`StateFileError` (a
:class:`~fedcrypt.exceptions.ConfigError`).

Example
-------
>>> import numpy as np
>>> params = SecAggParams()
>>> hospitals, registry = new_consortium([1, 2, 3], params=params)
>>> config = RoundConfig(round=1, hospital_ids=(1, 2, 3), vector_size=4, params=params)
>>> server = SecAggServer(config, registry=registry)
>>> inputs = {i: (np.full(4, 0.1 * i), 10 * i) for i in (1, 2, 3)}
>>> report = run_round(server, hospitals, inputs)
>>> round(float(report.result.mean[0]), 4), report.result.total_examples
(0.2333, 60)
"""

from __future__ import annotations

from fedcrypt.protection.secagg.config import (
    DEFAULT_COLLUDERS,
    RoundConfig,
    SecAggParams,
    default_threshold,
    secure_threshold,
)
from fedcrypt.protection.secagg.driver import RoundReport, new_consortium, run_round
from fedcrypt.protection.secagg.errors import (
    ConsistencyError,
    DeadlineError,
    ReplayError,
    SessionMismatchError,
    ShareAuthenticationError,
    ShareVerificationError,
    SignatureError,
    StateFileError,
    TooFewSurvivorsError,
    ViewMismatchError,
)
from fedcrypt.protection.secagg.hospital import (
    SecAggHospital,
    decode_aggregate,
    generate_consortium_key,
    read_aggregate,
)
from fedcrypt.protection.secagg.messages import SCHEME, STAGES
from fedcrypt.protection.secagg.server import Rejection, SecAggServer

__all__ = [
    "DEFAULT_COLLUDERS",
    "SCHEME",
    "STAGES",
    "ConsistencyError",
    "DeadlineError",
    "Rejection",
    "ReplayError",
    "RoundConfig",
    "RoundReport",
    "SecAggHospital",
    "SecAggParams",
    "SecAggServer",
    "SessionMismatchError",
    "ShareAuthenticationError",
    "ShareVerificationError",
    "SignatureError",
    "StateFileError",
    "TooFewSurvivorsError",
    "ViewMismatchError",
    "decode_aggregate",
    "default_threshold",
    "generate_consortium_key",
    "new_consortium",
    "read_aggregate",
    "run_round",
    "secure_threshold",
]
