"""``fedcrypt bench privacy``: measured evidence of what each party learns.

Three parts, written to ``privacy.json`` (+ PNG figures):

* ``gradient_inversion``: the server attacks what it *actually receives* from one
  hospital in each protection mode (the real ``fedcrypt.protection`` objects): in
  ``plain`` the wire envelope of the hospital's weights after one local SGD step on
  BreastMNIST images; in ``he`` BFV ciphertext bytes; in ``secagg`` the signed masked
  vector of the real protocol (three hospitals, group mask on). It reads the bytes as
  best it can and runs the inversion of Geiping et al. 2020
  (:mod:`fedcrypt.privacy.inversion`). PSNR / SSIM of the best reconstruction against
  the true images.
* ``membership_inference``: loss-threshold (Yeom et al. 2018) and offline LiRA
  (Carlini et al. 2022) attacks on the final global model of a small federated run
  (three hospitals, few examples, many epochs so that the model without DP overfits),
  with and without sample-level DP-SGD at the configured ε.
* ``capabilities``: who can compute what in each mode (DESIGN.md §2).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcrypt.exceptions import ConfigError

log = logging.getLogger(__name__)

Log = Callable[[str], None]

INVERSION_MODES: tuple[str, ...] = ("plain", "he", "secagg")


@dataclass
class Options:
    """What ``bench privacy`` runs (defaults: the full run).

    Parameters
    ----------
    dataset : str
        MedMNIST dataset (default: ``"breastmnist"``).
    data_dir : Path or None
        Folder with ``<dataset>.npz`` (default: ``None``: the loader's default).
    seed : int
        Seed of data selection, models and attacks (default: 0).
    inversion_images : sequence of int
        Batch sizes (images per local step) attacked, each 1-8 (default: ``(1, 2)``; the
        attack weakens with larger batches: see docs/privacy.md).
    inversion_iterations : int
        Attack optimisation steps (default: 600).
    inversion_restarts : int
        Random restarts of the attack (default: 2).
    inversion_lr : float
        The hospital's SGD learning rate, known to the server (default: 0.01).
    he_preset : str
        HE preset for the ``he`` mode (default: ``"packed"``, the default BFV preset).
    hospitals : int
        Hospitals of the membership run (default: 3).
    examples_per_hospital : int
        Training examples per hospital (default: 32: few, so the model memorises them).
    rounds, local_epochs : int
        FedAvg rounds and local epochs (default: 5 and 20).
    batch_size : int
        Local batch size (default: 8: many steps, so the model memorises).
    lr : float
        Adam learning rate (default: 1e-3).
    model : str
        ``"cnn"`` or ``"mlp"`` (default: ``"cnn"``), made Opacus-compatible in both
        arms so the only difference is DP.
    dp_epsilon, dp_delta, dp_max_grad_norm : float
        The DP arm's target (default: ε = 4, δ = 1e-3, C = 1.0).
    shadows : int
        Shadow models per arm for offline LiRA; 0 skips LiRA (default: 8).
    trainer : str
        How target and shadow models are trained, a key of :data:`TRAINER_FUNCTIONS`
        (default: ``"direct"``: in-process FedAvg with :func:`fedcrypt.training.train`
        and the DP wrap hook).
    """

    dataset: str = "breastmnist"
    data_dir: Path | None = None
    seed: int = 0
    inversion_images: Sequence[int] = (1, 2)
    inversion_iterations: int = 600
    inversion_restarts: int = 2
    inversion_lr: float = 0.01
    he_preset: str = "packed"
    hospitals: int = 3
    examples_per_hospital: int = 32
    rounds: int = 5
    local_epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    model: str = "cnn"
    dp_epsilon: float = 4.0
    dp_delta: float = 1e-3
    dp_max_grad_norm: float = 1.0
    shadows: int = 8
    trainer: str = "direct"

    @classmethod
    def for_quick(cls, *, data_dir: Path | None = None) -> Options:
        """About a minute on one core: one image, an MLP target, the loss attack only."""
        return cls(
            data_dir=data_dir,
            inversion_images=(1,),
            inversion_iterations=200,
            inversion_restarts=1,
            model="mlp",
            examples_per_hospital=32,
            rounds=10,
            local_epochs=20,
            shadows=0,
        )

    def check(self) -> None:
        """Raise :class:`ConfigError` for out-of-range options."""
        if not self.inversion_images or any(not 1 <= b <= 8 for b in self.inversion_images):
            raise ConfigError(
                f"inversion images must be 1-8 per batch, got {self.inversion_images}"
            )
        for name in ("inversion_iterations", "hospitals", "examples_per_hospital", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1")
        if self.local_epochs < 1 or self.batch_size < 1 or self.shadows < 0:
            raise ConfigError("local epochs and batch size must be >= 1, shadows >= 0")
        if self.trainer not in TRAINER_FUNCTIONS:
            raise ConfigError(
                f"trainer must be one of {', '.join(TRAINER_FUNCTIONS)}, got {self.trainer!r}"
            )
        if self.model not in ("cnn", "mlp"):
            raise ConfigError(f"model must be cnn or mlp, got {self.model!r}")


# -- gradient inversion -------------------------------------------------------------------


def _received_plain(local: NDArray[np.float64], n: int) -> bytes:
    from fedcrypt.protection.plain import PlainHospital

    return PlainHospital().protect(local, num_examples=n)


def _read_plain(blob: bytes) -> NDArray[np.float64]:
    """The server's reading of a plain envelope: the weighted vector over its count
    (decoded as the plain aggregator decodes it, so the attack follows the wire format)."""
    from fedcrypt.protection.plain import PlainHospital

    return np.asarray(PlainHospital().unprotect(blob).mean, dtype=np.float64)


def _bytes_as_values(payload: bytes, size: int) -> NDArray[np.float64]:
    """Ciphertext bytes read as values: each byte ``b`` as ``(b - 127.5) / 127.5``,
    repeated if there are fewer than ``size`` bytes."""
    raw = np.frombuffer(payload, dtype=np.uint8).astype(np.float64)
    raw = np.resize(raw, size) if raw.size < size else raw[:size]
    return (raw - 127.5) / 127.5


def _received_he(local: NDArray[np.float64], n: int, preset: str) -> tuple[bytes, str]:
    from fedcrypt.protection.he.keys import generate_keys, hospital_from_bytes

    hospital_key, _server_key = generate_keys(preset)
    blob = hospital_from_bytes(hospital_key).protect(local, num_examples=n)
    return blob, preset


def _read_he(blob: bytes, size: int) -> NDArray[np.float64]:
    """The server's best reading of a ciphertext message: its payload bytes as values."""
    from fedcrypt.protection import wire

    env = wire.unpack(blob)
    payload = b"".join(bytes(s) for s in env.sections)
    return _bytes_as_values(payload, size)


def _received_secagg(
    local: NDArray[np.float64], n: int, others: Sequence[NDArray[np.float64]]
) -> tuple[bytes, Any]:
    """Run one real secagg round (hospital 1 = the victim); return its masked-input reply."""
    from fedcrypt.protection.secagg import RoundConfig, SecAggParams, SecAggServer, new_consortium

    params = SecAggParams()
    ids = tuple(range(1, 2 + len(others)))
    hospitals, registry = new_consortium(ids, params=params)
    config = RoundConfig(round=1, hospital_ids=ids, vector_size=local.size, params=params)
    server = SecAggServer(config, registry=registry)
    inputs = {1: (local, n), **{i + 2: (v, n) for i, v in enumerate(others)}}
    captured: dict[str, bytes] = {}

    def intercept(stage: str, direction: str, hid: int, message: bytes) -> bytes:
        if stage == "masked_input" and direction == "reply" and hid == 1:
            captured["reply"] = message
        return message

    from fedcrypt.protection.secagg import run_round

    run_round(server, hospitals, inputs, intercept=intercept, unprotect=False)
    return captured["reply"], params


def _read_secagg(blob: bytes, size: int, n: int, params: Any) -> NDArray[np.float64]:
    """The server's best reading of a masked vector: dequantized as if unmasked."""
    from fedcrypt.protection import wire
    from fedcrypt.protection.secagg.masking import signed_dtype

    env = wire.unpack(blob)
    masked = np.frombuffer(bytes(env.sections[0]), dtype=signed_dtype(params.bits))
    return masked[:size].astype(np.float64) / (params.resolved_scale * n)


def inversion_bench(opts: Options, say: Log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Gradient inversion in each mode; rows and the images for the figure."""
    from fedcrypt.privacy.image_metrics import similarity
    from fedcrypt.privacy.inversion import (
        InversionNet,
        gradient_from_update,
        invert_gradients,
        local_sgd_step,
        parameter_vector,
    )
    from fedcrypt.tasks.data import load_dataset

    ds = load_dataset(opts.dataset, data_dir=opts.data_dir, seed=opts.seed)
    if ds.kind != "image":
        raise ConfigError(f"gradient inversion needs an image dataset, got {ds.name}")
    c, h, _w = ds.input_shape
    rng = np.random.default_rng(opts.seed)
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    for b in opts.inversion_images:
        idx = rng.choice(len(ds.train), size=b, replace=False)
        x = torch.from_numpy(ds.train.x[idx])
        y = torch.from_numpy(ds.train.y[idx])
        torch.manual_seed(opts.seed)
        global_model = InversionNet(c, h, ds.num_classes)
        w0 = parameter_vector(global_model)
        local = local_sgd_step(copy.deepcopy(global_model), x, y, lr=opts.inversion_lr)
        # two other hospitals for the secagg round, with their own images
        others = []
        for _ in range(2):
            j = rng.choice(len(ds.train), size=b, replace=False)
            others.append(
                local_sgd_step(
                    copy.deepcopy(global_model),
                    torch.from_numpy(ds.train.x[j]),
                    torch.from_numpy(ds.train.y[j]),
                    lr=opts.inversion_lr,
                )
            )
        figures[str(b)] = {"truth": x.numpy()}
        for mode in INVERSION_MODES:
            say(f"gradient inversion · {b} image(s) · {mode}")
            t0 = time.perf_counter()
            if mode == "plain":
                blob = _received_plain(local, b)
                guess = _read_plain(blob)
                reading = "plain envelope: weighted weights / num_examples"
            elif mode == "he":
                blob, _ = _received_he(local, b, opts.he_preset)
                guess = _read_he(blob, local.size)
                reading = "ciphertext payload bytes as values in [-1, 1]"
            else:
                blob, params = _received_secagg(local, b, others)
                guess = _read_secagg(blob, local.size, b, params)
                reading = "masked Z_2^32 vector dequantized as if unmasked"
            protect_s = time.perf_counter() - t0
            gradient = gradient_from_update(w0, guess, lr=opts.inversion_lr)
            result = invert_gradients(
                global_model,
                gradient,
                labels=y,
                image_shape=ds.input_shape,
                iterations=opts.inversion_iterations,
                restarts=opts.inversion_restarts,
                seed=opts.seed,
            )
            sim = similarity(x.numpy(), result.images)
            figures[str(b)][mode] = result.images[list(sim.order)]
            rows.append(
                {
                    "protection": mode,
                    "images": int(b),
                    "psnr": sim.psnr,
                    "ssim": sim.ssim,
                    "received_bytes": len(blob),
                    "server_reading": reading,
                    "attack_seconds": time.perf_counter() - t0 - protect_s,
                }
            )
    return rows, figures


# -- membership inference -----------------------------------------------------------------


@dataclass
class TargetRun:
    """A trained global model and what the bench reports about it."""

    model: nn.Module
    test_accuracy: float
    test_auc: float
    dp: dict[str, Any] | None = None
    seconds: float = 0.0
    trainer: str = "direct"


def _subset(split: Any, idx: NDArray[np.int64]) -> Any:
    from fedcrypt.tasks.data import Split

    return Split(split.x[idx], split.y[idx])


def _new_model(opts: Options, ds: Any, seed: int) -> nn.Module:
    from fedcrypt.tasks.models import create_model
    from fedcrypt.training.dp import dp_compatible

    torch.manual_seed(seed)
    width = 0.5 if opts.model == "cnn" else 2.0
    model = create_model(
        opts.model,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        width_mult=width,
        dropout=0.0,
    )
    return dp_compatible(model)


def _train_local(
    model: nn.Module,
    loader: DataLoader[Any],
    *,
    epochs: int,
    lr: float,
    seed: int,
    wrap: Callable[..., Any] | None,
) -> None:
    """One hospital's local training: ``fedcrypt.training.train`` with the DP hook.

    Until ``train(..., wrap=...)`` lands, the same Adam loop runs here with the hook.
    """
    from fedcrypt.training import train

    if wrap is None:
        train(model, loader, epochs=epochs, lr=lr, seed=seed)
        return
    if "wrap" in inspect.signature(train).parameters:
        train(model, loader, epochs=epochs, lr=lr, seed=seed, wrap=wrap)
        return
    torch.manual_seed(seed)
    optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    net, optimizer, batches = wrap(model, optimizer, loader)
    net.train()
    for _ in range(epochs):
        for xb, yb in batches:
            if yb.numel() == 0:
                continue  # an empty Poisson batch
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            optimizer.step()


def train_direct(opts: Options, ds: Any, *, dp: bool, seed: int, members: Any) -> TargetRun:
    """FedAvg in process: each hospital trains a copy of the global model on its share of
    ``members`` (:func:`fedcrypt.tasks.data.hospital.hospital_splits`), the server averages
    the weights by example count; DP-SGD at every hospital when ``dp``."""
    from fedcrypt.tasks.data.hospital import hospital_splits
    from fedcrypt.training import evaluate
    from fedcrypt.training.dp import SampleDP, plan_sample_dp, run_record

    t0 = time.perf_counter()
    fed = dataclasses.replace(ds, train=members)
    shares = [
        hospital_splits(fed, client_id=i, num_clients=opts.hospitals, seed=seed, val_fraction=0.0)[
            0
        ]
        for i in range(opts.hospitals)
    ]
    global_model = _new_model(opts, ds, seed)
    dps: list[SampleDP] = []
    if dp:
        for share in shares:
            plan = plan_sample_dp(
                epsilon=opts.dp_epsilon,
                delta=opts.dp_delta,
                max_grad_norm=opts.dp_max_grad_norm,
                num_train=len(share),  # type: ignore[arg-type]
                batch_size=opts.batch_size,
                rounds=opts.rounds,
                local_epochs=opts.local_epochs,
            )
            dps.append(SampleDP(plan))
    for rnd in range(opts.rounds):
        states, weights = [], []
        for i, share in enumerate(shares):
            local = copy.deepcopy(global_model)
            gen = torch.Generator().manual_seed(seed * 7919 + rnd * 101 + i)
            loader = DataLoader(share, batch_size=opts.batch_size, shuffle=True, generator=gen)
            _train_local(
                local,
                loader,
                epochs=opts.local_epochs,
                lr=opts.lr,
                seed=seed + 31 * rnd + i,
                wrap=dps[i].wrap if dp else None,
            )
            if dp:
                dps[i].end_round()
            states.append(local.state_dict())
            weights.append(len(share))  # type: ignore[arg-type]
        total = float(sum(weights))
        avg = {
            k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
                states[0][k].dtype
            )
            for k in states[0]
        }
        global_model.load_state_dict(avg)
    test = DataLoader(TensorDataset(torch.from_numpy(ds.test.x), torch.from_numpy(ds.test.y)), 256)
    ev = evaluate(global_model, test)
    return TargetRun(
        model=global_model,
        test_accuracy=ev.accuracy,
        test_auc=ev.auc,
        dp=run_record([d.record() for d in dps]) if dp else None,
        seconds=time.perf_counter() - t0,
    )


#: Target-model trainers (``Options.trainer``): each takes ``(opts, ds, dp=, seed=,
#: members=)`` and returns a :class:`TargetRun`. ``"direct"`` is in-process FedAvg; a
#: ``fedcrypt.simulate``-based trainer joins here once that API exists.
TRAINER_FUNCTIONS: dict[str, Callable[..., TargetRun]] = {"direct": train_direct}


def membership_bench(opts: Options, say: Log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Loss-threshold and offline LiRA AUC on the global model, without and with DP."""
    from fedcrypt.privacy.membership import (
        attack_auc,
        example_losses,
        lira_offline_scores,
        logit_confidence,
        loss_threshold_scores,
    )
    from fedcrypt.tasks.data import load_dataset

    ds = load_dataset(opts.dataset, data_dir=opts.data_dir, seed=opts.seed)
    rng = np.random.default_rng(opts.seed + 1)
    n_members = opts.hospitals * opts.examples_per_hospital
    if n_members > len(ds.test):
        raise ConfigError(
            f"{n_members} members need as many non-members; the test split has {len(ds.test)}"
        )
    order = rng.permutation(len(ds.train))
    member_idx = np.sort(order[:n_members])
    pool_idx = order[n_members:]  # the attacker's own data for shadow models
    members = _subset(ds.train, member_idx)
    nonmembers = _subset(ds.test, np.sort(rng.choice(len(ds.test), n_members, replace=False)))
    pool_x = np.concatenate([ds.train.x[pool_idx], ds.val.x])
    pool_y = np.concatenate([ds.train.y[pool_idx], ds.val.y])
    cand_x = torch.from_numpy(np.concatenate([members.x, nonmembers.x]))
    cand_y = torch.from_numpy(np.concatenate([members.y, nonmembers.y]))
    is_member = np.concatenate([np.ones(n_members, bool), np.zeros(n_members, bool)])
    trainer = TRAINER_FUNCTIONS[opts.trainer]
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    for dp in (False, True):
        arm = f"with DP (ε = {opts.dp_epsilon:g})" if dp else "without DP"
        say(f"membership · target model {arm}")
        target = trainer(opts, ds, dp=dp, seed=opts.seed, members=members)
        scores = loss_threshold_scores(example_losses(target.model, cand_x, cand_y))
        eps = target.dp["epsilon"] if target.dp else None
        base = {
            "dp": dp,
            "epsilon": eps,
            "delta": target.dp["delta"] if target.dp else None,
            "target_epsilon": opts.dp_epsilon if dp else None,
            "members": n_members,
            "nonmembers": n_members,
            "test_accuracy": target.test_accuracy,
            "test_auc": target.test_auc,
            "train_seconds": target.seconds,
            "trainer": opts.trainer,
        }
        auc = attack_auc(scores[is_member], scores[~is_member])
        rows.append({**base, "attack": "loss-threshold", "auc": auc})
        curves[f"loss-threshold {arm}"] = (scores, is_member)
        if opts.shadows > 0:
            phis = []
            for s in range(opts.shadows):
                say(f"membership · shadow model {s + 1}/{opts.shadows} {arm}")
                pick = np.random.default_rng([opts.seed, s, int(dp)]).choice(
                    len(pool_y), n_members, replace=False
                )
                shadow = trainer(
                    opts,
                    ds,
                    dp=dp,
                    seed=opts.seed + 1000 + s,
                    members=_subset_xy(pool_x[pick], pool_y[pick]),
                )
                phis.append(logit_confidence(shadow.model, cand_x, cand_y))
            lira = lira_offline_scores(
                logit_confidence(target.model, cand_x, cand_y), np.stack(phis)
            )
            auc = attack_auc(lira[is_member], lira[~is_member])
            rows.append({**base, "attack": f"lira-offline ({opts.shadows} shadows)", "auc": auc})
            curves[f"LiRA {arm}"] = (lira, is_member)
    return rows, curves


def _subset_xy(x: NDArray[Any], y: NDArray[Any]) -> Any:
    from fedcrypt.tasks.data import Split

    return Split(np.ascontiguousarray(x), np.ascontiguousarray(y))


# -- the whole bench ----------------------------------------------------------------------


def judge(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the two claims: plain PSNR ≥ 5 dB above every protected mode (per batch
    size), and membership AUC with DP not above the AUC without DP (per attack)."""
    checks: list[dict[str, Any]] = []
    inv = payload.get("gradient_inversion", [])
    for b in sorted({r["images"] for r in inv}):
        rows = {r["protection"]: r["psnr"] for r in inv if r["images"] == b}
        if "plain" in rows:
            worst = max(v for k, v in rows.items() if k != "plain")
            checks.append(
                {
                    "claim": f"inversion PSNR plain - best protected >= 5 dB ({b} image(s))",
                    "value": rows["plain"] - worst,
                    "ok": rows["plain"] - worst >= 5.0,
                }
            )
    mia = payload.get("membership_inference", [])
    for attack in sorted({r["attack"] for r in mia}):
        by = {r["dp"]: r["auc"] for r in mia if r["attack"] == attack}
        if True in by and False in by:
            checks.append(
                {
                    "claim": f"membership AUC with DP <= without DP ({attack})",
                    "value": by[True] - by[False],
                    "ok": by[True] <= by[False],
                }
            )
    return checks


def run_privacy(out: Path, *, options: Options, log: Log | None = None) -> dict[str, Any]:
    """Run the bench; write ``privacy.json``, ``privacy-inversion.png`` and
    ``privacy-membership.png`` to ``out``.

    Returns
    -------
    dict
        Everything written to ``privacy.json`` (plus ``png``: the figure paths).

    Raises
    ------
    ConfigError
        For invalid options or a DP target that cannot be met.
    fedcrypt.exceptions.DataError
        If the dataset file is missing.
    """
    from fedcrypt.privacy.capabilities import capability_rows
    from fedcrypt.training.dp import plan_sample_dp

    options.check()
    # refuse an unreachable DP target before any work
    plan_sample_dp(
        epsilon=options.dp_epsilon,
        delta=options.dp_delta,
        max_grad_norm=options.dp_max_grad_norm,
        num_train=options.examples_per_hospital,
        batch_size=options.batch_size,
        rounds=options.rounds,
        local_epochs=options.local_epochs,
    )
    say: Log = log or (lambda _m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and fair on shared CPUs
    try:
        inv_rows, images = inversion_bench(options, say)
        mia_rows, curves = membership_bench(options, say)
    finally:
        torch.set_num_threads(threads)
    payload: dict[str, Any] = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "gradient_inversion": inv_rows,
        "membership_inference": mia_rows,
        "capabilities": capability_rows(),
        "threat_model": "DESIGN.md §2",
        "sources": {
            "gradient_inversion": "Geiping et al., Inverting Gradients, NeurIPS 2020",
            "inversion_model": "Zhu et al., Deep Leakage from Gradients, NeurIPS 2019",
            "loss_threshold": "Yeom et al., CSF 2018",
            "lira": "Carlini et al., Membership Inference Attacks From First Principles, S&P 2022",
            "dp_sgd": "Abadi et al., CCS 2016 (Opacus)",
        },
    }
    payload["checks"] = judge(payload)
    payload["seconds"] = time.perf_counter() - t0
    payload["png"] = [str(p) for p in _plots(images, curves, out)]
    (out / "privacy.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    return payload


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _plots(images: dict[str, Any], curves: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    paths: list[Path] = []
    cols = ["truth", *INVERSION_MODES]
    n_rows = sum(int(b) for b in images)
    fig, axes = plt.subplots(
        n_rows, len(cols), figsize=(1.8 * len(cols), 1.9 * n_rows), squeeze=False
    )
    r = 0
    for b, group in images.items():
        for i in range(int(b)):
            for j, col in enumerate(cols):
                ax = axes[r][j]
                ax.imshow(group[col][i, 0], cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("true image" if col == "truth" else f"server, {col}", fontsize=9)
                if j == 0 and i == 0:
                    ax.set_ylabel(f"{b} image{'s' if int(b) > 1 else ''}\nper update", fontsize=8)
            r += 1
    fig.suptitle("Gradient inversion by the server", fontsize=10)
    fig.tight_layout()
    path = out / "privacy-inversion.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for label, (scores, member) in curves.items():
        fpr, tpr, _ = roc_curve(member.astype(int), scores)
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Membership inference on the global model", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "privacy-membership.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def render(payload: dict[str, Any], console: Any) -> None:
    """Print the bench's tables (rich) from ``payload``."""
    from rich.table import Table

    inv = Table(title="Gradient inversion by the server (higher PSNR/SSIM = closer copy)")
    for col in ("protection", "images", "PSNR dB", "SSIM", "bytes received", "server's reading"):
        inv.add_column(
            col, justify="left" if col in ("protection", "server's reading") else "right"
        )
    for row in payload["gradient_inversion"]:
        inv.add_row(
            row["protection"],
            str(row["images"]),
            f"{row['psnr']:.1f}",
            f"{row['ssim']:.3f}",
            f"{row['received_bytes']:,}",
            row["server_reading"],
        )
    console.print(inv)
    mia = Table(title="Membership inference on the final global model (AUC 0.5 = no leak)")
    for col in ("attack", "DP", "ε spent", "δ", "attack AUC", "test accuracy", "test AUC"):
        mia.add_column(col, justify="left" if col == "attack" else "right")
    for row in payload["membership_inference"]:
        mia.add_row(
            row["attack"],
            "yes" if row["dp"] else "no",
            "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}",
            "-" if row["delta"] is None else f"{row['delta']:g}",
            f"{row['auc']:.3f}",
            f"{row['test_accuracy']:.3f}",
            "-"
            if row["test_auc"] is None or math.isnan(row["test_auc"])
            else f"{row['test_auc']:.3f}",
        )
    console.print(mia)
    cap = Table(title="Who can compute what (DESIGN.md §2)")
    for col in (
        "mode",
        "party",
        "another hospital's update",
        "aggregate / global model",
        "membership",
    ):
        cap.add_column(col)
    for row in payload["capabilities"]:
        cap.add_row(
            row["mode"], row["party"], row["individual_update"], row["aggregate"], row["membership"]
        )
    console.print(cap)
    for check in payload.get("checks", []):
        mark = "[green]ok[/green]" if check["ok"] else "[red]FAILED[/red]"
        console.print(f"{mark}  {check['claim']}: {check['value']:+.3f}")
