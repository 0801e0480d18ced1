"""A hospital's loop in a secagg federation: enrol, join, answer the five stages, unmask.

Round ``r`` at one hospital: check in; answer each request the relay holds for it
(``advertise``, ``share``, ``masked_input``: train from the global model it holds and
send the masked *delta* local − global weighted by its example count, ``consistency``,
``unmask``); when the round is aggregated, download the aggregate, remove the group mask
(:meth:`~fedcrypt.protection.secagg.SecAggHospital.unprotect_missed`), add the mean
delta to the global model it holds, evaluate, report. The global model is the initial
model plus every round's mean delta, applied in order, so every hospital holds the
same one; a hospital that joins late, drops out of a round or restarts rebuilds it from
the published aggregates.

What stays at the hospital: its identity key, the group-mask key, the round's X25519
keys, self-mask seed and received Shamir shares (in memory only: a hospital that
restarts mid-round cannot continue that session; it follows from the round's aggregate
and takes part again from the next round), and its state file (the protocol rounds it
joined, so it never joins one twice).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, KeyMaterialError, ProtocolError
from fedcrypt.portal.client import PortalClient, PortalClientError
from fedcrypt.portal.participant import (
    EventHook,
    ParticipationConfig,
    RoundOutcome,
    check_not_cancelled,
    evaluate_global,
    make_site,
    retry,
    state_vector,
    write_record,
)
from fedcrypt.portal.schemas import FederationPublic, SecAggTurn
from fedcrypt.portal.secagg import params_from_json, sign_enrolment
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import DEFAULT_COLLUDERS, SecAggHospital
from fedcrypt.protection.secagg.keys import load_identity, load_registry, open_hospital
from fedcrypt.site import LocalSite


@dataclass
class _Held:
    """The global model this hospital holds and the protocol round it is at."""

    vector: NDArray[np.float64]
    round: int = 0
    protocol_round: int = 0


@dataclass
class _RoundState:
    """One portal round at this hospital."""

    number: int
    delta: NDArray[np.float64] | None = None
    train_loss: float = float("nan")
    up: int = 0
    down: int = 0
    protect_s: float = 0.0
    wait_s: float = 0.0
    #: (attempt, stage) -> (request digest, reply): re-sent if the relay asks again.
    sent: dict[tuple[int, str], tuple[str, bytes]] = field(default_factory=dict)
    #: Sessions whose keys this process made (it answered their advertise stage).
    sessions: set[int] = field(default_factory=set)
    said: str = ""


def open_secagg_hospital(
    client: PortalClient, fed: FederationPublic, config: ParticipationConfig, out_dir: Path
) -> SecAggHospital:
    """This hospital's protocol object from its key files, checked against the federation.

    Raises
    ------
    fedcrypt.exceptions.KeyMaterialError
        If ``--key`` is missing or is not an identity key of the federation's registry,
        or the group-mask key is missing or of another consortium.
    fedcrypt.exceptions.ConfigError
        If the federation's parameters tolerate fewer colluding hospitals than
        :data:`~fedcrypt.protection.secagg.DEFAULT_COLLUDERS`.
    """
    if config.key_file is None:
        raise KeyMaterialError(
            "this federation uses secagg: pass --key with your hospital-<i>.key (your own "
            "identity key, secret)"
        )
    if fed.secagg_params is None or fed.key_fingerprint is None:
        raise PortalClientError(f"federation {fed.name!r} has no registry yet")
    params = params_from_json(fed.secagg_params)
    if params.colluders < DEFAULT_COLLUDERS:
        raise ConfigError(
            f"federation {fed.name!r}'s secagg parameters tolerate {params.colluders} "
            f"hospital(s) colluding with the server; this hospital requires at least "
            f"{DEFAULT_COLLUDERS}"
        )
    registry = config.registry_file
    if registry is None:
        registry = out_dir / "registry.pub"
        retry(lambda _m: None, "registry", client.download_registry, fed.id, registry)
    reg = load_registry(registry)
    if reg.fingerprint != fed.key_fingerprint:
        raise KeyMaterialError(
            f"{registry} (fingerprint {reg.fingerprint[:16]}…) is not federation "
            f"{fed.name!r}'s registry ({fed.key_fingerprint[:16]}…)"
        )
    if reg.group_mask and config.group_mask_file is None:
        raise KeyMaterialError(
            "this consortium uses the group mask: pass --group-mask-key with the "
            "consortium's group-mask.key (secret, hospitals only)"
        )
    ident = load_identity(config.key_file)
    state = config.state_file or out_dir / f"secagg-state-hospital-{ident.hospital_id}"
    return open_hospital(
        identity=config.key_file,
        registry=registry,
        params=params,
        group_mask=config.group_mask_file if reg.group_mask else None,
        state_file=state,
    )


def _enrol(
    client: PortalClient, fed: FederationPublic, config: ParticipationConfig, say: EventHook
) -> int:
    assert config.key_file is not None and fed.key_fingerprint is not None
    ident = load_identity(config.key_file)
    me = retry(say, "account", client.me)
    signature = sign_enrolment(
        ident.signing_key,
        registry_fingerprint=fed.key_fingerprint,
        federation_id=fed.id,
        account_id=me.id,
        hospital_id=ident.hospital_id,
    )
    retry(
        say,
        "enrol",
        client.secagg_enrol,
        fed.id,
        hospital_id=ident.hospital_id,
        signature=signature,
    )
    return ident.hospital_id


def _apply(
    held: _Held,
    hospital: SecAggHospital,
    aggregate: bytes,
    *,
    number: int,
    protocol_round: int | None,
) -> tuple[_Held, float, bool]:
    """Unmask round ``number``'s aggregate and add its mean delta to the held model."""
    if protocol_round is None or protocol_round <= held.protocol_round:
        raise ProtocolError(
            f"round {number}'s aggregate is for protocol round {protocol_round}, not after "
            f"the last one this hospital applied ({held.protocol_round}): refusing it"
        )
    t0 = time.perf_counter()
    result = hospital.unprotect_missed(aggregate, expected_round=protocol_round)
    seconds = time.perf_counter() - t0
    if result.mean.shape != held.vector.shape:
        raise ProtocolError(
            f"round {number}'s aggregate has {result.mean.size} values, the model "
            f"{held.vector.size}"
        )
    survivors = wire.unpack(aggregate).header.get("survivors", [])
    mine = hospital.hospital_id in survivors
    return _Held(held.vector + result.mean, number, protocol_round), seconds, mine


