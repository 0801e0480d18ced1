"""The hospital side of ``secagg`` on Flower: one named ClientApp handler per protocol stage.

Message types (``<category>.<action>``, routed by Flower's ``ClientApp``):

* ``query.secagg_identify`` → this node's hospital id (its ``partition-id``);
* ``train.secagg_advertise``, ``train.secagg_share``, ``train.secagg_consistency``,
  ``train.secagg_unmask`` → one protocol stage each
  (:class:`~fedcrypt.protection.secagg.SecAggHospital`);
* ``train.secagg_masked_input`` → load the global model, train locally, send the masked
  *delta* (local − global) weighted by the example count;
* ``evaluate`` → remove the group mask from the aggregate, add the mean delta to the
  global model this hospital holds, evaluate (as every other protection mode).

A ``ClientApp`` is stateless between messages (in simulation a node's messages may run
in different worker processes), so the round state (:meth:`SecAggHospital.export_state`,
SECRET) and the global model the hospital holds live in the node-local
``context.state``; they are never sent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from numpy.typing import NDArray

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ProtocolError
from fedcrypt.federation.app import HospitalSetup
from fedcrypt.federation.hospital import Hospital
from fedcrypt.federation.records import blob_from, blob_record
from fedcrypt.protection.flatten import flatten
from fedcrypt.protection.plain import PlainHospital
from fedcrypt.protection.secagg import SecAggHospital, SecAggParams

#: ``context.state`` key of this hospital's secagg record (round state, held global).
STATE_KEY = "fedcrypt-secagg"
#: Action names of the stage handlers (message type ``train.<action>``).
ACTIONS = {
    "advertise": "secagg_advertise",
    "share": "secagg_share",
    "masked_input": "secagg_masked_input",
    "consistency": "secagg_consistency",
    "unmask": "secagg_unmask",
}
IDENTIFY = "query.secagg_identify"


@dataclass(frozen=True)
class SecAggKeys:
    """Long-term key material of a consortium, as raw bytes (picklable).

    Attributes
    ----------
    signing : dict of int to bytes
        ``hospital id -> raw Ed25519 private key`` (SECRET; each hospital needs its own).
    registry : dict of int to bytes
        ``hospital id -> raw Ed25519 public key`` (public; the server gets only this).
    consortium_key : bytes or None
        The group-mask key shared by the hospitals only (SECRET).
    """

    signing: dict[int, bytes]
    registry: dict[int, bytes]
    consortium_key: bytes | None

    @classmethod
    def generate(cls, hospital_ids: range | list[int], *, group_mask: bool = True) -> SecAggKeys:
        """Fresh Ed25519 keys and consortium key (a simulation makes new ones per run)."""
        import secrets

        signing = {int(i): secrets.token_bytes(32) for i in hospital_ids}
        registry = {
            i: Ed25519PrivateKey.from_private_bytes(k).public_key().public_bytes_raw()
            for i, k in signing.items()
        }
        return cls(
            signing=signing,
            registry=registry,
            consortium_key=secrets.token_bytes(32) if group_mask else None,
        )

    def public_registry(self) -> dict[int, Ed25519PublicKey]:
        """The registry as key objects (what :class:`SecAggServer` takes)."""
        return {i: Ed25519PublicKey.from_public_bytes(k) for i, k in self.registry.items()}


@dataclass(frozen=True)
class SecAggClientSetup:
    """How the secagg ClientApp finds its configuration, keys and output folder.

    Parameters
    ----------
    config : RunConfig
        The run (``protection == "secagg"``).
    params : SecAggParams
        The consortium's secagg parameters (identical at the server).
    keys : SecAggKeys
        Key material; a hospital uses only its own signing key.
    output_dir : Path, optional
        Where hospital 0 writes the final ``model.pt``.
    torch_threads : int, optional
        Torch threads per hospital process.
    """

    config: RunConfig
    params: SecAggParams
    keys: SecAggKeys
    output_dir: Path | None = None
    torch_threads: int | None = None
    _plain: HospitalSetup = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The training side is a plain Hospital (data, model, train/assess); the secagg
        # protection wraps it here.
        plain = self.config.model_copy(update={"protection": "plain"})
        object.__setattr__(
            self,
            "_plain",
            HospitalSetup(
                config=plain,
                output_dir=self.output_dir,
                torch_threads=self.torch_threads,
            ),
        )

    def hospital(self, context: Context) -> Hospital:
        """This node's training :class:`Hospital` (cached per process and partition)."""
        return self._plain.hospital(context)

    def hospital_id(self, context: Context) -> int:
        """This node's hospital id: its ``partition-id``."""
        return int(context.node_config["partition-id"])

    def secagg(self, context: Context) -> SecAggHospital:
        """This node's :class:`SecAggHospital`, continuing the state kept in ``context``.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If this node has no key material in the setup.
        """
        hid = self.hospital_id(context)
        raw = self.keys.signing.get(hid)
        if raw is None:
            raise ProtocolError(f"hospital {hid} has no secagg signing key")
        hospital = SecAggHospital(
            hid,
            signing_key=Ed25519PrivateKey.from_private_bytes(raw),
            registry=self.keys.public_registry(),
            params=self.params,
            consortium_key=self.keys.consortium_key,
        )
        state = _record(context).get("state")
        if isinstance(state, bytes) and state:
            hospital.import_state(state)
        return hospital


def _record(context: Context) -> ConfigRecord:
    rec = context.state.get(STATE_KEY)
    if rec is None:
        rec = ConfigRecord()
        context.state[STATE_KEY] = rec
    return rec  # type: ignore[return-value]


