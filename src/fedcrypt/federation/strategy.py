"""ProtectedFedAvg: FedAvg where the server only ever adds protected updates.

A Flower strategy (``flwr.serverapp.strategy.Strategy``) whose arrays are opaque
protected payloads. One round, as data (DESIGN §3):

1. ``configure_train``: the round's hospitals (all, or a seeded sample with
   ``fraction``) are asked to train from the global model they hold; a hospital that
   missed the last aggregate (a dropout, a restart) gets it in the message as a catch-up.
   Round 1 carries no weights: every hospital builds the initial model from the task's
   seeded factory, and the hello exchange checked they agree.
2. ``aggregate_train``: the protected, example-weighted updates of the hospitals that
   answered within ``timeout`` are added by a
   :class:`~fedcrypt.protection.base.ServerAggregator` (no decryption), provided at least
   ``min_hospitals`` answered (the quorum); otherwise the run fails loudly.
3. ``configure_evaluate``: the protected aggregate goes to every hospital (the only time
   it crosses the network); each unprotects it, holds it as the new global model and
   evaluates it on its own data.
4. ``aggregate_evaluate``: example-weighted validation/test metrics.

:meth:`ProtectedFedAvg.run` returns one :class:`~fedcrypt.report.records.RoundRecord`
per round (and gives each to ``on_round`` as it finishes).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcrypt.exceptions import AggregationError
from fedcrypt.federation.client import GLOBAL_KEY, HELLO
from fedcrypt.federation.records import blob_from, blob_record, plain_mean, weighted_metrics
from fedcrypt.protection.base import ServerAggregator
from fedcrypt.report.records import RoundRecord

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]
#: Called after each round with (round, aggregates to keep, history so far).
CheckpointHook = Callable[[int, Mapping[int, bytes], Sequence[RoundRecord]], None]


@dataclass
class TrainOutcome:
    """The training phase of one round, as the server saw it.

    Attributes
    ----------
    aggregate : bytes
        The protected aggregate.
    contributors : list of int
        Hospital ids whose updates entered it.
    dropped : dict of int to str
        Invited hospitals that did not contribute, and why.
    metrics : dict
        Training metrics (example-weighted loss; per-hospital mean costs).
    aggregate_seconds : float
        Server seconds spent aggregating.
    """

    aggregate: bytes
    contributors: list[int]
    dropped: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    aggregate_seconds: float = 0.0


_RATES = ("sensitivity", "specificity", "balanced_accuracy", "precision", "npv")


def pooled_confusion(records: Sequence[Mapping[str, Any]], *, prefix: str) -> dict[str, float]:
    """Confusion counts summed over hospitals, and the rates computed from the sums.

    Sensitivity is pooled, not averaged: ``sum(tp) / sum(tp + fn)`` (at 0.5, and at each
    hospital's Youden threshold for the ``_youden`` figures).
    """
    from fedcrypt.training.metrics import Confusion

    out: dict[str, float] = {}
    for suffix in ("", "_youden"):
        keys = [f"{prefix}{k}{suffix}" for k in ("tp", "fp", "tn", "fn")]
        rows = [r for r in records if all(k in r for k in keys)]
        if not rows:
            continue
        sums = {k.removeprefix(prefix): sum(_num(r[k]) for r in rows) for k in keys}
        pooled = Confusion.from_counts(sums, suffix=suffix)
        for name, value in pooled.as_dict().items():
            out[f"{prefix}{name}{suffix}"] = value
    return out


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _reason(msg: Message) -> str:
    """The last line of a hospital's error, without Flower's wrapping."""
    text = (msg.error.reason or "").strip().splitlines()
    line = text[-1].strip() if text else ""
    if "Message: " in line:
        line = line.split("Message: ", 1)[1]
    return line.rstrip("'>\" ").strip() or "no reason given"


class ProtectedFedAvg(Strategy):
    """FedAvg over protected updates, with a quorum, client sampling and catch-ups.

    Parameters
    ----------
    aggregator : ServerAggregator
        The server half of the protection scheme (public key material only).
    num_clients : int
        Hospitals in the consortium (all must say hello before round 1).
    min_hospitals : int, optional
        Quorum: fewest contributors a round may aggregate (default: every invited one).
    fraction : float
        Share of the hospitals invited to each round (default: 1.0). At least
        ``min_hospitals`` are invited; the sample is drawn with ``seed`` and the round.
    seed : int
        Seeds the sampling (default: 0).
    timeout : float
        Seconds to wait for replies in each exchange (default: 3600).
    """

    def __init__(
        self,
        aggregator: ServerAggregator,
        *,
        num_clients: int,
        min_hospitals: int | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        timeout: float = 3600.0,
    ) -> None:
        self.aggregator = aggregator
        self.num_clients = num_clients
        self.min_hospitals = min_hospitals
        self.fraction = fraction
        self.seed = seed
        self.timeout = timeout
        self.roc: dict[str, list[float]] = {}
        self.info: dict[str, Any] = {}
        self.hospital_of: dict[int, int] = {}
        self.holders: dict[int, int] = {}
        self.aggregates: dict[int, bytes] = {}
        self._final = False

    # -- Strategy template (Flower) --------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "%s: scheme=%s, hospitals=%d, quorum=%s, fraction=%.2f",
            type(self).__name__,
            self.aggregator.scheme,
            self.num_clients,
            self.min_hospitals or "all",
            self.fraction,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the round's hospitals to train (catch-up payload for those behind)."""
        return [
            self._message("train", node, server_round, self.catch_up(node, server_round))
            for node in self.invited(server_round)
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the protected updates without unprotecting them (Flower's interface)."""
        out = self._aggregate(server_round, list(replies), invited=None)
        return blob_record(out.aggregate), MetricRecord(out.metrics)  # type: ignore[arg-type]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the protected aggregate to every hospital for evaluation."""
        cfg = ConfigRecord({"server-round": server_round, "final": self._final})
        return [
            Message(
                content=RecordDict({"arrays": arrays, "config": cfg}),
                message_type="evaluate",
                dst_node_id=node,
            )
            for node in sorted(self.hospital_of)
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the hospitals' validation and test metrics."""
        ok, _ = self._split(list(replies))
        if not ok:
            raise AggregationError(f"no hospital evaluated the round-{server_round} aggregate")
        for r in ok:
            self.holders[r.metadata.src_node_id] = server_round
        records = [dict(r.content.metric_records["metrics"]) for r in ok]
        scalars = [{k: v for k, v in m.items() if not isinstance(v, list)} for m in records]
        val = weighted_metrics(
            [{k: v for k, v in m.items() if k.startswith("val-")} for m in scalars],
            weight_key="val-examples",
        )
        test = weighted_metrics(
            [{k: v for k, v in m.items() if k.startswith("test-")} for m in scalars],
            weight_key="test-examples",
        )
        val.update(pooled_confusion(scalars, prefix="val-"))
        test.update(pooled_confusion(scalars, prefix="test-"))
        unprotect = plain_mean(scalars, "unprotect-seconds")
        for m in records:
            if "roc-fpr" in m:
                self.roc = {"fpr": list(m["roc-fpr"]), "tpr": list(m["roc-tpr"])}  # type: ignore[arg-type]
                break
        return MetricRecord({**val, **test, "unprotect-seconds": unprotect, "evaluated": len(ok)})

    # -- who takes part --------------------------------------------------------------
    def hello(self, grid: Grid) -> None:
        """Wait for every hospital, learn its id, and check all built the same model.

        Raises
        ------
        fedcrypt.exceptions.AggregationError
            If not every hospital connects within ``timeout``, two nodes claim one id,
            or the hospitals built different initial models (other task, seed, code).
        """
        deadline = time.monotonic() + self.timeout
        while len(list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                have = len(list(grid.get_node_ids()))
                raise AggregationError(
                    f"only {have} of {self.num_clients} hospitals connected within "
                    f"{self.timeout:.0f} s"
                )
            time.sleep(0.1)
        nodes = sorted(grid.get_node_ids())
        msgs = [Message(content=RecordDict(), message_type=HELLO, dst_node_id=n) for n in nodes]
        replies = list(grid.send_and_receive(msgs, timeout=self.timeout))
        ok, failed = self._split(replies)
        if failed:
            node, why = next(iter(failed.items()))
            raise AggregationError(f"a hospital (node {node}) failed to start: {why}")
        if len(ok) < self.num_clients:
            raise AggregationError(
                f"only {len(ok)} of {self.num_clients} hospitals answered the hello"
            )
        facts: dict[str, set[Any]] = {"parameters": set(), "initial-digest": set()}
        mapping: dict[int, int] = {}
        for r in ok:
            cfg = r.content.config_records["config"]
            hid = int(cfg["hospital-id"])  # type: ignore[arg-type]
            if hid in mapping.values():
                raise AggregationError(f"two nodes claim hospital id {hid}")
            mapping[r.metadata.src_node_id] = hid
            for key in facts:
                facts[key].add(cfg.get(key))
            self.info.setdefault("model", cfg.get("model"))
            self.info.setdefault("lr", cfg.get("lr"))
            self.info.setdefault("task", cfg.get("task"))
            self.info.setdefault("label_kind", cfg.get("label-kind"))
        if len(facts["parameters"]) != 1 or len(facts["initial-digest"]) != 1:
            raise AggregationError(
                "the hospitals built different initial models (model sizes "
                f"{sorted(map(str, facts['parameters']))}): they must run the same task, "
                "model and seed"
            )
        self.hospital_of = mapping
        self.info["parameters"] = int(next(iter(facts["parameters"])))

    def invited(self, server_round: int) -> list[int]:
        """The nodes invited to ``server_round`` (seeded sample with ``fraction`` < 1)."""
        nodes = sorted(self.hospital_of)
        if self.fraction >= 1.0:
            return nodes
        k = max(self.min_hospitals or 1, math.ceil(self.fraction * len(nodes)))
        rng = np.random.default_rng([self.seed, server_round, 0xFED])
        by_hospital = sorted(nodes, key=lambda n: self.hospital_of[n])
        picked = rng.choice(len(by_hospital), size=min(k, len(by_hospital)), replace=False)
        return sorted(by_hospital[i] for i in picked)

    def quorum(self, invited: int) -> int:
        """Fewest contributors a round with ``invited`` hospitals may aggregate."""
        return invited if self.min_hospitals is None else min(self.min_hospitals, invited)

    #: Whether aggregates are deltas (a hospital behind needs every missed one) rather
    #: than whole models (the latest suffices).
    aggregates_are_deltas = False

    def catch_up(self, node: int, server_round: int) -> dict[int, bytes]:
        """Aggregates ``node`` lacks to hold round ``server_round - 1``'s global model.

        Empty when it holds it (or in round 1). Whole-model aggregates: the latest one;
        delta aggregates: every round after the one it holds.
        """
        if server_round == 1 or not self.aggregates:
            return {}
        have = self.holders.get(node, 0)
        if have == server_round - 1:
            return {}
        if self.aggregates_are_deltas:
            return {r: b for r, b in sorted(self.aggregates.items()) if r > have}
        last = max(self.aggregates)
        return {last: self.aggregates[last]}

    def remember(self, server_round: int, aggregate: bytes) -> None:
        """Keep ``aggregate`` for catch-ups (only the ones some hospital may still need)."""
        self.aggregates[server_round] = aggregate
        if not self.aggregates_are_deltas:
            self.aggregates = {server_round: aggregate}
            return
        oldest = min((self.holders.get(n, 0) for n in self.hospital_of), default=0)
        self.aggregates = {r: b for r, b in self.aggregates.items() if r > oldest}

    def _message(
        self, kind: str, node: int, server_round: int, payload: Mapping[int, bytes]
    ) -> Message:
        cfg = ConfigRecord({"server-round": server_round, "global-round": server_round - 1})
        content = RecordDict({"config": cfg})
        for rnd, blob in payload.items():
            content[f"{GLOBAL_KEY}-{rnd}"] = blob_record(blob)
        return Message(content=content, message_type=kind, dst_node_id=node)

    def _split(self, replies: list[Message]) -> tuple[list[Message], dict[int, str]]:
        ok = [r for r in replies if not r.has_error()]
        failed = {r.metadata.src_node_id: _reason(r) for r in replies if r.has_error()}
        return ok, failed

    def _hid(self, node: int) -> int:
        return self.hospital_of.get(node, -1)

    # -- one round ---------------------------------------------------------------------
    def _aggregate(
        self, server_round: int, replies: list[Message], *, invited: list[int] | None
    ) -> TrainOutcome:
        ok, failed = self._split(replies)
        invited_nodes = (
            invited if invited is not None else [r.metadata.src_node_id for r in replies]
        )
        answered = {r.metadata.src_node_id for r in replies}
        dropped = {self._hid(n): why for n, why in failed.items()}
        for n in invited_nodes:
            if n not in answered:
                dropped[self._hid(n)] = f"no answer within {self.timeout:.0f} s"
        need = self.quorum(len(invited_nodes))
        for hid, why in sorted(dropped.items()):
            log.warning("round %d: hospital %d did not contribute: %s", server_round, hid, why)
        if len(ok) < need:
            detail = "; ".join(f"hospital {h}: {w}" for h, w in sorted(dropped.items()))
            raise AggregationError(
                f"round {server_round}: only {len(ok)} of {len(invited_nodes)} hospitals "
                f"contributed, the quorum is {need}" + (f" ({detail})" if detail else "")
            )
        blobs = [blob_from(r.content.array_records.get("arrays")) for r in ok]
        t0 = time.perf_counter()
        aggregate = self.aggregator.aggregate(blobs)
        seconds = time.perf_counter() - t0
        metrics = [dict(r.content.metric_records["metrics"]) for r in ok]
        train = weighted_metrics(metrics, weight_key="num-examples")
        # bytes and seconds are per-hospital costs: plain means, not example-weighted
        for key in ("bytes-up", "protect-seconds"):
            train[key] = plain_mean(metrics, key)
        train["clipped"] = float(sum(_num(m.get("clipped")) for m in metrics))
        eps = [_num(m["dp-epsilon"]) for m in metrics if "dp-epsilon" in m]
        if eps:  # each hospital's guarantee is its own: the run's figure is the largest
            train["dp-epsilon"] = max(eps)
            train["dp-delta"] = max(_num(m.get("dp-delta")) for m in metrics)
        return TrainOutcome(
            aggregate=aggregate,
            contributors=sorted(self._hid(r.metadata.src_node_id) for r in ok),
            dropped=dropped,
            metrics=train,
            aggregate_seconds=seconds,
        )

    def train_round(self, server_round: int, grid: Grid) -> TrainOutcome:
        """The training phase of one round: invite, collect, aggregate (quorum)."""
        invited = self.invited(server_round)
        msgs = [
            self._message("train", n, server_round, self.catch_up(n, server_round)) for n in invited
        ]
        replies = list(grid.send_and_receive(msgs, timeout=self.timeout))
        out = self._aggregate(server_round, replies, invited=invited)
        down = [sum(map(len, self.catch_up(n, server_round).values())) for n in invited]
        out.metrics["bytes-down"] = float(np.mean(down)) + len(out.aggregate)
        return out

    def evaluate_round(self, server_round: int, aggregate: bytes, grid: Grid) -> MetricRecord:
        """Send the aggregate to every hospital; example-weighted metrics."""
        msgs = self.configure_evaluate(server_round, blob_record(aggregate), ConfigRecord(), grid)
        replies = grid.send_and_receive(msgs, timeout=self.timeout)
        return self.aggregate_evaluate(server_round, replies) or MetricRecord()

    # -- the loop ------------------------------------------------------------------------
    def run(
        self,
        grid: Grid,
        *,
        num_rounds: int,
        start_round: int = 1,
        resume: tuple[Mapping[int, bytes], Sequence[RoundRecord]] | None = None,
        on_round: RoundCallback | None = None,
        checkpoint: CheckpointHook | None = None,
    ) -> list[RoundRecord]:
        """Run rounds ``start_round..num_rounds`` of protected FedAvg.

        Parameters
        ----------
        grid : flwr.serverapp.Grid
            Flower's grid (simulation or deployment).
        num_rounds : int
            The last round to run.
        start_round : int
            The first round to run (> 1 when resuming; default: 1).
        resume : (dict, list of RoundRecord), optional
            The protected aggregates a restarted hospital needs (``round -> bytes``, see
            :meth:`catch_up`) and the history so far.
        on_round : callable, optional
            Called with each finished :class:`RoundRecord`.
        checkpoint : callable, optional
            Called with ``(round, aggregates to keep, history)`` after each round.

        Returns
        -------
        list of RoundRecord
            The whole history (resumed rounds included).

        Raises
        ------
        fedcrypt.exceptions.AggregationError
            If too few hospitals answer (quorum) or no hospital evaluates.
        """
        self.summary()
        self.hello(grid)
        history: list[RoundRecord] = []
        if resume is not None:
            kept, previous = resume
            history = list(previous)
            self.aggregates = dict(kept)
        for rnd in range(start_round, num_rounds + 1):
            started = time.perf_counter()
            self._final = rnd == num_rounds
            out = self.train_round(rnd, grid)
            ev = self.evaluate_round(rnd, out.aggregate, grid)
            self.remember(rnd, out.aggregate)
            record = round_record(rnd, out, ev, seconds=time.perf_counter() - started)
            history.append(record)
            if checkpoint is not None:
                checkpoint(rnd, dict(self.aggregates), history)
            if on_round is not None:
                on_round(record)
        return history


def round_record(
    rnd: int, out: TrainOutcome, ev: Mapping[str, Any], *, seconds: float
) -> RoundRecord:
    """Combine a round's training outcome and evaluation metrics into one record."""

    def metric(key: str, default: float = math.nan) -> float:
        value = ev.get(key, default)
        return float(value) if isinstance(value, int | float) else default

    train = out.metrics
    core = {"loss", "accuracy", "auc", "examples"}
    extra: dict[str, Any] = {
        k.removeprefix("test-").replace("-", "_"): float(v)
        for k, v in ev.items()
        if k.startswith("test-")
        and k.removeprefix("test-") not in core
        and isinstance(v, int | float)
    }
    per_label = sorted(
        (int(k[4:]), v) for k, v in extra.items() if k[:4] == "auc_" and k[4:].isdigit()
    )
    if per_label:
        extra["auc_per_label"] = [v for _, v in per_label]
        for i, _ in per_label:
            del extra[f"auc_{i}"]
    if "dp-epsilon" in train:
        extra["epsilon"] = float(train["dp-epsilon"])
        extra["delta"] = float(train["dp-delta"])
    return RoundRecord(
        round=rnd,
        loss=metric("test-loss"),
        accuracy=metric("test-accuracy"),
        auc=metric("test-auc"),
        val_loss=metric("val-loss"),
        val_accuracy=metric("val-accuracy"),
        val_auc=metric("val-auc"),
        train_loss=train.get("train-loss", math.nan),
        seconds=seconds,
        bytes_up_per_client=train.get("bytes-up", 0.0),
        bytes_down_per_client=train.get("bytes-down", 0.0),
        protect_seconds=train.get("protect-seconds", 0.0),
        aggregate_seconds=out.aggregate_seconds,
        unprotect_seconds=metric("unprotect-seconds", 0.0),
        clients=len(out.contributors),
        contributors=list(out.contributors),
        dropped={str(k): v for k, v in sorted(out.dropped.items())},
        evaluated=int(metric("evaluated", 0.0)),
        clipped=int(train.get("clipped", 0.0)),
        extra=extra,
    )


__all__ = ["ProtectedFedAvg", "TrainOutcome", "round_record"]
