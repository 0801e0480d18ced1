"""LocalSite: the one hospital-side unit (model, data, train, evaluate, protect/unprotect).

Every place a hospital acts goes through it: the Flower ClientApp (``he``/``plain``), the
secagg ClientApp, the portal's participate loop and the benches. It is the only place
where a secret key and unprotected weights meet, and it holds the one seed formula.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError, FedcryptError, ProtocolError, TaskError
from fedcrypt.protection.base import AggregateResult, HospitalProtection
from fedcrypt.protection.flatten import Layout, flatten, unflatten
from fedcrypt.task import HospitalDatasets, Task, TaskInfo, TrainSettings, inspect_task, load_task
from fedcrypt.training import EvalResult, evaluate, train
from fedcrypt.training.metrics import auc, auc_per_label, confusion, roc_curve_points

log = logging.getLogger(__name__)

#: Learning rate when neither the run nor the task names one.
FALLBACK_LR = 1e-3
#: Batch size of evaluation loaders.
EVAL_BATCH = 256


def task_for(config: RunConfig) -> Task:
    """The run's task: ``config.task`` loaded by reference, or the built-in one.

    Raises
    ------
    fedcrypt.exceptions.TaskError
        If the reference cannot be loaded.
    fedcrypt.exceptions.DataError, fedcrypt.exceptions.ConfigError
        If the built-in dataset or model cannot be made.
    """
    if config.task:
        return load_task(config.task)
    from fedcrypt.tasks.builtin import builtin_task

    return builtin_task(
        dataset=config.dataset,
        data_dir=config.data_dir,
        model=config.model,
        partition=config.partition,
        alpha=config.alpha,
        val_fraction=config.val_fraction,
        width_mult=config.width_mult,
        weights=config.weights,
        seed=config.seed,
        image_size=config.image_size,
    )


def round_seed(config: RunConfig, *, server_round: int, hospital: int) -> int:
    """The training seed of one hospital's round: the one formula every path uses.

    It depends only on the run seed, the round and the hospital, so every protection
    mode trains identically from identical weights.
    """
    return config.seed * 100_003 + server_round * 1_009 + hospital


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA if available, else the CPU; ``cuda`` without a GPU is refused.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If ``cuda`` is asked for and no CUDA device is available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available on this machine")
    return torch.device(device)


def build_model(task: Task, *, seed: int, dp: bool = False) -> torch.nn.Module:
    """The task's model, seeded so every party builds identical initial weights.

    With ``dp``, the model is made Opacus-compatible (BatchNorm -> GroupNorm, no in-place
    activations; :func:`fedcrypt.training.dp.dp_compatible`), identically at every party.

    Raises
    ------
    fedcrypt.exceptions.TaskError
        If the factory fails or returns something other than an ``nn.Module``.
    """
    torch.manual_seed(seed)
    try:
        model = task.model()
    except FedcryptError:
        raise
    except Exception as exc:
        raise TaskError(f"task {task.name!r}: model() failed: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise TaskError(f"task {task.name!r}: model() did not return an nn.Module")
    if dp:
        from fedcrypt.training.dp import dp_compatible

        torch.manual_seed(seed)
        model = dp_compatible(model)
    return model


def sample_dp_plan(config: RunConfig, *, num_train: int) -> Any:
    """The DP-SGD plan of a hospital with ``num_train`` examples (None without DP).

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the requested ε cannot be met (or δ is too large for the data size).
    """
    if config.dp_epsilon is None:
        return None
    from fedcrypt.training.dp import default_delta, plan_sample_dp

    return plan_sample_dp(
        epsilon=config.dp_epsilon,
        delta=config.dp_delta or default_delta(num_train),
        max_grad_norm=config.dp_max_grad_norm,
        num_train=num_train,
        batch_size=config.batch_size,
        rounds=config.rounds,
        local_epochs=config.local_epochs,
    )


def weights_digest(vector: NDArray[np.floating]) -> str:
    """sha256 (hex, 16 chars) of a flat float64 weight vector (parties compare it)."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f8").tobytes()).hexdigest()[:16]