def _starting_model(
    client: PortalClient,
    fed: FederationPublic,
    site: LocalSite,
    hospital: SecAggHospital,
    start: int,
    out_dir: Path,
    say: EventHook,
) -> _Held:
    """The global model round ``start`` trains from: initial plus every earlier mean delta."""
    path = out_dir / "initial.pt"
    retry(say, "download", client.download_initial_model, fed.id, path)
    held = _Held(state_vector(path, site))
    for r in range(1, start):
        state = retry(say, "round", client.round, fed.id, r)
        agg_path = out_dir / f"round-{r}" / "aggregate.fcry"
        retry(say, "download", client.download_aggregate, fed.id, r, agg_path)
        held, _, _ = _apply(
            held, hospital, agg_path.read_bytes(), number=r, protocol_round=state.protocol_round
        )
    if start > 1:
        say(f"joined at round {start}: applied the aggregates of rounds 1 to {start - 1}")
    else:
        say(f"round 1: loaded the initial model ({site.layout.size} values)")
    return held


def _answer(
    hospital: SecAggHospital,
    site: LocalSite,
    held: _Held,
    rs: _RoundState,
    stage: str,
    request: bytes,
    rdir: Path,
    say: EventHook,
) -> bytes:
    """This hospital's reply to one stage (trains once per round, at ``masked_input``)."""
    if stage == "masked_input" and rs.delta is None:
        weights, tr = site.train_round(held.vector, server_round=rs.number)
        site.save(rdir / "local.pt")
        rs.delta = weights - held.vector
        rs.train_loss = float(tr["train-loss"])
        say(
            f"round {rs.number}: trained on {site.num_train} examples (loss "
            f"{rs.train_loss:.4f}, {tr['train-seconds']:.1f} s)"
        )
    t0 = time.perf_counter()
    if stage == "advertise":
        reply = hospital.stage_advertise(request)
    elif stage == "share":
        reply = hospital.stage_share(request)
    elif stage == "masked_input":
        assert rs.delta is not None
        reply = hospital.stage_masked_input(request, update=rs.delta, num_examples=site.num_train)
    elif stage == "consistency":
        reply = hospital.stage_consistency(request)
    elif stage == "unmask":
        reply = hospital.stage_unmask(request)
    else:
        raise ProtocolError(f"the portal asks for an unknown secagg stage {stage!r}")
    rs.protect_s += time.perf_counter() - t0
    return reply


