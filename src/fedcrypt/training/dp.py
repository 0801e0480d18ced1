"""Differential privacy at the hospitals: sample-level DP-SGD and client-level noise.

Two mechanisms, both applied *at the hospitals* (the server never adds noise, so it
composes with every protection mode):

* **Sample-level DP-SGD** (Abadi et al., "Deep Learning with Differential Privacy",
  CCS 2016) with Opacus: per-example gradient clipping to ``max_grad_norm``, Gaussian
  noise on every step, Poisson sampling of batches. :func:`plan_sample_dp` calibrates the
  noise multiplier so that the target ε is reached after *all* rounds, with Opacus' RDP
  (Mironov et al., "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019)
  or PRV accountant (Gopi et al., "Numerical Composition of Differential Privacy", 2021).
  :class:`SampleDP` holds one hospital's accountant across rounds and provides the
  ``wrap(model, optimizer, loader)`` hook of :func:`fedcrypt.training.train`. The privacy
  unit is one training example (one patient image) of that hospital.

* **Client-level DP** (DP-FedAvg, McMahan et al., "Learning Differentially Private
  Recurrent Language Models", ICLR 2018): each hospital clips its update (the delta from
  the global model) to L2 norm ``C`` and adds its *share* of Gaussian noise, so that the
  sum of the ``m`` shares in an aggregate is ``N(0, σ²Δ²)`` while each hospital adds only
  ``N(0, σ²Δ²/m)`` (distributed Gaussian noise; under ``secagg`` and ``he`` the server only
  sees the noisy sum). Two mechanisms (:data:`CLIENT_MECHANISMS`):

  - ``"gaussian"``: continuous shares; the sum is exactly Gaussian (the sum of
    independent Gaussians), ``Δ = C``. Accounting: the RDP of the (Poisson-subsampled,
    rate ``q``) Gaussian mechanism over the rounds, as Opacus computes it.
  - ``"discrete-gaussian"``: the distributed discrete Gaussian of Kairouz, Liu, Steinke,
    "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
    Aggregation", ICML 2021, for protections that sum *integers* (``secagg``'s fixed
    point in Z_(2^32)): the clipped delta is scaled to a power-of-two grid ``γ``, rounded
    by conditional randomized rounding, and discrete Gaussian noise (Canonne, Kamath,
    Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020) is added on
    the grid, so the protection's quantization is exact and the server's integer sum is
    what the analysis covers. Accounting: their Theorem 1 (L2 sensitivity inflated by the
    rounding) with the RDP bound of their Proposition 14 (without the L1 term), composed
    over the rounds; client sampling is not supported with it (``q = 1``). The random
    rotation and modular clipping of their paper are not applied: the protection's
    modulus (2^32 with secagg's overflow bound) is far above the noisy values.

  The privacy unit is one hospital (its participation in a round, add/remove
  adjacency); a patient is covered a fortiori.

  **Trust assumption.** The noise in an aggregate is the sum of the honest hospitals'
  shares. Hospitals that collude with the server can tell it their own shares, which it
  then subtracts: with ``T`` colluders only ``m - T`` shares protect the others. Plans
  therefore take ``colluders`` (the ``T`` tolerated; each share is scaled up to
  ``σ²Δ²/(m - T)``) and ``min_aggregated`` (``m``: the fewest updates an aggregate may
  hold, e.g. secagg's threshold; fewer, after dropouts, means less noise, and
  :class:`ClientDPAccountant` then charges the round with the noise actually present).

Random numbers: noise comes from generators seeded with fresh secret bits
(:mod:`secrets`) unless a generator or seed is injected for tests. They are statistical
generators (PCG64, Mersenne Twister), not CSPRNGs, and floating-point noise is open to
the precision attacks of Mironov (CCS 2012); Opacus' full ``secure_mode`` needs
``torchcsprng``, which cannot be installed with torch 2.13. DP-SGD noise uses Opacus'
``secure_mode`` noise construction (several draws summed, Holohan & Braghin 2021).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader

from fedcrypt.exceptions import ConfigError

logger = logging.getLogger(__name__)

# Opacus' hooks make torch warn on every backward pass when the input does not require
# gradients (always true for data); the warning is about hook semantics, not privacy.
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed",
    category=UserWarning,
)

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""Opacus accountants for sample-level DP (``prv`` is tighter, ``rdp`` the classic)."""

CLIENT_MECHANISMS: tuple[str, ...] = ("gaussian", "discrete-gaussian")
"""Client-level noise: continuous (float protections) or discrete on a grid (integer ones)."""

MAX_NOISE_MULTIPLIER = 50.0
"""Default ceiling on a calibrated noise multiplier: above it the model learns nothing."""

EPSILON_TOLERANCE = 0.01
"""Calibration stops when the planned ε is within this much *below* the target."""

#: Rényi orders (α) for client-level accounting: Opacus' default grid.
RDP_ORDERS: tuple[float, ...] = (*(1 + x / 10.0 for x in range(1, 100)), *map(float, range(12, 64)))

#: The ``β`` of conditional randomized rounding (Kairouz et al. 2021, Theorem 1):
#: rounding is retried until the norm is below the bound, which fails with probability
#: at most ``β`` per attempt. ``exp(-0.5)`` as in their experiments.
DEFAULT_BETA = math.exp(-0.5)
_MAX_ROUNDING_TRIES = 1000


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return float(value)