@dataclass
class LocalSite:
    """One hospital: its task's model and data, training, evaluation and protection.

    Parameters
    ----------
    task : Task
        The consortium's task.
    config : RunConfig
        The run (``lr`` None falls back to the task's, then 1e-3).
    hospital : int
        This hospital's index, ``0 <= hospital < num_hospitals``.
    num_hospitals : int
        Hospitals in the consortium (the task's data is split among them).
    protection : HospitalProtection, optional
        This hospital's half of a single-message protection scheme (``plain``/``he``);
        None for staged schemes (secagg protects with its own protocol object).
    output_dir : Path, optional
        Where the final global model is saved (``model.pt``).

    Raises
    ------
    fedcrypt.exceptions.ProtocolError
        If ``hospital`` is out of range.
    fedcrypt.exceptions.TaskError
        If the task's model or datasets cannot be built.
    """

    task: Task
    config: RunConfig
    hospital: int
    num_hospitals: int
    protection: HospitalProtection | None = None
    output_dir: Path | None = None
    info: TaskInfo = field(init=False)
    model: torch.nn.Module = field(init=False)
    layout: Layout = field(init=False)
    data: HospitalDatasets = field(init=False)
    initial: NDArray[np.float64] = field(init=False, repr=False)
    device: torch.device = field(init=False)
    dp_plan: Any = field(init=False, default=None)
    _loaders: dict[str, DataLoader[Any]] = field(init=False, repr=False)
    _cache: tuple[str, AggregateResult] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.hospital < self.num_hospitals:
            raise ProtocolError(f"hospital {self.hospital} is outside 0..{self.num_hospitals - 1}")
        cfg = self.config
        self.device = resolve_device(cfg.device)
        if cfg.dp_epsilon is not None and self.task.train is not None:
            raise ConfigError(
                f"task {self.task.name!r} brings its own train(): DP-SGD (--dp-epsilon) needs "
                "the built-in training loop"
            )
        self.model = build_model(self.task, seed=cfg.seed, dp=cfg.dp_epsilon is not None)
        self.layout = Layout.of(self.model.state_dict())
        self.initial = flatten(self.model.state_dict())
        try:
            self.data = self.task.datasets(self.hospital, self.num_hospitals, cfg.seed)
        except FedcryptError:
            raise
        except Exception as exc:
            raise TaskError(f"task {self.task.name!r}: datasets() failed: {exc}") from None
        self.info = inspect_task(
            self.task,
            num_hospitals=self.num_hospitals,
            seed=cfg.seed,
            hospital=self.hospital,
            model=self.model,
            data=self.data,
        )
        self.model.to(self.device)
        self.dp_plan = sample_dp_plan(cfg, num_train=self.num_train)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.hospital)
        self._loaders = {
            "train": DataLoader(
                self.data.train, batch_size=cfg.batch_size, shuffle=True, generator=generator
            )
        }
        for split in ("val", "test"):
            ds = getattr(self.data, split)
            if ds is not None and len(ds) > 0:
                self._loaders[split] = DataLoader(ds, batch_size=EVAL_BATCH, shuffle=False)

    # -- facts --------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        """Training examples: this hospital's FedAvg weight."""
        return len(self.data.train)  # type: ignore[arg-type]

    @property
    def lr(self) -> float:
        """The learning rate this site trains with."""
        return self.config.lr or self.task.lr or FALLBACK_LR

    def round_seed(self, server_round: int) -> int:
        """See :func:`round_seed`."""
        return round_seed(self.config, server_round=server_round, hospital=self.hospital)

    def begin_round(self, server_round: int) -> None:
        """Bind the protection to this run and round (a no-op for schemes without it).

        HE updates carry the run and round inside the ciphertext (so a replayed or
        out-of-order aggregate is refused), and their stochastic rounding is seeded by
        the run seed, the round and this hospital (so a run repeats exactly, and the
        server, without the secret key, still cannot predict it).
        """
        setter = getattr(self.protection, "set_round", None)
        if setter is not None:
            setter(
                self.config.run_id or "run",
                int(server_round),
                hospital=str(self.hospital),
                seed=self.config.seed,
            )

    # -- weights ------------------------------------------------------------------------
    def weights(self) -> NDArray[np.float64]:
        """The model's current weights, flat, shape ``(P,)``, float64."""
        return flatten(self.model.state_dict())

    def load(self, vector: NDArray[np.floating]) -> None:
        """Load a flat weight vector of shape ``(P,)`` into the model.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError
            If the vector does not have this model's ``P`` values (or is not finite).
        """
        if vector.shape != (self.layout.size,):
            raise ProtocolError(
                f"global model has {vector.size} values, this hospital's model has "
                f"{self.layout.size}: the parties disagree on the model"
            )
        if not np.all(np.isfinite(vector)):
            raise ProtocolError("the global model holds NaN or infinite values")
        state = unflatten(vector, self.layout)
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()})

    # -- one round, on plain weights ------------------------------------------------------
    def train_round(
        self, vector: NDArray[np.floating], *, server_round: int
    ) -> tuple[NDArray[np.float64], dict[str, float]]:
        """Load ``vector`` (shape ``(P,)``), train on local data, return the new weights.

        Returns
        -------
        weights : numpy.ndarray
            The locally trained weights, shape ``(P,)``, float64.
        metrics : dict
            ``num-examples``, ``train-loss`` and ``train-seconds`` (seconds).
        """
        self.load(vector)
        cfg = self.config
        seed = self.round_seed(server_round)
        loader = self._loaders["train"]
        dp: Any = None
        t0 = time.perf_counter()
        if self.task.train is not None:
            settings = TrainSettings(
                epochs=cfg.local_epochs,
                lr=self.lr,
                batch_size=cfg.batch_size,
                weight_decay=cfg.weight_decay,
                class_weight=cfg.class_weight,
                seed=seed,
                device=self.device.type,
            )
            torch.manual_seed(seed)
            loss = float(self.task.train(self.model, loader, settings))
        else:
            extra: dict[str, Any] = {}
            if self.dp_plan is not None:
                from fedcrypt.training.dp import SampleDP

                # an upper bound: as if this hospital trained in every earlier round
                dp = SampleDP(self.dp_plan, rounds_done=server_round - 1)
                extra["wrap"] = dp.wrap
            loss = train(
                self.model,
                loader,
                epochs=cfg.local_epochs,
                lr=self.lr,
                weight_decay=cfg.weight_decay,
                class_weight=cfg.class_weight,
                seed=seed,
                label_kind=self.info.label_kind,
                loss_fn=self.task.loss,
                **extra,
            ).loss
            if dp is not None:
                dp.end_round()
        seconds = time.perf_counter() - t0
        metrics = {
            "num-examples": float(self.num_train),
            "train-loss": loss,
            "train-seconds": seconds,
        }
        if dp is not None:
            metrics["dp-epsilon"] = dp.epsilon
            metrics["dp-delta"] = float(self.dp_plan.delta)
        return self.weights(), metrics

    def _evaluate_split(self, split: str, *, threshold: float = 0.5) -> EvalResult | None:
        loader = self._loaders.get(split)
        if loader is None:
            return None
        kind = self.info.label_kind
        if self.task.evaluate is not None:
            try:
                y_true, y_score, loss = self.task.evaluate(self.model, loader)
            except FedcryptError:
                raise
            except Exception as exc:
                raise TaskError(f"task {self.task.name!r}: evaluate() failed: {exc}") from None
            return result_from_scores(
                np.asarray(y_true), np.asarray(y_score, dtype=np.float64), float(loss),
                label_kind=kind, threshold=threshold,
            )  # fmt: skip
        return evaluate(
            self.model, loader, label_kind=kind, loss_fn=self.task.loss, threshold=threshold
        )

    def evaluate(
        self, vector: NDArray[np.floating], *, final: bool = False
    ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Load ``vector`` (shape ``(P,)``) and evaluate it on validation and test data.

        Clinical figures of a binary task: confusion counts, sensitivity, specificity and
        balanced accuracy at 0.5 and, with a validation split, at the Youden threshold
        chosen on it (applied to test: ``*_youden``). Multi-label and multi-class tasks
        report per-label (per-class) ROC AUCs (``auc_0`` ...) and their macro average as
        ``auc``. On the final round the test ROC curve (micro-averaged for more than two
        classes or labels) is returned and, with an ``output_dir``, the model is saved
        there as ``model.pt`` (a CPU ``state_dict``).

        Returns
        -------
        metrics : dict
            ``val-<figure>`` and ``test-<figure>`` (:meth:`EvalResult.metrics`), with
            ``<split>-examples``.
        curves : dict
            On the final round, ``roc-fpr``/``roc-tpr`` of the test split; else empty.
        """
        self.load(vector)
        metrics: dict[str, float] = {}
        curves: dict[str, list[float]] = {}
        youden: float | None = None
        val = self._evaluate_split("val")
        if val is not None:
            if val.label_kind == "binary":
                youden = val.youden_threshold()
            metrics.update({f"val-{k}": v for k, v in val.metrics().items()})
        test = self._evaluate_split("test")
        if test is not None:
            metrics.update({f"test-{k}": v for k, v in test.metrics(youden=youden).items()})
            if final and not math.isnan(test.auc):
                try:
                    fpr, tpr = roc_curve_points(test.y_true, test.y_score)
                    curves = {"roc-fpr": fpr.tolist(), "roc-tpr": tpr.tolist()}
                except ValueError:
                    curves = {}
        if final and self.output_dir is not None:
            self.save(self.output_dir / "model.pt")
        return metrics, curves

    def save(self, path: Path) -> Path:
        """Save the model's ``state_dict`` (on the CPU) to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)
        return path

    # -- protection -------------------------------------------------------------------
    def _protection(self) -> HospitalProtection:
        if self.protection is None:
            raise ProtocolError("this site has no single-message protection scheme")
        return self.protection

    def protect(self, vector: NDArray[np.floating]) -> tuple[bytes, float]:
        """Protect ``num_train * vector`` for the server: ``(bytes, seconds)``."""
        t0 = time.perf_counter()
        blob = self._protection().protect(vector, num_examples=self.num_train)
        return blob, time.perf_counter() - t0

    def unprotect(self, blob: bytes) -> tuple[AggregateResult, float]:
        """Unprotect an aggregate, at most once per distinct aggregate: ``(result, s)``.

        Raises
        ------
        fedcrypt.exceptions.ProtocolError, fedcrypt.exceptions.DecryptionError
            If the aggregate is malformed or does not decrypt with this hospital's key.
        """
        digest = hashlib.sha256(blob).hexdigest()
        if self._cache is not None and self._cache[0] == digest:
            return self._cache[1], 0.0
        t0 = time.perf_counter()
        result = self._protection().unprotect(blob)
        seconds = time.perf_counter() - t0
        self._cache = (digest, result)
        return result, seconds

    def reference_examples(self, result: AggregateResult) -> int:
        """The example count a quantizing scheme calibrates its next grid on after
        ``result`` (its own total otherwise): what :meth:`adopt` restores."""
        value = getattr(self.protection, "reference_examples", None)
        return value if isinstance(value, int) else result.total_examples

    def adopt(self, digest: str, result: AggregateResult) -> None:
        """Take an aggregate this hospital unprotected earlier (another process, a restart)
        as if :meth:`unprotect` had just returned it: no second decryption.

        Quantizing schemes calibrate their next grid on it (``set_reference``).
        """
        if self._cache is not None and self._cache[0] == digest:
            return
        self._cache = (digest, result)
        setter = getattr(self.protection, "set_reference", None)
        if setter is not None:
            setter(result.mean, total_examples=result.total_examples)


def result_from_scores(
    y_true: NDArray[Any],
    y_score: NDArray[np.float64],
    loss: float,
    *,
    label_kind: str,
    threshold: float = 0.5,
) -> EvalResult:
    """An :class:`EvalResult` from a task's own ``evaluate`` (labels, scores, loss).

    Raises
    ------
    fedcrypt.exceptions.TaskError
        If the shapes do not fit the task's label kind.
    """
    try:
        if label_kind == "multilabel":
            yt = y_true.astype(np.int64)
            acc = float(((y_score >= 0.5) == (yt == 1)).mean())
            per = tuple(float(v) for v in auc_per_label(yt, y_score))
            conf = None
        else:
            yt = y_true.reshape(-1).astype(np.int64)
            pred = (
                (y_score >= threshold).astype(np.int64) if y_score.ndim == 1 else y_score.argmax(1)
            )
            acc = float((pred == yt).mean())
            per = ()
            conf = confusion(yt, y_score, threshold=threshold) if label_kind == "binary" else None
        value = auc(yt, y_score)
    except ValueError as exc:
        raise TaskError(f"evaluate() returned scores that do not fit the labels: {exc}") from None
    return EvalResult(
        loss=loss,
        accuracy=acc,
        auc=value,
        num_examples=int(yt.shape[0]),
        y_true=yt,
        y_score=y_score,
        label_kind=label_kind,  # type: ignore[arg-type]
        auc_per_label=per or (value,),
        balanced_accuracy=conf.balanced_accuracy if conf is not None else math.nan,
        threshold=threshold,
        confusion=conf,
    )