def _note(rs: _RoundState, say: EventHook, line: str) -> None:
    if line != rs.said:
        rs.said = line
        say(line)


def _step(
    client: PortalClient,
    fed: FederationPublic,
    hospital: SecAggHospital,
    site: LocalSite,
    held: _Held,
    rs: _RoundState,
    turn: SecAggTurn,
    rdir: Path,
    say: EventHook,
) -> bool:
    """Act on one turn; return whether there was something to do (no need to wait)."""
    r = rs.number
    if turn.action == "join":
        try:
            retry(say, "join", client.secagg_join, fed.id, r)
            _note(rs, say, f"round {r}: joined; waiting for the session to start")
        except PortalClientError as exc:
            if exc.status_code != 409:
                raise
            _note(rs, say, f"round {r}: {exc}")
            return False
        return True
    if turn.action != "answer" or turn.stage is None or turn.attempt is None:
        return False
    stage, attempt = turn.stage, turn.attempt
    if stage != "advertise" and attempt not in rs.sessions:
        _note(
            rs,
            say,
            f"round {r}: this process holds no keys of session {attempt} (it restarted "
            "mid-round): following from the round's aggregate",
        )
        return False
    cached = rs.sent.get((attempt, stage))
    if cached is not None and cached[0] == turn.request_sha256:
        reply = cached[1]  # the portal lost the earlier reply (e.g. it restarted): send again
    else:
        got_stage, request = retry(say, "request", client.secagg_request, fed.id, r)
        if got_stage != stage:
            return True  # the stage moved on meanwhile
        rs.down += len(request)
        reply = _answer(hospital, site, held, rs, stage, request, rdir, say)
        rs.sent[(attempt, stage)] = (turn.request_sha256 or "", reply)
        if stage == "advertise":
            rs.sessions.add(attempt)
    try:
        retry(say, "reply", client.secagg_reply, fed.id, r, reply)
    except PortalClientError as exc:
        if exc.status_code != 409:
            raise
        _note(rs, say, f"round {r}: {exc}")
        return False
    rs.up += len(reply)
    _note(rs, say, f"round {r}: answered {stage} ({len(reply):,} bytes)")
    return True


