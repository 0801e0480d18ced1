"""What a secagg federation's portal and hospitals share: parameters, enrolment proof, bounds.

Both sides import this module: the relay (:mod:`fedcrypt.portal.services.relay`) and the
hospital's loop (:mod:`fedcrypt.portal.secagg_participant`). It holds no state and no
secret.

Enrolment (proof of possession)
-------------------------------
A hospital account enrols in a federation as hospital ``i`` of the federation's registry
by signing, with ``hospital-<i>.key``, the message::

    b"fedcrypt/portal/secagg-enrolment/v1\\x00" || registry fingerprint (32 bytes)
        || federation id (u64) || account id (u64) || hospital id (u64)

(integers 8-byte big-endian). The portal verifies it with the registry's public key of
hospital ``i`` and binds the account to ``i``: an account cannot claim another
hospital's id, and a proof made for one account, federation or registry is worthless
for another.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcrypt.exceptions import ConfigError
from fedcrypt.protection.secagg import STAGES, RoundConfig, SecAggParams, secure_threshold
from fedcrypt.protection.secagg.masking import EXTRA
from fedcrypt.protection.secagg.primitives import u64

ENROLMENT_DOMAIN = b"fedcrypt/portal/secagg-enrolment/v1\x00"
SIGNATURE_HEX = 128
#: Bytes a stage reply may use beyond its payload (header: ids, digests; signature).
REPLY_SLACK_BYTES = 64 << 10
#: Bytes per hospital a small stage's reply may add (encrypted shares, revealed shares).
REPLY_BYTES_PER_HOSPITAL = 1 << 10
#: Replies of one hospital the protocol may refuse in one stage before the relay stops
#: reading them (each refusal costs a signature check).
MAX_REFUSALS_PER_STAGE = 8


def enrolment_message(
    *, registry_fingerprint: str, federation_id: int, account_id: int, hospital_id: int
) -> bytes:
    """The bytes a hospital signs to enrol (see the module docstring).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If ``registry_fingerprint`` is not 64 hex digits or an integer is out of range.
    """
    try:
        fp = bytes.fromhex(registry_fingerprint)
    except ValueError:
        fp = b""
    if len(fp) != 32:
        raise ConfigError("a registry fingerprint is 64 hex digits")
    if min(federation_id, account_id, hospital_id) < 0:
        raise ConfigError("ids must be non-negative")
    return ENROLMENT_DOMAIN + fp + u64(federation_id) + u64(account_id) + u64(hospital_id)


def sign_enrolment(
    key: Ed25519PrivateKey,
    *,
    registry_fingerprint: str,
    federation_id: int,
    account_id: int,
    hospital_id: int,
) -> str:
    """The hospital's enrolment signature (hex, 128 digits) with its identity key."""
    msg = enrolment_message(
        registry_fingerprint=registry_fingerprint,
        federation_id=federation_id,
        account_id=account_id,
        hospital_id=hospital_id,
    )
    return key.sign(msg).hex()


def verify_enrolment(
    key: Ed25519PublicKey,
    signature_hex: str,
    *,
    registry_fingerprint: str,
    federation_id: int,
    account_id: int,
    hospital_id: int,
) -> bool:
    """Whether ``signature_hex`` is hospital ``hospital_id``'s enrolment for this account."""
    try:
        sig = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    if len(sig) != SIGNATURE_HEX // 2:
        return False
    msg = enrolment_message(
        registry_fingerprint=registry_fingerprint,
        federation_id=federation_id,
        account_id=account_id,
        hospital_id=hospital_id,
    )
    try:
        key.verify(sig, msg)
    except InvalidSignature:
        return False
    return True


def default_params(*, hospitals: int, group_mask: bool) -> SecAggParams:
    """The consortium's parameters for a registry of ``hospitals`` hospitals.

    The protocol's defaults (32-bit values, clip 4.0, 65,536 examples per hospital at
    most, the complete graph, one colluder tolerated) with ``max_hospitals`` the
    registry's size, which keeps the fixed-point scale as fine as the overflow bound
    allows: the same as ``SecAggOptions(group_mask=...).params(config)`` of a
    simulation with that many hospitals.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the parameters could overflow.
    """
    return SecAggParams(max_hospitals=hospitals, group_mask=group_mask)


def params_to_text(params: SecAggParams) -> str:
    """The parameters as stored with the federation (canonical JSON)."""
    return json.dumps(params.to_json(), sort_keys=True, separators=(",", ":"))


def params_from_json(data: Any) -> SecAggParams:
    """Parameters from their JSON form (:meth:`SecAggParams.to_json`).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If ``data`` does not describe valid parameters.
    """
    try:
        p = dict(data)
        return SecAggParams(
            bits=int(p["bits"]),
            clip=float(p["clip"]),
            max_hospitals=int(p["max_hospitals"]),
            max_examples=int(p["max_examples"]),
            scale=float(p["scale"]),
            neighbours=None if p["neighbours"] is None else int(p["neighbours"]),
            group_mask=bool(p["group_mask"]),
            colluders=int(p["colluders"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid secagg parameters: {exc}") from exc


def round_threshold(*, invited: int, quorum: int, params: SecAggParams) -> int:
    """The Shamir threshold ``t`` of a session with ``invited`` hospitals.

    ``t = min(invited, max(quorum, secure_threshold(invited, params.colluders)))``: never
    below what is secure against an active server colluding with ``params.colluders``
    hospitals (Bell et al. 2020), and at least the federation's quorum, so a session
    that keeps fewer than ``t`` hospitals at any stage fails (the quorum is the
    fewest contributors a round may have).
    """
    return min(invited, max(quorum, secure_threshold(invited, params.colluders)))


def reply_limit(stage: str, config: RoundConfig) -> int:
    """The most bytes a hospital's reply to ``stage`` may have in a session of ``config``.

    ``masked_input``: the masked vector (``(P + 2) * bits / 8`` bytes) plus
    :data:`REPLY_SLACK_BYTES`; every other stage: :data:`REPLY_SLACK_BYTES` plus
    :data:`REPLY_BYTES_PER_HOSPITAL` per invited hospital (the largest honest replies,
    encrypted or revealed Shamir shares, are about 200 bytes per hospital).

    Raises
    ------
    ValueError
        If ``stage`` is not a protocol stage.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown secagg stage {stage!r}")
    if stage == "masked_input":
        return (config.vector_size + EXTRA) * config.params.value_bytes + REPLY_SLACK_BYTES
    return REPLY_SLACK_BYTES + REPLY_BYTES_PER_HOSPITAL * len(config.hospital_ids)
