"""The hospital side of ``secagg`` on Flower: one named ClientApp handler per protocol stage.

Message types (``<category>.<action>``, routed by Flower's ``ClientApp``):

* ``query.fedcrypt_hello`` → this hospital's id, model size and initial-weights digest
  (as for every mode, :func:`fedcrypt.federation.client.hello`);
* ``train.secagg_advertise``, ``train.secagg_share``, ``train.secagg_consistency``,
  ``train.secagg_unmask`` → one protocol stage each
  (:class:`~fedcrypt.protection.secagg.SecAggHospital`);
* ``train.secagg_masked_input`` → train locally from the global model it holds (round 1:
  the initial model it built; a hospital that missed aggregates gets them in the message,
  as a catch-up) and send the masked *delta* (local − global) weighted by the example
  count;
* ``evaluate`` → remove the group mask from the aggregate, add the mean delta to the
  global model this hospital holds, evaluate (as every other protection mode).

A ``ClientApp`` is stateless between messages (in simulation a node's messages may run
in different worker processes), so the round state (:meth:`SecAggHospital.export_state`,
SECRET) and the global model the hospital holds live in the node-local
``context.state`` (:mod:`fedcrypt.federation.held`); they are never sent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError, ProtocolError
from fedcrypt.federation.client import HELLO, SiteSetup, catch_up_payload, hello
from fedcrypt.federation.drops import Drop
from fedcrypt.federation.held import Held, held, hold
from fedcrypt.federation.records import blob_from, blob_record
from fedcrypt.protection.secagg import SecAggHospital, SecAggParams
from fedcrypt.site import LocalSite
from fedcrypt.task import Task

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
    config : RunConfig, optional
        The run (a staged protection mode); None reads Flower's run config (deployment).
    params : SecAggParams, optional
        The consortium's secagg parameters (identical at the server); None derives the
        defaults from the run and the registry (deployment).
    keys : SecAggKeys, optional
        Key material in memory (simulation); a hospital uses only its own signing key.
        None reads this SuperNode's key files from its ``--node-config``
        (``secagg-identity``, ``secagg-registry``, ``secagg-group-mask``, optionally
        ``secagg-state``; see ``deploy/README.md``).
    output_dir : Path, optional
        Where hospital 0 writes the final ``model.pt``.
    torch_threads : int, optional
        Torch threads per hospital process.
    drops : sequence of Drop
        Simulated dropouts (``--drop``).
    task : Task, optional
        A task object (see :class:`~fedcrypt.federation.client.SiteSetup`).
    """

    config: RunConfig | None = None
    params: SecAggParams | None = None
    keys: SecAggKeys | None = None
    output_dir: Path | None = None
    torch_threads: int | None = None
    drops: Sequence[Drop] = field(default_factory=tuple)
    task: Task | None = None
    sites: SiteSetup = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "sites",
            SiteSetup(
                config=self.config,
                output_dir=self.output_dir,
                torch_threads=self.torch_threads,
                drops=tuple(self.drops),
                task=self.task,
            ),
        )

    def site(self, context: Context) -> LocalSite:
        """This node's :class:`~fedcrypt.site.LocalSite` (cached per process and node)."""
        return self.sites.site(context)

    def hospital_id(self, context: Context) -> int:
        """This node's hospital id: its ``partition-id``."""
        return self.sites.node(context)[0]

    def secagg(self, context: Context) -> SecAggHospital:
        """This node's :class:`SecAggHospital`, continuing the state kept in ``context``.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If this node has no key material in the setup.
        """
        hid = self.hospital_id(context)
        if self.keys is None:
            hospital = self._from_files(context, hid)
        else:
            raw = self.keys.signing.get(hid)
            if raw is None:
                raise ProtocolError(f"hospital {hid} has no secagg signing key")
            assert self.params is not None
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

    def _from_files(self, context: Context, hid: int) -> SecAggHospital:
        """A SuperNode's SecAggHospital from its key files (deployment)."""
        from fedcrypt.federation.secagg_flow import deployment_params
        from fedcrypt.protection.secagg.keys import load_registry, open_hospital

        node = context.node_config
        missing = [k for k in ("secagg-identity", "secagg-registry") if not node.get(k)]
        if missing:
            raise ConfigError(
                f"this SuperNode needs --node-config {' '.join(f'{k}=<path>' for k in missing)} "
                "for protection secagg (see deploy/README.md)"
            )
        registry = Path(str(node["secagg-registry"]))
        params = self.params or deployment_params(
            self.sites.run_config(context), load_registry(registry)
        )
        hospital = open_hospital(
            identity=Path(str(node["secagg-identity"])),
            registry=registry,
            params=params,
            group_mask=Path(str(node["secagg-group-mask"]))
            if node.get("secagg-group-mask")
            else None,
            state_file=Path(str(node["secagg-state"])) if node.get("secagg-state") else None,
        )
        if hospital.hospital_id != hid:
            raise ConfigError(
                f"{node['secagg-identity']} is hospital {hospital.hospital_id}'s identity, "
                f"this SuperNode is partition {hid}"
            )
        return hospital