def _save(context: Context, hospital: SecAggHospital) -> None:
    _record(context)["state"] = hospital.export_state()


def held_global(context: Context) -> tuple[NDArray[np.float64] | None, int]:
    """The global model this hospital holds (float64, shape ``(P,)``) and its round."""
    rec = _record(context)
    data = rec.get("global")
    if not isinstance(data, bytes):
        return None, -1
    return np.frombuffer(data, dtype="<f8").copy(), int(rec.get("global-round", -1))  # type: ignore[arg-type]


def _hold(context: Context, vector: NDArray[np.float64], round_: int) -> None:
    rec = _record(context)
    rec["global"] = np.ascontiguousarray(vector, dtype="<f8").tobytes()
    rec["global-round"] = round_


def _reply(msg: Message, blob: bytes, metrics: Mapping[str, float]) -> Message:
    content = RecordDict({"arrays": blob_record(blob), "metrics": MetricRecord(dict(metrics))})
    return Message(content=content, reply_to=msg)


def _server_round(msg: Message) -> int:
    return int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]


def masked_input(setup: SecAggClientSetup, msg: Message, context: Context) -> Message:
    """Train from the held global model and answer the masked-input stage with the delta.

    Round 1 carries the initial (public) weights in ``global``; later rounds use the
    global model this hospital rebuilt when it evaluated the previous aggregate.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the hospital does not hold the previous round's global model.
    """
    rnd = _server_round(msg)
    request = blob_from(msg.content.array_records.get("arrays"))
    hospital = setup.hospital(context)
    if "global" in msg.content.array_records:
        base = PlainHospital().unprotect(blob_from(msg.content.array_records["global"])).mean
    else:
        held_base, held = held_global(context)
        if held_base is None or held != rnd - 1:
            raise ProtocolError(
                f"hospital holds the global model of round {held}, round {rnd} needs "
                f"round {rnd - 1}'s: it missed an aggregate"
            )
        base = held_base
    # train exactly as the plain/ckks path does (same seeds), from the held weights
    train_metrics = hospital.train_from(base, server_round=rnd)
    delta = flatten(hospital.model.state_dict()) - base
    sec = setup.secagg(context)
    t0 = time.perf_counter()
    reply = sec.stage_masked_input(request, update=delta, num_examples=hospital.data.num_train)
    seconds = time.perf_counter() - t0
    _save(context, sec)
    _hold(context, base, rnd - 1)
    # num-examples stays secret (it is masked with the update): no example count here
    return _reply(
        msg,
        reply,
        {
            "stage-seconds": seconds,
            "train-loss": train_metrics["train-loss"],
            "train-seconds": train_metrics["train-seconds"],
        },
    )


def evaluate(setup: SecAggClientSetup, msg: Message, context: Context) -> Message:
    """Unprotect the aggregate, update the held global model, evaluate it.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the hospital does not hold the global model the aggregate's delta applies to.
    fedcrypt.exceptions.DecryptionError
        If the aggregate does not unmask with the consortium key.
    """
    cfg = msg.content.config_records["config"]
    rnd = int(cfg["server-round"])  # type: ignore[arg-type]
    aggregate = blob_from(msg.content.array_records.get("arrays"))
    hospital = setup.hospital(context)
    base, held = held_global(context)
    if base is None or held != rnd - 1:
        raise ProtocolError(
            f"hospital holds the global model of round {held}; the round-{rnd} aggregate "
            f"applies to round {rnd - 1}'s"
        )
    sec = setup.secagg(context)
    t0 = time.perf_counter()
    result = sec.unprotect(aggregate)
    new_global = base + result.mean
    unprotect_s = time.perf_counter() - t0
    _save(context, sec)
    _hold(context, new_global, rnd)
    metrics, curves = hospital.evaluate_weights(new_global, final=bool(cfg.get("final", False)))
    metrics["unprotect-seconds"] = unprotect_s
    return Message(
        content=RecordDict({"metrics": MetricRecord({**metrics, **curves})}),
        reply_to=msg,
    )


def build_secagg_client_app(setup: SecAggClientSetup) -> ClientApp:
    """A ClientApp answering the five secagg stages, and ``evaluate``, for ``setup``."""
    app = ClientApp()

    @app.query(IDENTIFY.split(".", 1)[1])
    def _identify(msg: Message, context: Context) -> Message:
        hid = setup.hospital_id(context)
        return Message(
            content=RecordDict({"config": ConfigRecord({"hospital-id": hid})}), reply_to=msg
        )

    def _stage(stage: str):  # type: ignore[no-untyped-def]
        def handler(msg: Message, context: Context) -> Message:
            request = blob_from(msg.content.array_records.get("arrays"))
            sec = setup.secagg(context)
            t0 = time.perf_counter()
            if stage == "advertise":
                reply = sec.stage_advertise(request)
            elif stage == "share":
                reply = sec.stage_share(request)
            elif stage == "consistency":
                reply = sec.stage_consistency(request)
            else:
                reply = sec.stage_unmask(request)
            seconds = time.perf_counter() - t0
            _save(context, sec)
            return _reply(msg, reply, {"stage-seconds": seconds})

        return handler

    for stage in ("advertise", "share", "consistency", "unmask"):
        app.train(ACTIONS[stage])(_stage(stage))

    @app.train(ACTIONS["masked_input"])
    def _masked_input(msg: Message, context: Context) -> Message:
        return masked_input(setup, msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(setup, msg, context)

    return app
