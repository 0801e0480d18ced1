"""A hospital's whole loop against a portal: fetch, train, protect, upload, decrypt, report."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError, KeyMaterialError
from fedcrypt.portal.client import PortalClient, PortalClientError
from fedcrypt.portal.schemas import FederationPublic, RoundPublic
from fedcrypt.protection.base import HospitalProtection
from fedcrypt.protection.flatten import flatten
from fedcrypt.protection.registry import get_scheme
from fedcrypt.site import LocalSite, task_for
from fedcrypt.tasks.models import load_weights

EventHook = Callable[[str], None]
T = TypeVar("T")

#: Attempts (1 s apart) for a request while the portal is unreachable, e.g. restarting.
RETRIES = 120
RETRY_SLEEP_S = 1.0


def retry(say: EventHook, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``call(*args, **kwargs)``, retrying while the portal is unreachable (~2 min)."""
    for attempt in range(RETRIES):
        try:
            return call(*args, **kwargs)
        except PortalClientError as exc:
            if not exc.transient or attempt == RETRIES - 1:
                raise
            if attempt == 0:
                say(f"{what}: the portal is unreachable; retrying every second")
            time.sleep(RETRY_SLEEP_S)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class ParticipationConfig:
    """How a hospital trains and evaluates locally.

    Attributes
    ----------
    dataset : str or None
        ``wdbc``, ``breastmnist``, ``pneumoniamnist`` or a MedMNIST ``.npz`` path (the
        built-in task; ignored with ``task``); None takes the federation's.
    task : str or None
        This hospital's task reference (``FILE.py:NAME`` or ``package.module:NAME``);
        None takes the federation's, if it has one.
    data_dir : pathlib.Path or None
        Folder with the MedMNIST ``.npz`` files.
    client_id, num_clients : int
        This hospital's share of a simulated partition of the dataset (a real hospital
        with its own data uses ``client_id=0, num_clients=1``).
    partition : {"iid", "dirichlet"}
        Partition scheme (default: ``"iid"``).
    alpha : float
        Dirichlet concentration (default: 0.5).
    seed : int
        Seed of partition, data split and training (default: 0).
    val_fraction : float
        Local validation share (default: 0.2).
    batch_size, epochs, lr, image_size : int, int, float, int or None
        Local training settings; None takes the federation's. A value the federation
        fixes (not in its ``local_overrides``) is refused when it differs.
    key_file : pathlib.Path or None
        The hospital's secret key file: ``he``'s consortium ``hospital.key``, or under
        ``secagg`` this hospital's own identity key ``hospital-<i>.key`` (required for
        both).
    group_mask_file : pathlib.Path or None
        ``secagg``: the consortium's ``group-mask.key`` (secret, hospitals only);
        required when the registry says the consortium uses the group mask.
    registry_file : pathlib.Path or None
        ``secagg``: the consortium's ``registry.pub``; None downloads the federation's
        (it is checked against the fingerprint ``key_file`` names either way).
    state_file : pathlib.Path or None
        ``secagg``: where this hospital records the protocol rounds it joined, so it never
        joins one twice (default: ``<out>/secagg-state-hospital-<i>``). Keep one per
        identity key.
    eval_split : {"val", "test"}
        Which local split the global model is evaluated on (default: ``"val"``).
    poll_s : float
        Seconds between checks whether a round is aggregated (default: 2).
    timeout_s : float
        Longest wait for one round's aggregate in seconds (default: 3600).
    """

    dataset: str | None = None
    task: str | None = None
    data_dir: Path | None = None
    client_id: int = 0
    num_clients: int = 1
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int | None = None
    epochs: int | None = None
    lr: float | None = None
    image_size: int | None = None
    key_file: Path | None = None
    group_mask_file: Path | None = None
    registry_file: Path | None = None
    state_file: Path | None = None
    eval_split: Literal["val", "test"] = "val"
    poll_s: float = 2.0
    timeout_s: float = 3600.0

    def run_config(self, fed: FederationPublic) -> RunConfig:
        """The :class:`RunConfig` of this hospital's local training: the federation's
        settings, with this hospital's own where the admin allows them.

        Raises
        ------
        fedcrypt.exceptions.ConfigError
            If a setting the federation fixes is given with another value.
        """
        fixed = {
            "epochs": ("local_epochs", fed.local_epochs),
            "lr": ("lr", fed.lr),
            "batch_size": ("batch_size", fed.batch_size),
            "image_size": ("image_size", fed.image_size),
        }
        chosen: dict[str, object] = {}
        for attr, (name, value) in fixed.items():
            mine = getattr(self, attr)
            if mine is not None and mine != value and name not in fed.local_overrides:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"federation {fed.name!r} fixes {name} = {value}: {flag} {mine} is not "
                    "allowed (the admin did not mark it as a local setting)"
                )
            chosen[name] = mine if mine is not None else value
        model_is_task = ":" in fed.model
        task = self.task or fed.task or (fed.model if model_is_task else None)
        return RunConfig.build(
            task=task,
            dataset=self.dataset or fed.dataset or "wdbc",
            data_dir=self.data_dir,
            model=None if task else fed.model,
            clients=self.num_clients,
            partition=self.partition,
            alpha=self.alpha,
            seed=self.seed,
            val_fraction=self.val_fraction,
            batch_size=chosen["batch_size"],
            local_epochs=chosen["local_epochs"],
            lr=chosen["lr"],
            image_size=chosen["image_size"],
            protection="plain",
            run_id=f"portal-federation-{fed.id}",
        )


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did at this hospital (also written to ``participation.json``).

    ``upload_bytes``/``download_bytes``: what it sent and received in the round (its
    update, or under ``secagg`` its five replies and requests, plus the aggregate);
    ``protect_seconds``: time spent protecting (``secagg``: in the five protocol
    stages, training excluded); ``round_seconds``: wall time from the start of the round
    to the decrypted aggregate. ``contributed`` says whether its update is in the
    aggregate, ``protocol_round`` is the secagg session's round number.
    """

    round: int
    num_examples: int
    train_loss: float
    upload_bytes: int
    protect_seconds: float
    wait_seconds: float
    decrypt_seconds: float
    loss: float
    accuracy: float
    auc: float | None
    eval_examples: int
    local_model: str
    global_model: str
    download_bytes: int = 0
    round_seconds: float = 0.0
    contributed: bool = True
    protocol_round: int | None = None


def _protection(
    fed: FederationPublic, key_file: Path | None, *, layout: object = None
) -> HospitalProtection:
    scheme = get_scheme(fed.protection)
    if scheme.key_pair and key_file is None:
        raise KeyMaterialError(
            f"this federation uses {scheme.name}: pass --key with your hospital.key "
            "(the secret key file)"
        )
    prot = scheme.hospital_protection(key_file=key_file, layout=layout)
    if scheme.key_pair:
        fingerprint = getattr(prot, "fingerprint", None)
        if fingerprint != fed.key_fingerprint:
            raise KeyMaterialError(
                f"your hospital key (fingerprint {str(fingerprint)[:16]}…) is not this "
                f"federation's key context ({str(fed.key_fingerprint)[:16]}…)"
            )
    return prot


def _current_round(rounds: list[RoundPublic], fed: FederationPublic) -> int:
    if fed.status == "draft" or not rounds:
        raise PortalClientError(f"federation {fed.name!r} has not started (no initial model yet)")
    if fed.status == "finished":
        raise PortalClientError(f"federation {fed.name!r} has finished all {fed.num_rounds} rounds")
    return rounds[-1].number


def participate(
    client: PortalClient,
    federation: int | str,
    *,
    config: ParticipationConfig,
    rounds: int,
    out_dir: Path,
    on_event: EventHook | None = None,
) -> list[RoundOutcome]:
    """Take part in ``rounds`` rounds of a federation, starting at its current round.

    Round ``r``: start from the global model (the initial model in round 1, else the
    decrypted aggregate of round ``r - 1``), train locally, protect ``n_i * weights``,
    upload, wait for the portal to aggregate, download the protected aggregate, decrypt
    it, evaluate the new global model on local data, and report the metrics.

    Everything this hospital sees in plaintext stays in ``out_dir``:
    ``round-<r>/local.pt`` (its own weights), ``round-<r>/global.pt`` (the decrypted
    global model), the protected files, and ``participation.json``.

    Parameters
    ----------
    client : PortalClient
        Authenticated as an approved hospital.
    federation : int or str
        The federation's id or name.
    config : ParticipationConfig
        Local data, training and key settings.
    rounds : int
        How many rounds to take part in (stops early when the federation finishes).
    out_dir : pathlib.Path
        Where to write models and the record (created).
    on_event : callable, optional
        Receives one line of progress at every step.

    Returns
    -------
    list of RoundOutcome

    Raises
    ------
    fedcrypt.exceptions.FedcryptError
        For a refused request, a wrong key, a model that does not match the federation,
        or data problems.
    """
    say = on_event or (lambda _msg: None)
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    fed = client.federation(federation)
    if get_scheme(fed.protection).staged:
        from fedcrypt.portal.secagg_participant import participate_secagg

        return participate_secagg(
            client, fed, config=config, rounds=rounds, out_dir=out_dir, say=say
        )
    _protection(fed, config.key_file)  # a missing or wrong key fails before any work
    start = _current_round(client.rounds(fed.id), fed)
    check_not_cancelled(fed)
    site = make_site(fed, config, protection=None)
    # the model's layout: HE quantizes tensor by tensor (integer buffers exactly)
    site.protection = _protection(fed, config.key_file, layout=site.layout)
    out_dir.mkdir(parents=True, exist_ok=True)

    if start == 1:
        path = out_dir / "initial.pt"
        client.download_initial_model(fed.id, path)
        vector = state_vector(path, site)
        say(f"round 1: loaded the initial model ({site.layout.size} values)")
    else:
        path = out_dir / f"round-{start - 1}" / "aggregate.fcry"
        client.download_aggregate(fed.id, start - 1, path)
        site.begin_round(start - 1)
        vector = site.unprotect(path.read_bytes())[0].mean
        say(f"joined at round {start}: decrypted the aggregate of round {start - 1}")

    split: Literal["val", "test"] = "val" if config.eval_split == "val" else "test"
    outcomes: list[RoundOutcome] = []
    member = False
    for r in range(start, min(start + rounds, fed.num_rounds + 1)):
        rdir = out_dir / f"round-{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        site.begin_round(r)
        weights, tr = site.train_round(vector, server_round=r)
        site.save(rdir / "local.pt")
        blob, protect_s = site.protect(weights)
        update_path = rdir / "update.fcry"
        update_path.write_bytes(blob)
        say(
            f"round {r}: trained on {site.num_train} examples (loss {tr['train-loss']:.4f}), "
            f"protected with {fed.protection} in {protect_s:.2f} s ({len(blob) / 1e6:.2f} MB)"
        )
        try:
            retry(say, "upload", client.upload_update, fed.id, r, update_path)
            member = True
            say(f"round {r}: uploaded; waiting for the other hospitals")
        except PortalClientError as exc:
            # the round reached its quorum before this hospital's upload arrived: follow
            # the federation from that round's aggregate and take part in the next one
            if exc.status_code != 409 or client.round(fed.id, r).status == "open":
                raise
            say(f"round {r}: closed before this hospital's upload; continuing from its aggregate")
        t0 = time.perf_counter()
        client.wait_for_aggregate(fed.id, r, poll_s=config.poll_s, timeout_s=config.timeout_s)
        wait_s = time.perf_counter() - t0
        agg_path = rdir / "aggregate.fcry"
        retry(say, "download", client.download_aggregate, fed.id, r, agg_path)
        result, decrypt_s = site.unprotect(agg_path.read_bytes())
        vector = result.mean
        ev = evaluate_global(site, vector, split=split, path=rdir / "global.pt")
        split, loss, accuracy, auc, n_eval = ev.split, ev.loss, ev.accuracy, ev.auc, ev.examples
        if member:
            retry(
                say,
                "report",
                client.report_metrics,
                fed.id,
                r,
                loss=loss,
                accuracy=accuracy,
                auc=auc,
                num_examples=n_eval,
            )
        outcome = RoundOutcome(
            round=r,
            num_examples=site.num_train,
            train_loss=tr["train-loss"],
            upload_bytes=len(blob),
            protect_seconds=protect_s,
            wait_seconds=wait_s,
            decrypt_seconds=decrypt_s,
            loss=loss,
            accuracy=accuracy,
            auc=auc,
            eval_examples=n_eval,
            local_model=str(rdir / "local.pt"),
            global_model=str(rdir / "global.pt"),
        )
        outcomes.append(outcome)
        write_record(out_dir, fed, outcomes)
        say(
            f"round {r}: aggregate of {result.num_updates} hospitals ({result.total_examples} "
            f"examples) decrypted; {split} loss {loss:.4f}, accuracy "
            f"{accuracy:.4f}, AUC {'-' if auc is None else f'{auc:.4f}'}"
            + ("; reported" if member else "")
        )
    return outcomes


def check_not_cancelled(fed: FederationPublic) -> None:
    """Refuse a cancelled federation.

    Raises
    ------
    PortalClientError
        With the admin's reason.
    """
    if fed.status == "cancelled":
        raise PortalClientError(
            f"federation {fed.name!r} was cancelled"
            + (f": {fed.cancel_reason}" if fed.cancel_reason else "")
        )


def make_site(
    fed: FederationPublic, config: ParticipationConfig, *, protection: HospitalProtection | None
) -> LocalSite:
    """This hospital's :class:`LocalSite` for the federation's settings.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If a fixed setting is overridden, or the model does not have the federation's
        number of values.
    """
    run_config = config.run_config(fed)
    site = LocalSite(
        task_for(run_config),
        config=run_config,
        hospital=config.client_id,
        num_hospitals=config.num_clients,
        protection=protection,
    )
    if fed.model_size is not None and site.layout.size != fed.model_size:
        raise ConfigError(
            f"model {fed.model!r} on {config.task or config.dataset} has {site.layout.size} "
            f"values but the federation's model has {fed.model_size}: check --dataset/--task"
        )
    return site


@dataclass(frozen=True)
class Evaluation:
    """The global model's metrics on one local split."""

    split: Literal["val", "test"]
    loss: float
    accuracy: float
    auc: float | None
    examples: int


