"""The hospital side on Flower for single-message schemes (``plain``, ``he``).

Message types (routed by Flower's ``ClientApp``):

* ``query.fedcrypt_hello`` -> this hospital's id, its model size ``P`` and the digest of
  the initial weights it built from the task's seeded model factory (the server checks
  that every hospital starts from the same model: it never builds one itself);
* ``train`` -> train from the global model this hospital holds (round 1: the initial
  model; a hospital that missed an aggregate receives it in the message, as a catch-up)
  and answer with the protected, example-weighted update;
* ``evaluate`` -> unprotect the round's aggregate (the only time it crosses the network),
  hold it as the new global model, and evaluate it on local validation and test data.

The hospital's :class:`~fedcrypt.site.LocalSite` is built once per process and node (HE
contexts and keys are loaded once, not per message).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError, ProtocolError
from fedcrypt.federation.drops import Drop, HospitalOffline, is_offline, parse_drop
from fedcrypt.federation.held import Held, held, hold
from fedcrypt.federation.records import blob_from, blob_record
from fedcrypt.protection.registry import get_scheme
from fedcrypt.site import LocalSite, task_for, weights_digest
from fedcrypt.task import Task

log = logging.getLogger(__name__)

HELLO = "query.fedcrypt_hello"
#: Array-record key of a catch-up global payload in a train message.
GLOBAL_KEY = "global"

_SITES: dict[tuple[str, int, int, str], LocalSite] = {}


@dataclass(frozen=True)
class SiteSetup:
    """How a ClientApp finds its configuration, key and output folder.

    In simulation everything is baked in; on the deployment engine the run config comes
    from Flower and each SuperNode's ``--node-config`` gives ``partition-id``,
    ``num-partitions``, ``hospital-key`` (path, secret), optionally ``data-dir`` and
    ``output-dir``.

    Parameters
    ----------
    config : RunConfig, optional
        The run (simulation); None reads Flower's run config (deployment).
    hospital_key : Path, optional
        The hospital key file (``he``; simulation).
    output_dir : Path, optional
        Where hospital 0 saves the final model (simulation).
    torch_threads : int, optional
        Torch threads per hospital process.
    drops : sequence of Drop
        Simulated dropouts (``--drop``).
    task : Task, optional
        A task object (simulation of a task not reachable by reference); None loads
        ``config.task`` or the built-in task.
    """

    config: RunConfig | None = None
    hospital_key: Path | None = None
    output_dir: Path | None = None
    torch_threads: int | None = None
    drops: Sequence[Drop] = field(default_factory=tuple)
    task: Task | None = None

    def node(self, context: Context) -> tuple[int, int]:
        """``(hospital id, number of hospitals)`` from the node config.

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            If the SuperNode was started without them.
        """
        node = context.node_config
        try:
            return int(node["partition-id"]), int(node["num-partitions"])
        except (KeyError, ValueError) as exc:
            raise ConfigError(
                "the SuperNode needs --node-config 'partition-id=<i> num-partitions=<n>'"
            ) from exc

    def run_config(self, context: Context) -> RunConfig:
        """The run's configuration (baked in, or Flower's run config + node overrides)."""
        if self.config is not None:
            return self.config
        values = dict(context.run_config)
        node = context.node_config
        for key in ("data-dir", "task"):
            if node.get(key):
                values[key] = node[key]
        if not values.get("run-id"):
            values["run-id"] = f"flwr-{context.run_id}"
        return RunConfig.from_flower(values)

    def drops_for(self, config: RunConfig) -> Sequence[Drop]:
        """Simulated dropouts: the setup's, else the run config's ``drop``."""
        return self.drops or tuple(parse_drop(d) for d in config.drop)

    def site(self, context: Context) -> LocalSite:
        """This node's :class:`LocalSite`, created once per process and node."""
        hid, num = self.node(context)
        cfg = self.run_config(context)
        node = context.node_config
        key = self.hospital_key or (
            Path(str(node["hospital-key"])) if node.get("hospital-key") else None
        )
        out = self.output_dir
        if out is None and node.get("output-dir"):
            out = Path(str(node["output-dir"]))
        cache_key = (cfg.model_dump_json(), hid, num, str(key))
        site = _SITES.get(cache_key)
        if site is None:
            if self.torch_threads:
                import torch

                torch.set_num_threads(self.torch_threads)
            scheme = get_scheme(cfg.protection)
            site = LocalSite(
                self.task or task_for(cfg),
                config=cfg,
                hospital=hid,
                num_hospitals=num,
                output_dir=out if hid == 0 or self.config is None else None,
            )
            if not scheme.staged:
                site.protection = scheme.hospital_protection(
                    key_file=key, encrypt_layers=cfg.encrypt_layers, layout=site.layout
                )
            _SITES.clear()  # one site per process at a time keeps memory flat
            _SITES[cache_key] = site
        return site

    def check_online(self, context: Context, *, server_round: int, stage: str) -> None:
        """Raise :class:`HospitalOffline` if ``--drop`` takes this hospital offline here."""
        cfg = self.run_config(context)
        drops = self.drops_for(cfg)
        if not drops:
            return
        hid, _ = self.node(context)
        stages = get_scheme(cfg.protection).stages
        if is_offline(drops, hospital=hid, server_round=server_round, stage=stage, stages=stages):
            raise HospitalOffline(
                f"hospital {hid} is offline (--drop) in round {server_round} {stage}"
            )


