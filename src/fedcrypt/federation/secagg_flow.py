"""The server side of ``secagg`` on Flower: five message exchanges per round, then evaluate.

:class:`SecAggFedAvg` is :class:`~fedcrypt.federation.strategy.ProtectedFedAvg` with the
training phase replaced by one secure-aggregation round
(:class:`~fedcrypt.protection.secagg.SecAggServer`): ``train.secagg_advertise``,
``train.secagg_share``, ``train.secagg_masked_input`` (the hospitals train here and send
masked deltas), ``train.secagg_consistency`` (the hospitals sign the survivor set) and
``train.secagg_unmask``, each one ``grid.send_and_receive``. The
evaluate phase, the metrics and the :class:`~fedcrypt.report.records.RoundRecord` are the
same as for the other modes. Failure is loud: a hospital's error reply aborts the run with
:class:`~fedcrypt.exceptions.AggregationError` naming the hospital's error; a protocol
failure at the server (too few survivors, bad signature, replay, ...) raises the specific
secagg error. A hospital that does not answer in time counts as dropped out, which the
protocol tolerates down to the threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import AggregationError, ConfigError
from fedcrypt.federation.app import Outcome
from fedcrypt.federation.hospital import initial_payload
from fedcrypt.federation.records import blob_from, blob_record
from fedcrypt.federation.secagg_client import ACTIONS, IDENTIFY, SecAggKeys
from fedcrypt.federation.strategy import ProtectedFedAvg
from fedcrypt.protection.secagg import STAGES, RoundConfig, SecAggParams, SecAggServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggOptions:
    """Tunables of a ``secagg`` run beyond :class:`RunConfig` (API, tests, benchmarks).

    Parameters
    ----------
    clip : float
        Each delta value is clipped to ``[-clip, clip]`` (default: 4.0).
    bits : int
        Bits per masked value, 32 or 64 (default: 32).
    group_mask : bool
        Consortium group mask, so the server cannot read the aggregate (default: True).
    neighbours : int or None
        SecAgg+ neighbour degree; None is the complete graph (default: None).
    threshold : int or None
        Shamir threshold ``t``; None is the smallest secure against an active server
        colluding with one hospital, ``secure_threshold(hospitals)`` (default: None).
    max_examples : int
        Most training examples of one hospital; smaller gives a finer fixed-point scale
        (default: 65,536).
    dropouts : mapping of str to frozenset of int
        Simulated dropouts: ``stage -> hospital ids`` the server stops sending to from
        that stage on, as if they went offline (tests and benchmarks; default: none).
    """

    clip: float = 4.0
    bits: int = 32
    group_mask: bool = True
    neighbours: int | None = None
    threshold: int | None = None
    max_examples: int = 65_536
    dropouts: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def params(self, config: RunConfig) -> SecAggParams:
        """The consortium's :class:`SecAggParams` for ``config`` (validated).

        ``max_hospitals`` is the number of hospitals of the run, which keeps the
        fixed-point scale as fine as the overflow bound allows.

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            If the run has fewer than 2 hospitals or the parameters could overflow.
        """
        if config.clients < 2:
            raise ConfigError("protection 'secagg' needs at least 2 hospitals (--clients)")
        bad = set(self.dropouts) - set(STAGES)
        if bad:
            raise ConfigError(f"dropouts names unknown stages {sorted(bad)}; use {STAGES}")
        return SecAggParams(
            bits=self.bits,
            clip=self.clip,
            max_hospitals=config.clients,
            max_examples=self.max_examples,
            neighbours=self.neighbours,
            group_mask=self.group_mask,
        )


class _SecAggScheme:
    """Stands in for the single-message aggregator in :class:`ProtectedFedAvg`."""

    scheme = "secagg"

    def aggregate(self, updates: object) -> bytes:
        raise AggregationError("secagg aggregates over five message exchanges, not one")


class SecAggFedAvg(ProtectedFedAvg):
    """FedAvg whose training phase is one secure-aggregation round (five exchanges).

    Parameters
    ----------
    params : SecAggParams
        The consortium's parameters (the same at every hospital).
    registry : mapping of int to Ed25519PublicKey
        ``hospital id -> long-term public signing key`` (the server holds nothing secret).
    num_clients : int
        Hospitals expected to connect (every one is invited to every round).
    vector_size : int
        Values in the model (``P``).
    threshold : int, optional
        Shamir threshold (default: ``secure_threshold(num_clients)``).
    dropouts : mapping of str to set of int, optional
        Simulated dropouts (see :class:`SecAggOptions`).
    timeout : float
        Seconds to wait for replies in each exchange (default: 3600).
    """

    def __init__(
        self,
        *,
        params: SecAggParams,
        registry: Mapping[int, object],
        num_clients: int,
        vector_size: int,
        threshold: int | None = None,
        dropouts: Mapping[str, frozenset[int]] | None = None,
        timeout: float = 3600.0,
    ) -> None:
        super().__init__(_SecAggScheme(), num_clients=num_clients, timeout=timeout)
        self.params = params
        self.registry = dict(registry)
        self.vector_size = vector_size
        self.threshold = threshold
        self.dropouts = {s: set(v) for s, v in (dropouts or {}).items()}
        self.hospital_of: dict[int, int] = {}

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "SecAggFedAvg: hospitals=%d, P=%d, bits=%d, group mask=%s, threshold=%s",
            self.num_clients,
            self.vector_size,
            self.params.bits,
            self.params.group_mask,
            self.threshold or "default",
        )

    # -- one exchange ------------------------------------------------------------------
    def _identify(self, grid: Grid) -> None:
        nodes = sorted(grid.get_node_ids())
        msgs = [Message(content=RecordDict(), message_type=IDENTIFY, dst_node_id=n) for n in nodes]
        replies = self._check(grid.send_and_receive(msgs, timeout=self.timeout), "identify")
        mapping: dict[int, int] = {}
        for r in replies:
            hid = int(r.content.config_records["config"]["hospital-id"])  # type: ignore[arg-type]
            if hid in mapping.values():
                raise AggregationError(f"two nodes claim hospital id {hid}")
            if hid not in self.registry:
                raise AggregationError(f"hospital {hid} is not registered with the consortium")
            mapping[r.metadata.src_node_id] = hid
        self.hospital_of = mapping

    def _exchange(
        self,
        stage: str,
        requests: Mapping[int, bytes],
        *,
        server_round: int,
        grid: Grid,
        extra: bytes | None = None,
    ) -> tuple[dict[int, bytes], dict[int, dict[str, float]]]:
        """Send one stage's requests; return replies and metrics by hospital id."""
        node_of = {h: n for n, h in self.hospital_of.items()}
        msgs = []
        for hid, req in requests.items():
            content = RecordDict(
                {
                    "arrays": blob_record(req),
                    "config": ConfigRecord({"server-round": server_round, "hospital-id": hid}),
                }
            )
            if extra is not None:
                content["global"] = blob_record(extra)
            msgs.append(
                Message(
                    content=content,
                    message_type=f"train.{ACTIONS[stage]}",
                    dst_node_id=node_of[hid],
                )
            )
        replies = list(grid.send_and_receive(msgs, timeout=self.timeout))
        errors = [r for r in replies if r.has_error()]
        if errors:
            r = errors[0]
            hid = self.hospital_of.get(r.metadata.src_node_id, -1)
            reason = (r.error.reason or "no reason given").strip().splitlines()
            raise AggregationError(
                f"hospital {hid} failed in round {server_round} secagg {stage}: {reason[-1]}"
            )
        blobs: dict[int, bytes] = {}
        metrics: dict[int, dict[str, float]] = {}
        for r in replies:
            hid = self.hospital_of[r.metadata.src_node_id]
            blobs[hid] = blob_from(r.content.array_records.get("arrays"))
            metrics[hid] = {
                k: float(v)  # type: ignore[arg-type]
                for k, v in r.content.metric_records["metrics"].items()
            }
        missing = set(requests) - set(blobs)
        if missing:
            log.warning(
                "round %d secagg %s: hospitals %s did not answer within %.0f s (dropped out)",
                server_round,
                stage,
                sorted(missing),
                self.timeout,
            )
        return blobs, metrics

    def train_round(self, server_round: int, grid: Grid, *, initial: bytes | None) -> bytes:
        """One secure-aggregation round; returns the aggregate (masked with the group mask).

        Raises
        ------
        fedcrypt.exceptions.FedcryptError
            A hospital's error (``AggregationError``) or the server's protocol error
            (``TooFewSurvivorsError``, ``SignatureError``, ``ReplayError``, ...).
        """
        ids = tuple(sorted(self.hospital_of.values()))
        config = RoundConfig(
            round=server_round,
            hospital_ids=ids,
            vector_size=self.vector_size,
            params=self.params,
            threshold=self.threshold,
        )
        server = SecAggServer(config, registry=self.registry)  # type: ignore[arg-type]
        up = dict.fromkeys(ids, 0)
        down = dict.fromkeys(ids, 0)
        protect = dict.fromkeys(ids, 0.0)
        losses: list[float] = []
        gone: set[int] = set()
        t0 = time.perf_counter()
        requests = server.request_advertise()
        server_s = time.perf_counter() - t0
        aggregate = b""
        for stage in STAGES:
            gone |= self.dropouts.get(stage, set())
            requests = {h: r for h, r in requests.items() if h not in gone}
            for hid, req in requests.items():
                down[hid] += len(req)
            replies, metrics = self._exchange(
                stage,
                requests,
                server_round=server_round,
                grid=grid,
                extra=initial if stage == "masked_input" else None,
            )
            for hid, blob in replies.items():
                up[hid] += len(blob)
                protect[hid] += metrics[hid].get("stage-seconds", 0.0)
                if "train-loss" in metrics[hid]:
                    losses.append(metrics[hid]["train-loss"])
            t0 = time.perf_counter()
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
            server_s += time.perf_counter() - t0
        survivors = server.survivors
        for hid in ids:
            down[hid] += len(aggregate)
        if self._round is not None:
            n = len(survivors)
            self._round.train = {
                "train-loss": sum(losses) / len(losses) if losses else float("nan"),
                "bytes-up": sum(up[h] for h in survivors) / n,
                "bytes-down": sum(down[h] for h in survivors) / n,
                "protect-seconds": sum(protect[h] for h in survivors) / n,
            }
            self._round.aggregate_seconds = server_s
            self._round.clients = n
        return aggregate

    def _before_rounds(self, grid: Grid) -> None:
        """Learn which hospital each node is before the first round."""
        self._identify(grid)


