"""ProtectedFedAvg: FedAvg where the server only ever adds protected updates.

A Flower strategy (``flwr.serverapp.strategy.Strategy``) whose arrays are opaque
protected payloads: ``configure_train`` sends the current global payload,
``aggregate_train`` sums the hospitals' protected, example-weighted updates with a
:class:`~fedcrypt.protection.base.ServerAggregator` (no decryption), and
``configure_evaluate``/``aggregate_evaluate`` have the hospitals unprotect and evaluate
the aggregate and return example-weighted metrics. Unlike ``Strategy.start``, the
:meth:`ProtectedFedAvg.run` loop fails loudly: a hospital error or a missing reply
aborts the run with :class:`~fedcrypt.exceptions.AggregationError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcrypt.exceptions import AggregationError
from fedcrypt.federation.hospital import AGGREGATE, INITIAL
from fedcrypt.federation.records import blob_from, blob_record, plain_mean, weighted_metrics
from fedcrypt.protection.base import ServerAggregator
from fedcrypt.report.records import RoundRecord

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]


@dataclass
class _Round:
    started: float
    train: dict[str, float] | None = None
    aggregate_seconds: float = 0.0
    clients: int = 0


class ProtectedFedAvg(Strategy):
    """FedAvg over protected updates.

    Parameters
    ----------
    aggregator : ServerAggregator
        The server half of the protection scheme (public key material only).
    num_clients : int
        Hospitals that must answer every round (all of them: FedAvg over the
        consortium; dropouts abort the round).
    timeout : float
        Seconds to wait for replies in each phase (default: 3600).
    """

    def __init__(
        self, aggregator: ServerAggregator, *, num_clients: int, timeout: float = 3600.0
    ) -> None:
        self.aggregator = aggregator
        self.num_clients = num_clients
        self.timeout = timeout
        self.roc: dict[str, list[float]] = {}
        self._round: _Round | None = None
        self._aggregate = b""

    # -- Strategy template --------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "ProtectedFedAvg: scheme=%s, hospitals=%d", self.aggregator.scheme, self.num_clients
        )

    def _messages(
        self, kind: str, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        nodes = sorted(grid.get_node_ids())
        return [
            Message(
                content=RecordDict({"arrays": arrays, "config": config}),
                message_type=kind,
                dst_node_id=node,
            )
            for node in nodes
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current global payload to every hospital for local training."""
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["kind"] = INITIAL if server_round == 1 else AGGREGATE
        return self._messages("train", arrays, cfg, grid)

    def _check(self, replies: Iterable[Message], phase: str) -> list[Message]:
        replies = list(replies)
        errors = [r for r in replies if r.has_error()]
        if errors:
            reason = (errors[0].error.reason or "no reason given").strip().splitlines()
            raise AggregationError(f"{len(errors)} hospital(s) failed in {phase}: {reason[-1]}")
        if len(replies) < self.num_clients:
            raise AggregationError(
                f"only {len(replies)} of {self.num_clients} hospitals answered in {phase} "
                f"within {self.timeout:.0f} s"
            )
        return replies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the protected updates without unprotecting them."""
        ok = self._check(replies, f"round {server_round} training")
        blobs = [blob_from(r.content.array_records.get("arrays")) for r in ok]
        t0 = time.perf_counter()
        aggregate = self.aggregator.aggregate(blobs)
        seconds = time.perf_counter() - t0
        metrics = [dict(r.content.metric_records["metrics"]) for r in ok]
        train = weighted_metrics(metrics, weight_key="num-examples")
        # bytes and seconds are per-hospital costs: plain means, not example-weighted
        for key in ("bytes-up", "protect-seconds", "unprotect-seconds"):
            train[key] = plain_mean(metrics, key)
        if self._round is not None:
            self._round.train = train
            self._round.aggregate_seconds = seconds
            self._round.clients = len(ok)
        out = MetricRecord({k.replace("-", "_"): v for k, v in train.items()})
        out["aggregate_seconds"] = seconds
        return blob_record(aggregate), out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the protected aggregate to every hospital for evaluation."""
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        return self._messages("evaluate", arrays, cfg, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the hospitals' validation and test metrics."""
        ok = self._check(replies, f"round {server_round} evaluation")
        records = [dict(r.content.metric_records["metrics"]) for r in ok]
        val = weighted_metrics(
            [{k: v for k, v in m.items() if k.startswith("val-")} for m in records],
            weight_key="val-examples",
        )
        test = weighted_metrics(
            [{k: v for k, v in m.items() if k.startswith("test-")} for m in records],
            weight_key="test-examples",
        )
        decrypt = plain_mean(records, "unprotect-seconds")
        for m in records:
            if "roc-fpr" in m:
                self.roc = {"fpr": list(m["roc-fpr"]), "tpr": list(m["roc-tpr"])}  # type: ignore[arg-type]
                break
        return MetricRecord({**val, **test, "decrypt-seconds": decrypt})

    # -- the loop -------------------------------------------------------------------------
    def run(
        self,
        grid: Grid,
        *,
        initial: bytes,
        num_rounds: int,
        on_round: RoundCallback | None = None,
    ) -> list[RoundRecord]:
        """Run ``num_rounds`` rounds of protected FedAvg; fail loudly on any error.

        Parameters
        ----------
        grid : flwr.serverapp.Grid
            Flower's grid (simulation or deployment).
        initial : bytes
            The round-1 global payload (a ``plain`` message of the initial weights).
        num_rounds : int
            Rounds to run.
        on_round : callable, optional
            Called with each finished :class:`RoundRecord`.

        Raises
        ------
        fedcrypt.exceptions.AggregationError
            If a hospital fails or does not answer in time.
        """
        self.summary()
        self._wait_for_nodes(grid)
        self._before_rounds(grid)
        history: list[RoundRecord] = []
        for rnd in range(1, num_rounds + 1):
            cur = self._round = _Round(started=time.perf_counter())
            aggregate = self.train_round(rnd, grid, initial=initial if rnd == 1 else None)
            replies = grid.send_and_receive(
                self.configure_evaluate(
                    rnd, blob_record(aggregate), ConfigRecord({"final": rnd == num_rounds}), grid
                ),
                timeout=self.timeout,
            )
            ev = self.aggregate_evaluate(rnd, replies) or MetricRecord()
            record = _round_record(rnd, cur, ev)
            history.append(record)
            if on_round is not None:
                on_round(record)
        return history

    def _before_rounds(self, grid: Grid) -> None:
        """Hook run once after all hospitals connected (nothing for single-message schemes)."""

    def train_round(self, server_round: int, grid: Grid, *, initial: bytes | None) -> bytes:
        """The training phase of one round; returns the protected aggregate.

        Parameters
        ----------
        server_round : int
            1-based round number.
        grid : flwr.serverapp.Grid
            Flower's grid.
        initial : bytes or None
            The initial global payload in round 1, else None (the previous aggregate is
            sent).
        """
        payload = initial if initial is not None else self._aggregate
        replies = grid.send_and_receive(
            self.configure_train(server_round, blob_record(payload), ConfigRecord(), grid),
            timeout=self.timeout,
        )
        agg, _ = self.aggregate_train(server_round, replies)
        assert agg is not None
        self._aggregate = blob_from(agg)
        if self._round is not None and self._round.train is not None:
            self._round.train["bytes-down"] = float(len(self._aggregate))
        return self._aggregate

    def _wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.timeout
        while len(list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                have = len(list(grid.get_node_ids()))
                raise AggregationError(
                    f"only {have} of {self.num_clients} hospitals connected within "
                    f"{self.timeout:.0f} s"
                )
            time.sleep(0.1)


def _round_record(rnd: int, cur: _Round, ev: MetricRecord) -> RoundRecord:
    """Combine a round's training costs and evaluation metrics into one record."""

    def metric(key: str, default: float = float("nan")) -> float:
        return float(ev.get(key, default))  # type: ignore[arg-type]

    train = cur.train or {}
    return RoundRecord(
        round=rnd,
        loss=metric("test-loss"),
        accuracy=metric("test-accuracy"),
        auc=metric("test-auc"),
        val_loss=metric("val-loss"),
        val_accuracy=metric("val-accuracy"),
        val_auc=metric("val-auc"),
        train_loss=train.get("train-loss", float("nan")),
        seconds=time.perf_counter() - cur.started,
        bytes_up_per_client=train.get("bytes-up", 0.0),
        bytes_down_per_client=train.get("bytes-down", 0.0),
        encrypt_seconds=train.get("protect-seconds", 0.0),
        aggregate_seconds=cur.aggregate_seconds,
        decrypt_seconds=metric("decrypt-seconds", 0.0),
        clients=cur.clients,
    )