def _count(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def default_delta(num_examples: int) -> float:
    """A conventional δ for a data set of ``num_examples`` records: a power of ten ≤ 1/(10 n).

    Parameters
    ----------
    num_examples : int
        Records protected (a hospital's training examples, or the number of hospitals for
        client-level DP), >= 1.

    Returns
    -------
    float
        ``10 ** -ceil(log10(10 n))``, e.g. 1e-4 for 546 examples.
    """
    n = _count("num_examples", num_examples)
    return float(10.0 ** -math.ceil(math.log10(10 * n)))


def _check_epsilon_delta(epsilon: object, delta: object, *, records: int, unit: str) -> None:
    _positive("dp epsilon", epsilon)
    d = _positive("dp delta", delta)
    if d >= 1.0 / records:
        raise ConfigError(
            f"dp delta {d:g} must be below 1/{records} = {1.0 / records:.3g} ({records} {unit}): "
            f"a larger δ allows releasing a whole record; try {default_delta(records):g}"
        )


# -- making a model Opacus-compatible ---------------------------------------------------


def dp_compatible(model: nn.Module) -> nn.Module:
    """Make ``model`` trainable with Opacus, deterministically (the same at every party).

    Opacus' ``ModuleValidator.fix`` replaces every BatchNorm by a GroupNorm with
    ``min(32, C)`` groups (BatchNorm mixes examples of a batch, so per-example gradients
    are undefined) with the default affine initialisation (weight 1, bias 0), and
    in-place activations are made out-of-place (Opacus' backward hooks cannot see
    through in-place views). No random numbers are drawn: two parties that build the
    same model with the same seed and call this get identical ``state_dict`` keys,
    shapes and values. Every hospital *and the server's initial model* must apply it,
    since the ``state_dict`` layout changes (BatchNorm running statistics disappear).

    Parameters
    ----------
    model : torch.nn.Module
        The model; may be modified in place.

    Returns
    -------
    torch.nn.Module
        The fixed model (possibly a new object; use the returned one).

    Raises
    ------
    ConfigError
        If the model still has layers Opacus cannot compute per-example gradients for.
    """
    from opacus.validators import ModuleValidator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about every replaced BatchNorm
        fixed: nn.Module = ModuleValidator.fix(model)
    for module in fixed.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # type: ignore[assignment]
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ConfigError(
            f"model cannot be trained with DP-SGD: {'; '.join(str(e) for e in errors[:3])}"
        )
    return fixed


# -- sample-level DP-SGD ----------------------------------------------------------------


def batches_per_epoch(num_train: int, batch_size: int) -> int:
    """``ceil(num_train / batch_size)``: optimizer steps per epoch (also under Poisson sampling)."""
    return math.ceil(_count("num_train", num_train) / _count("batch_size", batch_size))


@dataclass(frozen=True)
class SampleDPPlan:
    """A hospital's calibrated DP-SGD parameters for a whole run.

    Attributes
    ----------
    epsilon, delta : float
        The (ε, δ) target reached after ``rounds`` rounds.
    max_grad_norm : float
        ``C``: per-example gradients are clipped to this L2 norm.
    noise_multiplier : float
        ``σ``: each step adds ``N(0, σ²C²)`` to the sum of clipped gradients.
    sample_rate : float
        ``q``: Poisson inclusion probability of each example per step,
        ``1 / batches_per_epoch`` (Opacus' ``DPDataLoader``; ``batch_size / num_train``
        when the batch size divides the data size).
    steps_per_round : int
        ``local_epochs * batches_per_epoch``.
    rounds : int
        Rounds the budget covers.
    num_train, batch_size : int
        The data size and batch size the plan was made for (checked at each round).
    accountant : str
        ``"rdp"`` or ``"prv"``.
    """

    epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    num_train: int
    batch_size: int
    accountant: str

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all rounds."""
        return self.steps_per_round * self.rounds

    def epsilon_after(self, rounds: int) -> float:
        """ε spent after ``rounds`` full rounds, from the plan alone (no state needed).

        Every round takes exactly ``steps_per_round`` steps at rate ``sample_rate`` (a
        Poisson loader yields ``batches_per_epoch`` batches per epoch, empty or not), so
        a hospital process rebuilt between rounds (simulation workers, stateless
        deployments, ``--resume``) knows its ε from the number of rounds it trained.

        Raises
        ------
        ConfigError
            If ``rounds`` is negative.
        """
        r = _count("rounds", rounds, minimum=0)
        if r == 0:
            return 0.0
        return _sample_epsilon(
            self.noise_multiplier,
            self.sample_rate,
            r * self.steps_per_round,
            self.delta,
            self.accountant,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, for the run record."""
        return {"level": "sample", **asdict(self), "total_steps": self.total_steps}


def plan_sample_dp(
    *,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    num_train: int,
    batch_size: int,
    rounds: int,
    local_epochs: int,
    accountant: str = "rdp",
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> SampleDPPlan:
    """Calibrate DP-SGD so that ``epsilon`` is spent exactly over all rounds.

    ``steps = rounds * local_epochs * ceil(num_train / batch_size)`` at sample rate
    ``q = 1 / ceil(num_train / batch_size)``; the noise multiplier is the smallest (within
    :data:`EPSILON_TOLERANCE` in ε) for which the accountant reports ε ≤ ``epsilon`` at
    ``delta`` after all steps (``opacus.accountants.utils.get_noise_multiplier``). Call it
    before the first round, at every hospital (and at the server for every hospital's
    size, to refuse a run up front).

    Parameters
    ----------
    epsilon : float
        Target ε over the whole run (> 0).
    delta : float
        Target δ, in ``(0, 1 / num_train)``.
    max_grad_norm : float
        ``C`` (> 0).
    num_train : int
        The hospital's training examples (>= 1).
    batch_size : int
        Expected batch size (>= 1).
    rounds, local_epochs : int
        Rounds of the run and local epochs per round (>= 1).
    accountant : {"rdp", "prv"}
        Opacus accountant (default: ``"rdp"``).
    max_noise_multiplier : float
        Refuse a plan needing more noise than this (default: :data:`MAX_NOISE_MULTIPLIER`).

    Returns
    -------
    SampleDPPlan

    Raises
    ------
    ConfigError
        If an argument is out of range, ``delta >= 1 / num_train``, or ``epsilon`` cannot
        be met with a noise multiplier up to ``max_noise_multiplier`` (ε too small, or too
        many steps).
    """
    n = _count("num_train", num_train)
    b = _count("batch_size", batch_size)
    r = _count("rounds", rounds)
    e = _count("local_epochs", local_epochs)
    c = _positive("dp max_grad_norm", max_grad_norm)
    cap = _positive("max_noise_multiplier", max_noise_multiplier)
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    _check_epsilon_delta(epsilon, delta, records=n, unit="training examples")
    per_epoch = batches_per_epoch(n, b)
    q = 1.0 / per_epoch
    steps = r * e * per_epoch
    what = f"ε = {epsilon:g} at δ = {delta:g} over {steps} DP-SGD steps (sample rate {q:.3g})"
    # one evaluation at the ceiling refuses an unreachable target at once (Opacus' search
    # would double σ up to 1e6 first: minutes of RDP evaluations)
    try:
        eps_at_cap = _sample_epsilon(cap, q, steps, float(delta), accountant)
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise ConfigError(f"cannot account for {what}: {exc}") from None
    if not eps_at_cap <= float(epsilon):
        raise ConfigError(
            f"cannot reach {what}: even noise multiplier {cap:g} (more noise than a model can "
            f"learn through) gives ε = {eps_at_cap:.3g}; raise ε or δ, or use fewer rounds, "
            "local epochs or larger batches"
        )
    try:
        sigma = _calibrate_sample(float(epsilon), float(delta), q, steps, accountant)
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise ConfigError(f"cannot reach {what}: {exc}") from None
    if not (math.isfinite(sigma) and sigma <= cap):
        raise ConfigError(
            f"cannot reach {what} with useful noise: it needs noise multiplier {sigma:.3g} "
            f"(> {cap:g}, the model would learn nothing); raise ε or δ, or use fewer rounds, "
            "local epochs or larger batches"
        )
    return SampleDPPlan(
        epsilon=float(epsilon),
        delta=float(delta),
        max_grad_norm=c,
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=e * per_epoch,
        rounds=r,
        num_train=n,
        batch_size=b,
        accountant=accountant,
    )


def _sample_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acct = create_accountant(mechanism=accountant)
    acct.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acct.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _calibrate_sample(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """``opacus.accountants.utils.get_noise_multiplier`` (cached: hospitals of equal size
    share one calibration, which takes seconds)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP warns when the best order is at the edge
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )


def _search_sigma(
    eps_of: Any, *, target: float, cap: float, what: str, tolerance: float = EPSILON_TOLERANCE
) -> float:
    """Smallest σ ≤ ``cap`` with ``eps_of(σ) <= target`` (to ``tolerance`` in ε), by bisection.

    The bisection of ``opacus.accountants.utils.get_noise_multiplier``, over an accountant
    it does not know (client-level RDP), with a ceiling and a :class:`ConfigError`.
    """
    try:
        eps_cap = eps_of(cap)
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise ConfigError(f"cannot account for {what}: {exc}") from None
    if not (math.isfinite(eps_cap) and eps_cap <= target):
        raise ConfigError(
            f"cannot reach {what}: even noise multiplier {cap:g} gives ε = {eps_cap:.3g}; "
            "raise ε or δ, or use fewer rounds, epochs or steps"
        )
    lo, hi, eps_hi = 0.0, cap, eps_cap
    while target - eps_hi > tolerance and hi - lo > 1e-6:
        mid = (lo + hi) / 2
        try:
            eps = eps_of(mid)
        except (ValueError, ArithmeticError, RuntimeError):
            eps = math.inf
        if math.isfinite(eps) and eps <= target:
            hi, eps_hi = mid, eps
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class DPRecord:
    """ε spent so far by one accountant, for the run record (``metrics.json``).

    Attributes
    ----------
    level : {"sample", "client"}
        What the guarantee protects: one training example, or one hospital.
    mechanism : str
        ``"dp-sgd"``, ``"gaussian"`` or ``"discrete-gaussian"``.
    epsilon : float
        ε spent so far (0 before any step).
    delta : float
        The δ at which ``epsilon`` is stated.
    noise_multiplier : float
        ``σ`` of the plan.
    steps : int
        Mechanism invocations so far (DP-SGD steps, or rounds for client-level).
    target_epsilon : float
        The ε the plan was calibrated to reach at the end of the run.
    """

    level: Literal["sample", "client"]
    mechanism: str
    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    target_epsilon: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


class SampleDP:
    """One hospital's DP-SGD across all rounds: the ``wrap`` hook and its accountant.

    Create it once per hospital, before the first round, from a :class:`SampleDPPlan`;
    pass :meth:`wrap` as ``fedcrypt.training.train(..., wrap=dp.wrap)`` every round, and
    read :meth:`record` afterwards. The Opacus accountant inside persists across rounds.

    Parameters
    ----------
    plan : SampleDPPlan
        From :func:`plan_sample_dp` for this hospital's data size.
    rounds_done : int
        Rounds this hospital already trained under the plan (default: 0). A hospital
        object rebuilt between rounds (a simulation worker, a resumed run) passes the
        rounds it trained so the accountant, and the refusal of rounds beyond the
        budget, continue where they were.
    seed : int, optional
        Seed of the noise and Poisson-sampling generators, for tests only. ``None``
        (default): 64 fresh secret bits from :mod:`secrets` per round.

    Notes
    -----
    :meth:`wrap` calls Opacus' ``PrivacyEngine.make_private`` with Poisson sampling:
    the returned model computes per-example gradients (a ``GradSampleModule`` sharing the
    given model's parameters), the optimizer clips and adds noise, and the loader samples
    each example with probability ``q`` per step from a secretly seeded generator (so the
    server cannot know the batches, which the amplification by subsampling assumes).
    The loss must be the batch *mean* (as :func:`fedcrypt.training.train` computes it).
    Under Poisson sampling an epoch's example count varies: use the data size, not the
    count of one pass, as the FedAvg weight.
    """

    def __init__(
        self, plan: SampleDPPlan, *, rounds_done: int = 0, seed: int | None = None
    ) -> None:
        from opacus import PrivacyEngine

        if not isinstance(plan, SampleDPPlan):
            raise TypeError(f"plan must be a SampleDPPlan, got {type(plan).__name__}")
        done = _count("rounds_done", rounds_done, minimum=0)
        self.plan = plan
        self._seed = seed
        self._wraps = 0
        self._module: Any = None
        self._eps_cache: tuple[tuple[Any, ...], float] | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Secure RNG turned off" (see module docstring)
            self._engine = PrivacyEngine(accountant=plan.accountant)
        if done:
            self._engine.accountant.history.append(
                (plan.noise_multiplier, plan.sample_rate, done * plan.steps_per_round)
            )

    def _generator(self, salt: int) -> torch.Generator:
        seed = secrets.randbits(64) if self._seed is None else self._seed * 1_000_003 + salt
        return torch.Generator().manual_seed(seed)

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader[Any],
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any]]:
        """Make one round's training differentially private (the ``train(wrap=...)`` hook).

        Parameters
        ----------
        model : torch.nn.Module
            Opacus-compatible (see :func:`dp_compatible`).
        optimizer : torch.optim.Optimizer
            Over ``model.parameters()``.
        loader : torch.utils.data.DataLoader
            Over the hospital's ``num_train`` examples with ``batch_size`` of the plan;
            map-style dataset.

        Returns
        -------
        (model, optimizer, loader)
            To train with instead of the arguments.

        Raises
        ------
        ConfigError
            If the loader does not match the plan (other data size or batch size: the
            accounting would be wrong), the model is not Opacus-compatible, or the plan's
            steps are already spent.
        """
        from opacus.validators import ModuleValidator

        self.end_round()
        size = len(loader.dataset)  # type: ignore[arg-type]
        if size != self.plan.num_train or loader.batch_size != self.plan.batch_size:
            raise ConfigError(
                f"DP plan was made for {self.plan.num_train} examples in batches of "
                f"{self.plan.batch_size}, got {size} in batches of {loader.batch_size}"
            )
        if self.steps >= self.plan.total_steps:
            raise ConfigError(
                f"the DP budget ε = {self.plan.epsilon:g} is spent: {self.steps} of "
                f"{self.plan.total_steps} planned steps taken; no further round may train"
            )
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ConfigError(
                "model is not Opacus-compatible (apply fedcrypt.training.dp.dp_compatible "
                f"at every party): {errors[0]}"
            )
        self._wraps += 1
        # the same dataset in a loader with a secret generator for Poisson sampling
        secret_loader: DataLoader[Any] = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            collate_fn=loader.collate_fn,
            generator=self._generator(2 * self._wraps),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, dp_optimizer, dp_loader = self._engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=secret_loader,
                noise_multiplier=self.plan.noise_multiplier,
                max_grad_norm=self.plan.max_grad_norm,
                poisson_sampling=True,
                noise_generator=self._generator(2 * self._wraps + 1),
            )
        q = 1.0 / len(dp_loader)
        if not math.isclose(q, self.plan.sample_rate, rel_tol=1e-9):
            raise ConfigError(
                f"Opacus samples at rate {q:.6g}, the plan assumed {self.plan.sample_rate:.6g}"
            )
        # Opacus' "secure_mode" noise construction (the sum of several draws) against
        # floating-point attacks; it only needs the generator passed above
        dp_optimizer.secure_mode = True
        self._module = module
        return module, dp_optimizer, dp_loader

    def end_round(self) -> None:
        """Remove the per-example-gradient hooks from the last wrapped model (idempotent).

        Called by :meth:`wrap` before wrapping again; call it after a round if the model
        is used for anything else (evaluation works with the hooks in place).
        """
        if self._module is not None:
            self._module._close()
            self._module = None

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far, over all rounds."""
        return int(sum(n for _, _, n in self._engine.accountant.history))

    @property
    def epsilon(self) -> float:
        """ε spent so far at the plan's δ (0.0 before the first step)."""
        history = tuple(self._engine.accountant.history)
        if not history:
            return 0.0
        if self._eps_cache is None or self._eps_cache[0] != history:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eps = float(self._engine.accountant.get_epsilon(delta=self.plan.delta))
            self._eps_cache = (history, eps)  # RDP over fractional orders takes ~0.5 s
        return self._eps_cache[1]

    def record(self) -> DPRecord:
        """ε spent so far, δ and the plan's parameters."""
        return DPRecord(
            level="sample",
            mechanism="dp-sgd",
            epsilon=self.epsilon,
            delta=self.plan.delta,
            noise_multiplier=self.plan.noise_multiplier,
            steps=self.steps,
            target_epsilon=self.plan.epsilon,
        )


# -- client-level DP --------------------------------------------------------------------


@dataclass(frozen=True)
class ClientDPPlan:
    """Calibrated client-level DP for a whole run (the same at every hospital).

    Attributes
    ----------
    epsilon, delta : float
        The (ε, δ) target after ``rounds`` rounds, per hospital (the privacy unit).
    max_norm : float
        ``C``: each hospital's update delta is clipped to this L2 norm.
    noise_multiplier : float
        ``σ``: the honest shares of one aggregate sum to noise of standard deviation
        ``σ Δ`` per coordinate.
    sensitivity : float
        ``Δ``: the L2 sensitivity of the sum, ``C`` for ``"gaussian"``; inflated by the
        randomized rounding for ``"discrete-gaussian"`` (Kairouz et al. 2021, Theorem 1).
    hospitals : int
        Hospitals invited per round.
    min_aggregated : int
        ``m``: the fewest updates an aggregate is expected to hold (secagg's threshold).
    colluders : int
        ``T``: hospitals that may reveal their shares to the server; each share carries
        ``σ²Δ²/(m - T)``.
    sample_rate : float
        ``q``: Poisson probability that a hospital takes part in a round (1: all).
    rounds : int
        Rounds the budget covers.
    mechanism : {"gaussian", "discrete-gaussian"}
    lattice : float or None
        ``γ``: the grid step of ``"discrete-gaussian"`` (a power of two: ``1 / scale`` of
        the protection's fixed point); ``None`` for ``"gaussian"``.
    dimension : int or None
        ``P``: values per update (needed by ``"discrete-gaussian"``).
    beta : float
        Conditional randomized rounding parameter (``"discrete-gaussian"``).
    """

    epsilon: float
    delta: float
    max_norm: float
    noise_multiplier: float
    sensitivity: float
    hospitals: int
    min_aggregated: int
    colluders: int
    sample_rate: float
    rounds: int
    mechanism: str
    lattice: float | None = None
    dimension: int | None = None
    beta: float = DEFAULT_BETA

    @property
    def honest_shares(self) -> int:
        """``m - T``: the shares whose noise the server cannot subtract."""
        return self.min_aggregated - self.colluders

    @property
    def total_std(self) -> float:
        """``σ Δ``: standard deviation of the honest noise in one aggregate (per value)."""
        return self.noise_multiplier * self.sensitivity

    @property
    def share_std(self) -> float:
        """``σ Δ / sqrt(m - T)``: standard deviation of each hospital's share (per value)."""
        return self.total_std / math.sqrt(self.honest_shares)

    @property
    def rounding_bound(self) -> float:
        """L2 bound on a rounded clipped delta (``Δ`` of Theorem 1; ``C`` when continuous)."""
        return self.sensitivity

    def value_bound(self, *, sigmas: float = 7.0) -> float:
        """A per-value bound on a noisy update: ``C + sigmas * share_std``.

        Configure the protection's clipping (secagg's ``clip``) at or above it, so the
        protection does not clip noise (exceeded with probability about
        ``P * 2.6e-12`` per update at 7 standard deviations).
        """
        return self.max_norm + sigmas * self.share_std

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, for the run record."""
        return {
            "level": "client",
            **asdict(self),
            "share_std": self.share_std,
            "total_std": self.total_std,
        }


def _lattice_tau(share_var_units: float, shares: int) -> float:
    """``τ`` of Kairouz et al. 2021, Theorem 1: ``10 Σ_{k=1}^{n-1} exp(-2π² s² k/(k+1))``.

    ``share_var_units`` is each share's variance in grid units (``(σ_share / γ)²``).
    """
    return 10.0 * sum(
        math.exp(-2.0 * math.pi**2 * share_var_units * k / (k + 1)) for k in range(1, shares)
    )


def rounded_sensitivity(max_norm: float, *, lattice: float, dimension: int, beta: float) -> float:
    """L2 sensitivity after conditional randomized rounding (Kairouz et al. 2021, Theorem 1).

    ``Δ² = min((C + γ√P)², C² + γ²P/4 + sqrt(2 ln(1/β)) γ (C + γ√P/2))``.

    Parameters
    ----------
    max_norm : float
        ``C``.
    lattice : float
        ``γ``.
    dimension : int
        ``P``.
    beta : float
        ``β`` in ``[0, 1)``; 0 means plain randomized rounding (the first term).
    """
    c, g, p = float(max_norm), float(lattice), float(dimension)
    first = (c + g * math.sqrt(p)) ** 2
    if beta <= 0:
        return math.sqrt(first)
    second = (
        c**2 + g**2 * p / 4 + math.sqrt(2 * math.log(1 / beta)) * g * (c + g * math.sqrt(p) / 2)
    )
    return math.sqrt(min(first, second))


def _client_rdp(plan_like: dict[str, Any], noise_multiplier: float, honest: int) -> NDArray[Any]:
    """RDP (per order of :data:`RDP_ORDERS`) of ONE round of the client-level mechanism.

    ``noise_multiplier`` is the honest noise std over ``Δ`` in that round, ``honest`` the
    number of honest shares it is made of (for ``τ``).
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.asarray(RDP_ORDERS, dtype=np.float64)
    if plan_like["mechanism"] == "gaussian":
        return np.asarray(
            compute_rdp(
                q=plan_like["sample_rate"],
                noise_multiplier=noise_multiplier,
                steps=1,
                orders=list(RDP_ORDERS),
            ),
            dtype=np.float64,
        )
    # discrete Gaussian, Kairouz et al. 2021 Proposition 14 / Eq. 17 without the L1 term
    gamma, dim = plan_like["lattice"], plan_like["dimension"]
    share_std = noise_multiplier * plan_like["sensitivity"] / math.sqrt(honest)
    tau = _lattice_tau((share_std / gamma) ** 2, honest)
    scale = 1.0 / noise_multiplier  # Δ / (σ Δ)
    first = orders * scale**2 / 2 + tau * dim
    second = orders / 2 * (scale + math.sqrt(dim) * tau) ** 2
    return np.minimum(first, second)


def _rdp_epsilon(rdp: NDArray[Any], delta: float) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def plan_client_dp(
    *,
    epsilon: float,
    delta: float,
    max_norm: float,
    hospitals: int,
    rounds: int,
    sample_rate: float = 1.0,
    min_aggregated: int | None = None,
    colluders: int = 0,
    mechanism: str = "gaussian",
    lattice: float | None = None,
    dimension: int | None = None,
    beta: float = DEFAULT_BETA,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> ClientDPPlan:
    """Calibrate client-level DP so that ``epsilon`` is spent over all rounds.

    Parameters
    ----------
    epsilon : float
        Target ε per hospital over the run (> 0).
    delta : float
        Target δ, in ``(0, 1 / hospitals)``.
    max_norm : float
        ``C``, the L2 clipping norm of an update delta (> 0).
    hospitals : int
        Hospitals invited per round (>= 1).
    rounds : int
        Rounds (>= 1).
    sample_rate : float
        Poisson probability that a hospital takes part in a round, in ``(0, 1]``
        (default: 1.0, every hospital every round). ``"gaussian"`` only.
    min_aggregated : int, optional
        ``m``, the fewest updates an aggregate may hold (default: ``hospitals``).
    colluders : int
        ``T`` hospitals that may give their shares to the server, ``0 <= T < m``
        (default: 0, honest-but-curious hospitals that do not collude).
    mechanism : {"gaussian", "discrete-gaussian"}
        See the module docstring (default: ``"gaussian"``).
    lattice : float, optional
        ``γ``, a power of two; required for ``"discrete-gaussian"``.
    dimension : int, optional
        ``P``; required for ``"discrete-gaussian"``.
    beta : float
        Conditional rounding ``β`` in ``[0, 1)`` (default: :data:`DEFAULT_BETA`).
    max_noise_multiplier : float
        Refuse plans needing more noise (default: :data:`MAX_NOISE_MULTIPLIER`).

    Returns
    -------
    ClientDPPlan

    Raises
    ------
    ConfigError
        If an argument is out of range or ``epsilon`` cannot be met.
    """
    k = _count("hospitals", hospitals)
    r = _count("rounds", rounds)
    c = _positive("dp max_norm", max_norm)
    cap = _positive("max_noise_multiplier", max_noise_multiplier)
    m = k if min_aggregated is None else _count("min_aggregated", min_aggregated)
    if m > k:
        raise ConfigError(f"min_aggregated ({m}) cannot exceed hospitals ({k})")
    t = _count("colluders", colluders, minimum=0)
    if t >= m:
        raise ConfigError(
            f"colluders ({t}) must be below min_aggregated ({m}): otherwise no honest noise "
            "is left in an aggregate"
        )
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, Real):
        raise ConfigError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    q = float(sample_rate)
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    _check_epsilon_delta(epsilon, delta, records=k, unit="hospitals")
    if mechanism not in CLIENT_MECHANISMS:
        raise ConfigError(
            f"client DP mechanism must be one of {', '.join(CLIENT_MECHANISMS)}, got {mechanism!r}"
        )
    if not (isinstance(beta, Real) and 0.0 <= float(beta) < 1.0):
        raise ConfigError(f"beta must be in [0, 1), got {beta!r}")
    sensitivity = c
    gamma: float | None = None
    dim: int | None = None
    if mechanism == "discrete-gaussian":
        if q != 1.0:
            raise ConfigError(
                "client sampling (sample_rate < 1) is not supported with the discrete Gaussian; "
                "use mechanism 'gaussian' or invite every hospital each round"
            )
        if lattice is None or dimension is None:
            raise ConfigError("the discrete Gaussian needs lattice (grid step) and dimension")
        gamma = _positive("lattice", lattice)
        mant, _ = math.frexp(gamma)
        if mant != 0.5:
            raise ConfigError(
                f"lattice must be a power of two (1 / fixed-point scale), got {gamma!r}"
            )
        dim = _count("dimension", dimension)
        sensitivity = rounded_sensitivity(c, lattice=gamma, dimension=dim, beta=float(beta))
    fields: dict[str, Any] = {
        "mechanism": mechanism,
        "sample_rate": q,
        "lattice": gamma,
        "dimension": dim,
        "sensitivity": sensitivity,
    }
    honest = m - t
    sigma = _search_sigma(
        lambda s: _rdp_epsilon(r * _client_rdp(fields, s, honest), float(delta)),
        target=float(epsilon),
        cap=cap,
        what=f"client-level ε = {epsilon:g} at δ = {delta:g} over {r} rounds",
    )
    plan = ClientDPPlan(
        epsilon=float(epsilon),
        delta=float(delta),
        max_norm=c,
        noise_multiplier=sigma,
        sensitivity=sensitivity,
        hospitals=k,
        min_aggregated=m,
        colluders=t,
        sample_rate=q,
        rounds=r,
        mechanism=mechanism,
        lattice=gamma,
        dimension=dim,
        beta=float(beta),
    )
    if gamma is not None and plan.share_std < 2 * gamma:
        raise ConfigError(
            f"the grid step {gamma:g} is too coarse for noise shares of std {plan.share_std:.3g} "
            "(need at least 2 grid steps): use a finer fixed-point scale"
        )
    return plan


def _default_rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(secrets.randbits(128))


def _flat(name: str, vec: NDArray[np.floating]) -> NDArray[np.float64]:
    arr = np.asarray(vec)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be a non-empty 1-D float array, got {arr.dtype} {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr.astype(np.float64, copy=False)


def clip_update(
    update: NDArray[np.floating], *, max_norm: float
) -> tuple[NDArray[np.float64], float]:
    """Scale ``update`` down to L2 norm at most ``max_norm`` (unchanged if already inside).

    Parameters
    ----------
    update : numpy.ndarray
        float, shape ``(P,)``.
    max_norm : float
        ``C`` (> 0).

    Returns
    -------
    clipped : numpy.ndarray
        float64 ``(P,)``, ``update * min(1, C / ||update||)``.
    norm : float
        ``||update||`` before clipping.

    Raises
    ------
    ValueError
        If ``update`` is not a finite 1-D float array or ``max_norm`` is not positive.
    """
    vec = _flat("update", update)
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = float(np.linalg.norm(vec))
    factor = min(1.0, float(max_norm) / norm) if norm > 0 else 1.0
    return vec * factor, norm


def discrete_gaussian(size: int, *, sigma: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """Samples of the discrete Gaussian ``N_Z(0, σ²)`` (probability ∝ ``exp(-x²/(2σ²))``).

    Rejection sampling from the discrete Laplace distribution, Algorithm 3 of Canonne,
    Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
    vectorised with floating-point acceptance probabilities (their exact rational
    arithmetic is replaced by float64, as in the reference TensorFlow implementation of
    Kairouz et al. 2021).

    Parameters
    ----------
    size : int
        Number of samples (>= 0).
    sigma : float
        Scale ``σ`` (> 0).
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        int64, shape ``(size,)``.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    t = math.floor(sigma) + 1
    p = 1.0 - math.exp(-1.0 / t)
    out = np.empty(0, dtype=np.int64)
    while out.size < size:
        n = max(64, int(1.5 * (size - out.size)) + 16)
        lap = rng.geometric(p, n) - rng.geometric(p, n)  # discrete Laplace, scale t
        accept = rng.random(n) < np.exp(-((np.abs(lap) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out = np.concatenate([out, lap[accept].astype(np.int64)])
    return out[:size]


def noise_share(
    size: int, *, plan: ClientDPPlan, rng: np.random.Generator | None = None
) -> NDArray[np.float64]:
    """One hospital's share of the aggregate's noise, in parameter units.

    ``N(0, share_std²)`` per value for ``"gaussian"``; ``γ N_Z(0, (share_std/γ)²)`` (on
    the grid) for ``"discrete-gaussian"``.

    Parameters
    ----------
    size : int
        ``P``.
    plan : ClientDPPlan
    rng : numpy.random.Generator, optional
        Injected for tests; default: seeded with 128 secret bits.

    Returns
    -------
    numpy.ndarray
        float64 ``(size,)``.
    """
    gen = _default_rng(rng)
    if plan.mechanism == "gaussian":
        return gen.normal(0.0, plan.share_std, size)
    assert plan.lattice is not None
    units = discrete_gaussian(size, sigma=plan.share_std / plan.lattice, rng=gen)
    return units.astype(np.float64) * plan.lattice


def _conditional_rounding(
    scaled: NDArray[np.float64], bound: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Randomized rounding to integers, retried until the L2 norm is at most ``bound``.

    Kairouz et al. 2021, Section 4.1 (conditional randomized rounding).
    """
    floor = np.floor(scaled)
    frac = scaled - floor
    for _ in range(_MAX_ROUNDING_TRIES):
        rounded = floor + (rng.random(scaled.shape) < frac)
        if float(np.linalg.norm(rounded)) <= bound:
            return rounded
    raise ValueError("conditional randomized rounding did not meet its norm bound")


def privatize_update(
    local: NDArray[np.floating],
    global_: NDArray[np.floating],
    *,
    plan: ClientDPPlan,
    rng: np.random.Generator | None = None,
) -> NDArray[np.float64]:
    """The noisy clipped update delta a hospital protects and sends under client-level DP.

    ``clip(local - global_, C) + noise_share``; for ``"discrete-gaussian"`` the clipped
    delta is first put on the grid ``γ`` by conditional randomized rounding, so the result
    is an exact multiple of ``γ`` (its fixed-point quantization by the protection is
    exact). Send it with ``num_examples=1`` (equal weights, DP-FedAvg); the hospitals add
    the unprotected mean to the global vector.

    Parameters
    ----------
    local : numpy.ndarray
        The hospital's weights after local training, float ``(P,)``.
    global_ : numpy.ndarray
        The global weights the round started from, float ``(P,)``.
    plan : ClientDPPlan
    rng : numpy.random.Generator, optional
        Injected for tests; default: seeded with 128 secret bits.

    Returns
    -------
    numpy.ndarray
        float64 ``(P,)``.

    Raises
    ------
    ValueError
        If the vectors are not finite 1-D float arrays of the same size (or not of the
        plan's ``dimension`` under ``"discrete-gaussian"``).
    """
    loc = _flat("local", local)
    glo = _flat("global_", global_)
    if loc.shape != glo.shape:
        raise ValueError(f"local {loc.shape} and global_ {glo.shape} differ in shape")
    gen = _default_rng(rng)
    clipped, _ = clip_update(loc - glo, max_norm=plan.max_norm)
    if plan.mechanism == "gaussian":
        return clipped + noise_share(clipped.size, plan=plan, rng=gen)
    assert plan.lattice is not None
    if plan.dimension != clipped.size:
        raise ValueError(
            f"update has {clipped.size} values, the plan was made for {plan.dimension}"
        )
    units = _conditional_rounding(clipped / plan.lattice, plan.sensitivity / plan.lattice, gen)
    noise = discrete_gaussian(clipped.size, sigma=plan.share_std / plan.lattice, rng=gen)
    return (units + noise) * plan.lattice


@dataclass
class ClientDPAccountant:
    """Client-level ε spent over the rounds of one run (any party can keep it: it needs
    only the public plan and how many updates each aggregate held).

    Parameters
    ----------
    plan : ClientDPPlan
    """

    plan: ClientDPPlan
    _rdp: NDArray[Any] = field(init=False, repr=False)
    _rounds: int = field(init=False, default=0)
    _per_round: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._rdp = np.zeros(len(RDP_ORDERS), dtype=np.float64)

    def step(self, *, aggregated: int) -> DPRecord:
        """Charge one round whose aggregate held ``aggregated`` updates.

        With fewer than the plan's ``min_aggregated`` updates (dropouts) the honest noise
        is smaller (``aggregated - T`` shares); the round is charged with the noise
        actually present, so ε may exceed the target (a warning is logged).

        Raises
        ------
        ConfigError
            If ``aggregated`` is not above the plan's ``colluders`` (no honest noise).
        """
        a = _count("aggregated", aggregated)
        honest = a - self.plan.colluders
        if honest < 1:
            raise ConfigError(
                f"an aggregate of {a} update(s) with {self.plan.colluders} colluder(s) "
                "carries no honest noise"
            )
        z = self.plan.noise_multiplier
        if honest < self.plan.honest_shares:
            z *= math.sqrt(honest / self.plan.honest_shares)
            logger.warning(
                "client DP: aggregate of %d updates (planned at least %d): noise multiplier "
                "%.3g instead of %.3g this round",
                a,
                self.plan.min_aggregated,
                z,
                self.plan.noise_multiplier,
            )
        fields = {
            "mechanism": self.plan.mechanism,
            "sample_rate": self.plan.sample_rate,
            "lattice": self.plan.lattice,
            "dimension": self.plan.dimension,
            "sensitivity": self.plan.sensitivity,
        }
        self._rdp = self._rdp + _client_rdp(fields, z, honest)
        self._rounds += 1
        record = self.record()
        self._per_round.append(record.epsilon)
        if self._rounds > self.plan.rounds:
            logger.warning(
                "client DP: round %d beyond the %d planned; ε = %.3g exceeds the target %.3g",
                self._rounds,
                self.plan.rounds,
                record.epsilon,
                self.plan.epsilon,
            )
        return record

    @property
    def epsilon(self) -> float:
        """ε spent so far (0.0 before the first round)."""
        if self._rounds == 0:
            return 0.0
        return _rdp_epsilon(self._rdp, self.plan.delta)

    @property
    def per_round(self) -> Sequence[float]:
        """ε spent after each round charged so far."""
        return tuple(self._per_round)

    def record(self) -> DPRecord:
        """ε spent so far, δ and the plan's parameters."""
        return DPRecord(
            level="client",
            mechanism=self.plan.mechanism,
            epsilon=self.epsilon,
            delta=self.plan.delta,
            noise_multiplier=self.plan.noise_multiplier,
            steps=self._rounds,
            target_epsilon=self.plan.epsilon,
        )


def run_record(records: Sequence[DPRecord]) -> dict[str, Any]:
    """The run's DP summary from the hospitals' records of one round (or the end).

    Sample-level DP gives each hospital its own (ε, δ) on its own patients; the run's
    figure is the largest. Use it as ``metrics.json``'s ``final.epsilon`` /
    ``final.delta`` (and per round).

    Parameters
    ----------
    records : sequence of DPRecord
        At least one; all with the same δ and level.

    Returns
    -------
    dict
        ``{"level", "mechanism", "epsilon", "delta", "target_epsilon", "per_hospital"}``
        with ``epsilon = max`` over the records and ``per_hospital`` their ε in order.

    Raises
    ------
    ValueError
        If ``records`` is empty or mixes levels or δ.
    """
    if not records:
        raise ValueError("records must not be empty")
    levels = {r.level for r in records}
    deltas = {r.delta for r in records}
    if len(levels) > 1 or len(deltas) > 1:
        raise ValueError(f"records mix levels {levels} or deltas {deltas}")
    return {
        "level": records[0].level,
        "mechanism": records[0].mechanism,
        "epsilon": max(r.epsilon for r in records),
        "delta": records[0].delta,
        "target_epsilon": max(r.target_epsilon for r in records),
        "per_hospital": [r.epsilon for r in records],
    }


__all__ = [
    "ACCOUNTANTS",
    "CLIENT_MECHANISMS",
    "MAX_NOISE_MULTIPLIER",
    "ClientDPAccountant",
    "ClientDPPlan",
    "DPRecord",
    "SampleDP",
    "SampleDPPlan",
    "batches_per_epoch",
    "clip_update",
    "default_delta",
    "discrete_gaussian",
    "dp_compatible",
    "noise_share",
    "plan_client_dp",
    "plan_sample_dp",
    "privatize_update",
    "rounded_sensitivity",
    "run_record",
]