def run_secagg_server(
    grid: Grid,
    config: RunConfig,
    *,
    keys: SecAggKeys,
    options: SecAggOptions,
    outcome: Outcome,
) -> None:
    """The ServerApp body for ``secagg``: the server gets only the public registry.

    Errors are stored in ``outcome.error`` (and re-raised) so the caller can exit
    non-zero, as :func:`fedcrypt.federation.app.run_server` does.
    """
    try:
        params = options.params(config)
        initial, layout = initial_payload(config)
        outcome.info.update(
            {"parameters": layout.size, "scheme": "secagg", "secagg": params.to_json()}
        )
        strategy = SecAggFedAvg(
            params=params,
            registry=keys.public_registry(),
            num_clients=config.clients,
            vector_size=layout.size,
            threshold=options.threshold,
            dropouts=options.dropouts,
        )
        strategy.run(grid, initial=initial, num_rounds=config.rounds, on_round=outcome.add)
        outcome.roc = strategy.roc
    except BaseException as exc:
        outcome.error = exc
        raise
    finally:
        outcome.done.set()


def build_secagg_server_app(
    config: RunConfig, *, keys: SecAggKeys, options: SecAggOptions, outcome: Outcome
) -> ServerApp:
    """A ServerApp running ``secagg`` FedAvg; only ``keys.registry`` is used (public)."""
    public = SecAggKeys(signing={}, registry=dict(keys.registry), consortium_key=None)
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_secagg_server(grid, config, keys=public, options=options, outcome=outcome)

    return app