def _one_round(
    client: PortalClient,
    fed: FederationPublic,
    hospital: SecAggHospital,
    site: LocalSite,
    held: _Held,
    *,
    number: int,
    config: ParticipationConfig,
    out_dir: Path,
    say: EventHook,
) -> tuple[_Held, RoundOutcome]:
    r = number
    t_round = time.perf_counter()
    rdir = out_dir / f"round-{r}"
    rdir.mkdir(parents=True, exist_ok=True)
    rs = _RoundState(number=r)
    deadline = time.monotonic() + config.timeout_s
    while True:
        turn = retry(say, "status", client.secagg_turn, fed.id, r)
        if turn.action == "aggregated":
            break
        if turn.action == "closed":
            raise PortalClientError(f"round {r} was cancelled by the admin")
        if turn.action == "enrol":
            raise PortalClientError(f"this account is not enrolled in {fed.name!r}")
        if turn.action == "follow":
            _note(rs, say, f"round {r}: {turn.detail}")
        if _step(client, fed, hospital, site, held, rs, turn, rdir, say):
            continue
        if time.monotonic() >= deadline:
            raise PortalClientError(
                f"round {r} was not aggregated within {config.timeout_s:g} s ({turn.detail})"
            )
        t0 = time.perf_counter()
        time.sleep(config.poll_s)
        rs.wait_s += time.perf_counter() - t0
    state = retry(say, "round", client.round, fed.id, r)
    agg_path = rdir / "aggregate.fcry"
    retry(say, "download", client.download_aggregate, fed.id, r, agg_path)
    aggregate = agg_path.read_bytes()
    rs.down += len(aggregate)
    held, decrypt_s, mine = _apply(
        held, hospital, aggregate, number=r, protocol_round=state.protocol_round
    )
    hospital.forget_round()
    ev = evaluate_global(site, held.vector, split=config.eval_split, path=rdir / "global.pt")
    retry(
        say,
        "report",
        client.report_metrics,
        fed.id,
        r,
        loss=ev.loss,
        accuracy=ev.accuracy,
        auc=ev.auc,
        num_examples=ev.examples,
    )
    outcome = RoundOutcome(
        round=r,
        num_examples=site.num_train,
        train_loss=rs.train_loss,
        upload_bytes=rs.up,
        protect_seconds=rs.protect_s,
        wait_seconds=rs.wait_s,
        decrypt_seconds=decrypt_s,
        loss=ev.loss,
        accuracy=ev.accuracy,
        auc=ev.auc,
        eval_examples=ev.examples,
        local_model=str(rdir / "local.pt") if rs.delta is not None else "",
        global_model=str(rdir / "global.pt"),
        download_bytes=rs.down,
        round_seconds=time.perf_counter() - t_round,
        contributed=mine,
        protocol_round=state.protocol_round,
    )
    say(
        f"round {r}: aggregate of {state.num_updates} hospitals unmasked"
        f"{'' if mine else ' (without this hospital)'} in {decrypt_s:.2f} s; {ev.split} "
        f"loss {ev.loss:.4f}, accuracy {ev.accuracy:.4f}, AUC "
        f"{'-' if ev.auc is None else f'{ev.auc:.4f}'}; {rs.up:,} bytes up, {rs.down:,} down, "
        f"{outcome.round_seconds:.1f} s; reported"
    )
    return held, outcome


def participate_secagg(
    client: PortalClient,
    fed: FederationPublic,
    *,
    config: ParticipationConfig,
    rounds: int,
    out_dir: Path,
    say: EventHook,
) -> list[RoundOutcome]:
    """Take part in ``rounds`` rounds of a secagg federation, from its current round.

    See the module docstring for one round. Writes ``round-<r>/local.pt`` (this
    hospital's weights), ``round-<r>/global.pt`` (the global model), the aggregates and
    ``participation.json`` to ``out_dir``.

    Raises
    ------
    fedcrypt.exceptions.FedcryptError
        For a refused request, key files that do not fit the federation, a protocol
        check that fails at this hospital (e.g. :class:`~fedcrypt.protection.secagg.
        ConsistencyError`: the server showed hospitals different survivor sets; the
        hospital stops rather than reveal shares), or data problems.
    """
    check_not_cancelled(fed)
    if fed.status == "draft":
        raise PortalClientError(f"federation {fed.name!r} has not started (no initial model yet)")
    if fed.status == "finished":
        raise PortalClientError(f"federation {fed.name!r} has finished all {fed.num_rounds} rounds")
    out_dir.mkdir(parents=True, exist_ok=True)
    hospital = open_secagg_hospital(client, fed, config, out_dir)
    hid = _enrol(client, fed, config, say)
    say(f"enrolled in {fed.name!r} as hospital {hid} of the registry {fed.key_fingerprint}")
    site = make_site(fed, config, protection=None)
    existing = retry(say, "rounds", client.rounds, fed.id)
    start = existing[-1].number if existing else 1
    held = _starting_model(client, fed, site, hospital, start, out_dir, say)
    outcomes: list[RoundOutcome] = []
    for r in range(start, min(start + rounds, fed.num_rounds + 1)):
        held, outcome = _one_round(
            client,
            fed,
            hospital,
            site,
            held,
            number=r,
            config=config,
            out_dir=out_dir,
            say=say,
        )
        outcomes.append(outcome)
        write_record(out_dir, fed, outcomes)
    return outcomes
