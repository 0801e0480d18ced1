"""The server side of ``secagg`` on Flower: five message exchanges per round, then evaluate.

:class:`SecAggFedAvg` is :class:`~fedcrypt.federation.strategy.ProtectedFedAvg` with the
training phase replaced by one secure-aggregation round
(:class:`~fedcrypt.protection.secagg.SecAggServer`): ``train.secagg_advertise``,
``train.secagg_share``, ``train.secagg_masked_input`` (the hospitals train here and send
masked deltas), ``train.secagg_consistency`` (the hospitals sign the survivor set) and
``train.secagg_unmask``, each one ``grid.send_and_receive``. The
evaluate phase, the metrics and the :class:`~fedcrypt.report.records.RoundRecord` are the
same as for the other modes. A hospital that fails or does not answer in time in a stage
counts as dropped out from there on (the reason is logged and recorded); the protocol
tolerates that down to its threshold, below which the server's protocol error (too few
survivors, ...) aborts the run loudly, as do a bad signature or a replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import AggregationError, ConfigError
from fedcrypt.federation.records import blob_from, blob_record
from fedcrypt.federation.secagg_client import ACTIONS
from fedcrypt.federation.strategy import ProtectedFedAvg, TrainOutcome
from fedcrypt.protection.secagg import STAGES, RoundConfig, SecAggParams, SecAggServer
from fedcrypt.protection.secagg.keys import Registry

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
        Server-side simulated dropouts: ``stage -> hospital ids`` the server stops
        sending to from that stage on, in every round (benchmarks; default: none).
        ``--drop`` (hospital side, one round) is the run configuration's.
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
        raise AggregationError("secagg aggregates over several message exchanges, not one")


class SecAggFedAvg(ProtectedFedAvg):
    """FedAvg whose training phase is one secure-aggregation round (staged exchanges).

    Parameters
    ----------
    params : SecAggParams
        The consortium's parameters (the same at every hospital).
    registry : mapping of int to Ed25519PublicKey
        ``hospital id -> long-term public signing key`` (the server holds nothing secret).
    num_clients : int
        Hospitals expected to connect.
    threshold : int, optional
        Shamir threshold (default: the protocol's).
    dropouts : mapping of str to set of int, optional
        Server-side simulated dropouts (see :class:`SecAggOptions`).
    fraction, seed, timeout
        As for :class:`ProtectedFedAvg`.
    """

    aggregates_are_deltas = True

    def __init__(
        self,
        *,
        params: SecAggParams,
        registry: Mapping[int, object],
        num_clients: int,
        threshold: int | None = None,
        dropouts: Mapping[str, frozenset[int]] | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        timeout: float = 3600.0,
    ) -> None:
        super().__init__(
            _SecAggScheme(),
            num_clients=num_clients,
            fraction=fraction,
            seed=seed,
            timeout=timeout,
        )
        self.params = params
        self.registry = dict(registry)
        self.threshold = threshold
        self.dropouts = {s: set(v) for s, v in (dropouts or {}).items()}

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "SecAggFedAvg: hospitals=%d, bits=%d, group mask=%s, threshold=%s",
            self.num_clients,
            self.params.bits,
            self.params.group_mask,
            self.threshold or "default",
        )

    def hello(self, grid: Grid) -> None:
        """The common hello, then: every hospital must be registered with the consortium."""
        super().hello(grid)
        for hid in self.hospital_of.values():
            if hid not in self.registry:
                raise AggregationError(f"hospital {hid} is not registered with the consortium")

    # -- one exchange ------------------------------------------------------------------
    def _exchange(
        self,
        stage: str,
        requests: Mapping[int, bytes],
        *,
        server_round: int,
        grid: Grid,
        extra: Mapping[int, Mapping[int, bytes]] | None = None,
    ) -> tuple[dict[int, bytes], dict[int, dict[str, float]], dict[int, str]]:
        """Send one stage's requests; return replies, metrics and dropouts by hospital id."""
        node_of = {h: n for n, h in self.hospital_of.items()}
        msgs = []
        for hid, req in requests.items():
            content = RecordDict(
                {
                    "arrays": blob_record(req),
                    "config": ConfigRecord({"server-round": server_round, "hospital-id": hid}),
                }
            )
            for rnd, blob in ((extra or {}).get(hid) or {}).items():
                content[f"global-{rnd}"] = blob_record(blob)
            msgs.append(
                Message(
                    content=content,
                    message_type=f"train.{ACTIONS[stage]}",
                    dst_node_id=node_of[hid],
                )
            )
        replies = list(grid.send_and_receive(msgs, timeout=self.timeout))
        ok, failed = self._split(replies)
        dropped = {self._hid(n): why for n, why in failed.items()}
        blobs: dict[int, bytes] = {}
        metrics: dict[int, dict[str, float]] = {}
        for r in ok:
            hid = self.hospital_of[r.metadata.src_node_id]
            blobs[hid] = blob_from(r.content.array_records.get("arrays"))
            metrics[hid] = {
                k: float(v)  # type: ignore[arg-type]
                for k, v in r.content.metric_records["metrics"].items()
            }
        for hid in set(requests) - set(blobs) - set(dropped):
            dropped[hid] = f"no answer within {self.timeout:.0f} s"
        for hid, why in sorted(dropped.items()):
            log.warning(
                "round %d secagg %s: hospital %d dropped out: %s", server_round, stage, hid, why
            )
        return blobs, metrics, dropped

    def train_round(self, server_round: int, grid: Grid) -> TrainOutcome:
        """One secure-aggregation round; the aggregate is masked with the group mask.

        Raises
        ------
        fedcrypt.exceptions.FedcryptError
            The server's protocol error (``TooFewSurvivorsError``, ``SignatureError``,
            ``ReplayError``, ...) when too many hospitals dropped out or one misbehaved.
        """
        invited_nodes = self.invited(server_round)
        ids = tuple(sorted(self.hospital_of[n] for n in invited_nodes))
        node_of = {h: n for n, h in self.hospital_of.items()}
        config = RoundConfig(
            round=server_round,
            hospital_ids=ids,
            vector_size=int(self.info["parameters"]),
            params=self.params,
            threshold=self.threshold,
        )
        server = SecAggServer(config, registry=self.registry)  # type: ignore[arg-type]
        up = dict.fromkeys(ids, 0)
        down = dict.fromkeys(ids, 0)
        protect = dict.fromkeys(ids, 0.0)
        losses: list[float] = []
        eps: list[tuple[float, float]] = []
        gone: set[int] = set()
        dropped: dict[int, str] = {}
        catch = {h: self.catch_up(node_of[h], server_round) for h in ids}
        t0 = time.perf_counter()
        requests = server.request_advertise()
        server_s = time.perf_counter() - t0
        aggregate = b""
        for stage in STAGES:
            for hid in self.dropouts.get(stage, set()) & set(ids):
                dropped.setdefault(hid, f"simulated dropout from {stage} (server side)")
            gone |= self.dropouts.get(stage, set()) | set(dropped)
            requests = {h: r for h, r in requests.items() if h not in gone}
            for hid, req in requests.items():
                down[hid] += len(req)
            extra = catch if stage == "masked_input" else None
            if extra:
                for hid in requests:
                    down[hid] += sum(map(len, extra.get(hid, {}).values()))
            replies, metrics, lost = self._exchange(
                stage, requests, server_round=server_round, grid=grid, extra=extra
            )
            for hid, why in lost.items():
                dropped.setdefault(hid, f"{stage}: {why}")
            for hid, blob in replies.items():
                up[hid] += len(blob)
                protect[hid] += metrics[hid].get("stage-seconds", 0.0)
                if "train-loss" in metrics[hid]:
                    losses.append(metrics[hid]["train-loss"])
                if "dp-epsilon" in metrics[hid]:
                    eps.append((metrics[hid]["dp-epsilon"], metrics[hid]["dp-delta"]))
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
        survivors = sorted(server.survivors)
        for hid in ids:
            down[hid] += len(aggregate)
        n = max(1, len(survivors))
        train: dict[str, float] = {
            "train-loss": sum(losses) / len(losses) if losses else float("nan"),
            "bytes-up": sum(up[h] for h in survivors) / n,
            "bytes-down": sum(down[h] for h in survivors) / n,
            "protect-seconds": sum(protect[h] for h in survivors) / n,
        }
        if eps:
            train["dp-epsilon"] = max(e for e, _ in eps)
            train["dp-delta"] = max(d for _, d in eps)
        return TrainOutcome(
            aggregate=aggregate,
            contributors=survivors,
            dropped={h: w for h, w in dropped.items() if h not in survivors},
            metrics=train,
            aggregate_seconds=server_s,
        )


def deployment_params(config: RunConfig, registry: Registry) -> SecAggParams:
    """The consortium's parameters on the deployment engine: the defaults, with the
    registry's group-mask choice (the same at the server and every hospital).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the run does not fit the registry (more hospitals than registered).
    """
    if config.clients > len(registry.keys):
        raise ConfigError(
            f"the run has {config.clients} hospitals but the registry only {len(registry.keys)}"
        )
    return SecAggOptions(group_mask=registry.group_mask).params(config)


def secagg_strategy(
    config: RunConfig,
    *,
    registry: Mapping[int, Ed25519PublicKey],
    options: SecAggOptions | None = None,
    params: SecAggParams | None = None,
) -> SecAggFedAvg:
    """The secagg strategy for ``config``: the server gets only the public registry."""
    options = options or SecAggOptions()
    params = params or options.params(config)
    strategy = SecAggFedAvg(
        params=params,
        registry=registry,
        num_clients=config.clients,
        threshold=options.threshold,
        dropouts=options.dropouts,
        fraction=config.fraction,
        seed=config.seed,
        timeout=config.round_timeout,
    )
    strategy.info["secagg"] = params.to_json()
    return strategy