def _record(context: Context) -> ConfigRecord:
    rec = context.state.get(STATE_KEY)
    if rec is None:
        rec = ConfigRecord()
        context.state[STATE_KEY] = rec
    return rec  # type: ignore[return-value]


def _save(context: Context, hospital: SecAggHospital) -> None:
    _record(context)["state"] = hospital.export_state()


def _reply(msg: Message, blob: bytes, metrics: Mapping[str, float]) -> Message:
    content = RecordDict({"arrays": blob_record(blob), "metrics": MetricRecord(dict(metrics))})
    return Message(content=content, reply_to=msg)


def _server_round(msg: Message) -> int:
    return int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]


def _base(setup: SecAggClientSetup, msg: Message, context: Context, *, server_round: int) -> Held:
    """The global model round ``server_round`` trains from: initial, held, or caught up.

    Secagg aggregates are mean *deltas*: a hospital that missed rounds gets every missed
    aggregate (a catch-up) and applies them in order to the model it holds.

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the hospital cannot rebuild round ``server_round - 1``'s global model.
    """
    site = setup.site(context)
    have = held(context) or Held(weights=site.initial, round=0)
    caught = catch_up_payload(msg)
    if caught:
        sec = setup.secagg(context)
        weights = have.weights
        for rnd in sorted(r for r in caught if r > have.round):
            if rnd != have.round + 1:
                raise ProtocolError(
                    f"catch-up skips from round {have.round} to {rnd}: an aggregate is missing"
                )
            weights = weights + sec.unprotect_missed(caught[rnd], expected_round=rnd).mean
            have = Held(weights=weights, round=rnd)
        _save(context, sec)
        hold(context, have)
    if have.round != server_round - 1:
        raise ProtocolError(
            f"hospital {site.hospital} holds the global model of round {have.round}; "
            f"round {server_round} needs round {server_round - 1}'s and the server sent none"
        )
    return have


def masked_input(setup: SecAggClientSetup, msg: Message, context: Context) -> Message:
    """Train from the held global model and answer the masked-input stage with the delta."""
    rnd = _server_round(msg)
    setup.sites.check_online(context, server_round=rnd, stage="masked_input")
    request = blob_from(msg.content.array_records.get("arrays"))
    site = setup.site(context)
    base = _base(setup, msg, context, server_round=rnd)
    # train exactly as the plain/he path does (same seeds), from the held weights
    weights, train_metrics = site.train_round(base.weights, server_round=rnd)
    delta = weights - base.weights
    sec = setup.secagg(context)
    t0 = time.perf_counter()
    reply = sec.stage_masked_input(request, update=delta, num_examples=site.num_train)
    seconds = time.perf_counter() - t0
    _save(context, sec)
    # num-examples stays secret (it is masked with the update): no example count here
    return _reply(
        msg,
        reply,
        {
            "stage-seconds": seconds,
            **{k: v for k, v in train_metrics.items() if k != "num-examples"},
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
    setup.sites.check_online(context, server_round=rnd, stage="evaluate")
    aggregate = blob_from(msg.content.array_records.get("arrays"))
    site = setup.site(context)
    base = held(context) or Held(weights=site.initial, round=0)
    if base.round != rnd - 1:
        raise ProtocolError(
            f"hospital holds the global model of round {base.round}; the round-{rnd} "
            f"aggregate applies to round {rnd - 1}'s"
        )
    sec = setup.secagg(context)
    t0 = time.perf_counter()
    result = sec.unprotect(aggregate)
    new_global = base.weights + result.mean
    unprotect_s = time.perf_counter() - t0
    _save(context, sec)
    hold(context, Held(weights=new_global, round=rnd))
    metrics, curves = site.evaluate(new_global, final=bool(cfg.get("final", False)))
    metrics["unprotect-seconds"] = unprotect_s
    metrics["hospital-id"] = float(site.hospital)
    return Message(
        content=RecordDict({"metrics": MetricRecord({**metrics, **curves})}),
        reply_to=msg,
    )


def register_stage_handlers(app: ClientApp, setup: SecAggClientSetup) -> None:
    """Register the secagg stage handlers (``train.secagg_*``) on ``app``."""

    def _stage(stage: str):  # type: ignore[no-untyped-def]
        def handler(msg: Message, context: Context) -> Message:
            setup.sites.check_online(context, server_round=_server_round(msg), stage=stage)
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


def build_secagg_client_app(setup: SecAggClientSetup) -> ClientApp:
    """A ClientApp answering the hello, the secagg stages and ``evaluate``, for ``setup``."""
    app = ClientApp()

    @app.query(HELLO.split(".", 1)[1])
    def _hello(msg: Message, context: Context) -> Message:
        return hello(setup.sites, msg, context)

    register_stage_handlers(app, setup)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(setup, msg, context)

    return app
