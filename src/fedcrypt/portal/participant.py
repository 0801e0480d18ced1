"""A hospital's whole loop against a portal: fetch, train, protect, upload, decrypt, report."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from fedcrypt.config import DEFAULT_LR
from fedcrypt.exceptions import ConfigError, KeyMaterialError
from fedcrypt.portal.client import PortalClient, PortalClientError
from fedcrypt.portal.schemas import FederationPublic, RoundPublic
from fedcrypt.protection.base import HospitalProtection
from fedcrypt.protection.flatten import Layout, flatten, unflatten
from fedcrypt.protection.registry import get_scheme
from fedcrypt.tasks.data.datasets import load_dataset
from fedcrypt.tasks.data.hospital import hospital_data
from fedcrypt.tasks.models import create_model, load_weights
from fedcrypt.training import evaluate, train

EventHook = Callable[[str], None]
T = TypeVar("T")

#: Attempts (1 s apart) for a request while the portal is unreachable, e.g. restarting.
RETRIES = 120
RETRY_SLEEP_S = 1.0


def _retry(say: EventHook, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
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
    dataset : str
        ``wdbc``, ``breastmnist``, ``pneumoniamnist`` or a MedMNIST ``.npz`` path.
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
    batch_size : int
        Local batch size (default: 32).
    epochs : int
        Local epochs per round (default: 1).
    lr : float or None
        Adam learning rate (default: by model, 1e-2 for ``mlp``).
    key_file : pathlib.Path or None
        The hospital key file (secret; required for ``ckks``).
    eval_split : {"val", "test"}
        Which local split the global model is evaluated on (default: ``"val"``).
    poll_s : float
        Seconds between checks whether a round is aggregated (default: 2).
    timeout_s : float
        Longest wait for one round's aggregate in seconds (default: 3600).
    """

    dataset: str = "wdbc"
    data_dir: Path | None = None
    client_id: int = 0
    num_clients: int = 1
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 32
    epochs: int = 1
    lr: float | None = None
    key_file: Path | None = None
    eval_split: Literal["val", "test"] = "val"
    poll_s: float = 2.0
    timeout_s: float = 3600.0


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did at this hospital (also written to ``participation.json``)."""

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


def _protection(fed: FederationPublic, key_file: Path | None) -> HospitalProtection:
    scheme = get_scheme(fed.protection)
    if scheme.key_files and key_file is None:
        raise KeyMaterialError(
            f"this federation uses {scheme.name}: pass --key with your hospital.key "
            "(the secret key file)"
        )
    prot = scheme.hospital_protection(key_file=key_file)
    if scheme.key_files:
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
    prot = _protection(fed, config.key_file)
    start = _current_round(client.rounds(fed.id), fed)

    dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
    data = hospital_data(
        dataset,
        client_id=config.client_id,
        num_clients=config.num_clients,
        partition=config.partition,
        alpha=config.alpha,
        seed=config.seed,
        val_fraction=config.val_fraction,
        batch_size=config.batch_size,
    )
    eval_loader = data.val if config.eval_split == "val" and data.num_val > 0 else data.test
    model = create_model(
        fed.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes
    )
    layout = Layout.of(model.state_dict())
    if fed.model_size is not None and layout.size != fed.model_size:
        raise ConfigError(
            f"model {fed.model!r} on {config.dataset} has {layout.size} values but the "
            f"federation's model has {fed.model_size}: check --dataset"
        )
    lr = config.lr if config.lr is not None else DEFAULT_LR.get(fed.model, 1e-3)
    out_dir.mkdir(parents=True, exist_ok=True)

    if start == 1:
        path = out_dir / "initial.pt"
        client.download_initial_model(fed.id, path)
        load_weights(model, path, name=fed.model)
        say(f"round 1: loaded the initial model ({layout.size} values)")
    else:
        path = out_dir / f"round-{start - 1}" / "aggregate.fcry"
        client.download_aggregate(fed.id, start - 1, path)
        result = prot.unprotect(path.read_bytes())
        model.load_state_dict(unflatten(result.mean, layout))
        say(f"joined at round {start}: decrypted the aggregate of round {start - 1}")

    outcomes: list[RoundOutcome] = []
    member = False
    for r in range(start, min(start + rounds, fed.num_rounds + 1)):
        rdir = out_dir / f"round-{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        tr = train(model, data.train, epochs=config.epochs, lr=lr, seed=config.seed * 1000 + r)
        state = model.state_dict()
        torch.save(state, rdir / "local.pt")
        t0 = time.perf_counter()
        blob = prot.protect(flatten(state), num_examples=data.num_train)
        protect_s = time.perf_counter() - t0
        update_path = rdir / "update.fcry"
        update_path.write_bytes(blob)
        say(
            f"round {r}: trained on {data.num_train} examples (loss {tr.loss:.4f}), "
            f"protected with {fed.protection} in {protect_s:.2f} s ({len(blob) / 1e6:.2f} MB)"
        )
        try:
            _retry(say, "upload", client.upload_update, fed.id, r, update_path)
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
        _retry(say, "download", client.download_aggregate, fed.id, r, agg_path)
        t0 = time.perf_counter()
        result = prot.unprotect(agg_path.read_bytes())
        decrypt_s = time.perf_counter() - t0
        model.load_state_dict(unflatten(result.mean, layout))
        torch.save(model.state_dict(), rdir / "global.pt")
        ev = evaluate(model, eval_loader)
        auc = ev.auc if math.isfinite(ev.auc) else None
        if member:
            _retry(
                say,
                "report",
                client.report_metrics,
                fed.id,
                r,
                loss=ev.loss,
                accuracy=ev.accuracy,
                auc=auc,
                num_examples=ev.num_examples,
            )
        outcome = RoundOutcome(
            round=r,
            num_examples=data.num_train,
            train_loss=tr.loss,
            upload_bytes=len(blob),
            protect_seconds=protect_s,
            wait_seconds=wait_s,
            decrypt_seconds=decrypt_s,
            loss=ev.loss,
            accuracy=ev.accuracy,
            auc=auc,
            eval_examples=ev.num_examples,
            local_model=str(rdir / "local.pt"),
            global_model=str(rdir / "global.pt"),
        )
        outcomes.append(outcome)
        _write_record(out_dir, fed, outcomes)
        say(
            f"round {r}: aggregate of {result.num_updates} hospitals ({result.total_examples} "
            f"examples) decrypted; {config.eval_split} loss {ev.loss:.4f}, accuracy "
            f"{ev.accuracy:.4f}, AUC {'-' if auc is None else f'{auc:.4f}'}"
            + ("; reported" if member else "")
        )
    return outcomes


def _write_record(out_dir: Path, fed: FederationPublic, outcomes: list[RoundOutcome]) -> None:
    record = {
        "federation": {"id": fed.id, "name": fed.name, "protection": fed.protection},
        "rounds": [asdict(o) for o in outcomes],
    }
    tmp = out_dir / "participation.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out_dir / "participation.json")