def evaluate_global(
    site: LocalSite, vector: NDArray[np.floating], *, split: Literal["val", "test"], path: Path
) -> Evaluation:
    """Evaluate the global model ``vector`` (shape ``(P,)``) and save it to ``path``.

    ``split`` falls back to the other split when this site has none of it.
    """
    metrics, _ = site.evaluate(vector)
    site.save(path)
    if f"{split}-loss" not in metrics:
        split = "test" if split == "val" else "val"
    auc_v = float(metrics[f"{split}-auc"])
    return Evaluation(
        split=split,
        loss=float(metrics[f"{split}-loss"]),
        accuracy=float(metrics[f"{split}-accuracy"]),
        auc=auc_v if math.isfinite(auc_v) else None,
        examples=int(metrics[f"{split}-examples"]),
    )


def state_vector(path: Path, site: LocalSite) -> NDArray[np.float64]:
    """The published initial model as this site's flat vector (keys and shapes checked)."""

    model = site.model
    load_weights(model, path, name=site.info.model_name)
    return flatten(model.state_dict())


def write_record(out_dir: Path, fed: FederationPublic, outcomes: list[RoundOutcome]) -> None:
    """Write ``participation.json`` (atomically): the federation and each round's outcome."""
    record = {
        "federation": {"id": fed.id, "name": fed.name, "protection": fed.protection},
        "rounds": [asdict(o) for o in outcomes],
    }
    tmp = out_dir / "participation.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out_dir / "participation.json")