def catch_up_payload(msg: Message) -> dict[int, bytes]:
    """The aggregates a train message brings to a hospital that is behind (``round -> bytes``).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If an entry is malformed.
    """
    out: dict[int, bytes] = {}
    prefix = f"{GLOBAL_KEY}-"
    for key, record in msg.content.array_records.items():
        if key.startswith(prefix):
            try:
                rnd = int(key.removeprefix(prefix))
            except ValueError:
                raise ProtocolError(f"malformed catch-up entry {key!r}") from None
            out[rnd] = blob_from(record)
    return out


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get("config") or ConfigRecord()


def _round(msg: Message) -> int:
    return int(_config(msg)["server-round"])  # type: ignore[arg-type]


def hello(setup: SiteSetup, msg: Message, context: Context) -> Message:
    """Answer the server's hello: hospital id, model size, initial-weights digest."""
    site = setup.site(context)
    record = ConfigRecord(
        {
            "hospital-id": site.hospital,
            "parameters": site.layout.size,
            "initial-digest": weights_digest(site.initial),
            "model": site.info.model_name,
            "lr": site.lr,
            "task": site.task.name,
            "label-kind": site.info.label_kind,
        }
    )
    return Message(content=RecordDict({"config": record}), reply_to=msg)


def global_for(site: LocalSite, msg: Message, context: Context, *, server_round: int) -> Held:
    """The global model round ``server_round`` trains from (held, caught up, or initial).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If the hospital does not hold the previous round's global model and the message
        brings none.
    """
    caught = catch_up_payload(msg)
    if caught:  # a catch-up: this hospital missed an aggregate (whole models: the latest)
        rnd = max(caught)
        blob = caught[rnd]
        result, _ = site.unprotect(blob)
        value = Held(
            weights=result.mean,
            round=rnd,
            digest=hashlib.sha256(blob).hexdigest(),
            total_examples=site.reference_examples(result),
        )
        hold(context, value)
        if rnd != server_round - 1:
            raise ProtocolError(
                f"catch-up brought round {rnd}'s aggregate, round {server_round} needs "
                f"round {server_round - 1}'s"
            )
        return value
    if server_round == 1:
        return Held(weights=site.initial, round=0)
    have = held(context)
    if have is None or have.round != server_round - 1:
        raise ProtocolError(
            f"hospital {site.hospital} holds the global model of round "
            f"{-1 if have is None else have.round}; round {server_round} needs round "
            f"{server_round - 1}'s and the server sent none"
        )
    return have


def train(setup: SiteSetup, msg: Message, context: Context) -> Message:
    """Train from the global model and answer with the protected update."""
    rnd = _round(msg)
    setup.check_online(context, server_round=rnd, stage="train")
    site = setup.site(context)
    site.begin_round(rnd)
    base = global_for(site, msg, context, server_round=rnd)
    if base.digest:
        from fedcrypt.protection.base import AggregateResult

        site.adopt(
            base.digest,
            AggregateResult(mean=base.weights, total_examples=base.total_examples, num_updates=0),
        )
    weights, metrics = site.train_round(base.weights, server_round=rnd)
    update, protect_s = site.protect(weights)
    metrics.update(
        {
            "hospital-id": float(site.hospital),
            "protect-seconds": protect_s,
            "bytes-up": float(len(update)),
            "clipped": float(getattr(site.protection, "last_clipped", 0)),
        }
    )
    record = MetricRecord(dict(metrics))
    content = RecordDict({"arrays": blob_record(update), "metrics": record})
    return Message(content=content, reply_to=msg)


def evaluate(setup: SiteSetup, msg: Message, context: Context) -> Message:
    """Unprotect the round's aggregate, hold it, evaluate it."""
    rnd = _round(msg)
    setup.check_online(context, server_round=rnd, stage="evaluate")
    site = setup.site(context)
    site.begin_round(rnd)
    blob = blob_from(msg.content.array_records.get("arrays"))
    result, unprotect_s = site.unprotect(blob)
    hold(
        context,
        Held(
            weights=result.mean,
            round=rnd,
            digest=hashlib.sha256(blob).hexdigest(),
            total_examples=site.reference_examples(result),
        ),
    )
    metrics, curves = site.evaluate(result.mean, final=bool(_config(msg).get("final", False)))
    metrics["unprotect-seconds"] = unprotect_s
    metrics["hospital-id"] = float(site.hospital)
    record = MetricRecord({**metrics, **curves})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


#: A ClientApp message handler.
Handler = Callable[[SiteSetup, Message, Context], Message]


def build_client_app(setup: SiteSetup, *, evaluate: Handler | None = evaluate) -> ClientApp:
    """A ClientApp whose hospitals are configured by ``setup``.

    ``evaluate=None`` leaves the ``evaluate`` handler to the caller (the deployment app
    dispatches it by protection mode).
    """
    app = ClientApp()

    @app.query(HELLO.split(".", 1)[1])
    def _hello(msg: Message, context: Context) -> Message:
        return hello(setup, msg, context)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(setup, msg, context)

    if evaluate is not None:
        handler = evaluate

        @app.evaluate()
        def _evaluate(msg: Message, context: Context) -> Message:
            return handler(setup, msg, context)

    return app


def metric_values(record: Mapping[str, object]) -> dict[str, float]:
    """A reply's scalar metrics as floats (list-valued entries dropped)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
