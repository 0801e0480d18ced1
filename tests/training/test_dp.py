"""Differential privacy mechanisms: calibration, refusal, DP-SGD wrap hook, clipping, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcrypt.exceptions import ConfigError
from fedcrypt.tasks.models import create_model
from fedcrypt.training import dp

# -- sample-level -------------------------------------------------------------------------


def _plan(**kw: object) -> dp.SampleDPPlan:
    args: dict[str, object] = dict(
        epsilon=2.0,
        delta=1e-3,
        max_grad_norm=1.0,
        num_train=64,
        batch_size=16,
        rounds=2,
        local_epochs=1,
    )
    args.update(kw)
    return dp.plan_sample_dp(**args)  # type: ignore[arg-type]


def test_calibration_reaches_epsilon_within_tolerance_over_all_rounds() -> None:
    plan = _plan()
    assert plan.sample_rate == 1 / 4 and plan.steps_per_round == 4 and plan.total_steps == 8
    acct = RDPAccountant()
    acct.history = [(plan.noise_multiplier, plan.sample_rate, plan.total_steps)]
    eps = acct.get_epsilon(delta=plan.delta)
    # spent exactly over the run: at most the target, and within the search tolerance
    assert plan.epsilon - dp.EPSILON_TOLERANCE - 1e-9 <= eps <= plan.epsilon
    # less noise would overshoot: the multiplier is not needlessly large
    acct.history = [(plan.noise_multiplier * 0.95, plan.sample_rate, plan.total_steps)]
    assert acct.get_epsilon(delta=plan.delta) > plan.epsilon


def test_more_rounds_need_more_noise() -> None:
    assert _plan(rounds=4).noise_multiplier > _plan(rounds=2).noise_multiplier


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon": 1e-4}, "cannot reach"),  # the noise explodes
        ({"delta": 1 / 64}, "below 1/64"),  # δ >= 1/n
        ({"rounds": 200_000}, "noise multiplier 50"),  # too many steps for useful noise
        ({"epsilon": -1.0}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"rounds": 0}, "rounds"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_unreachable_or_invalid_targets_are_refused(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _plan(**change)


def test_default_delta_is_below_one_over_n() -> None:
    assert dp.default_delta(546) == 1e-4
    for n in (1, 7, 91, 1000, 12345):
        assert dp.default_delta(n) <= 0.1 / n


def test_dp_compatible_is_deterministic_and_removes_batchnorm() -> None:
    def build() -> nn.Module:
        torch.manual_seed(3)
        return dp.dp_compatible(create_model("cnn", input_shape=(1, 28, 28), num_classes=2))

    a, b = build(), build()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in a.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in a.modules())
    assert not any(getattr(m, "inplace", False) for m in a.modules())
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y)


def _round(
    sdp: dp.SampleDP, model: nn.Module, loader: DataLoader[tuple[torch.Tensor, ...]]
) -> None:
    """What fedcrypt.training.train does with its ``wrap`` hook: one local epoch."""
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    net, opt, batches = sdp.wrap(model, opt, loader)
    for x, y in batches:
        if y.numel() == 0:
            continue
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    sdp.end_round()


def test_wrap_hook_accounts_across_rounds_and_refuses_a_round_beyond_the_budget() -> None:
    plan = _plan(rounds=2, local_epochs=1)
    sdp = dp.SampleDP(plan, seed=1)
    model = dp.dp_compatible(create_model("mlp", input_shape=(6,), num_classes=2))
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    assert sdp.epsilon == 0.0
    _round(sdp, model, loader)
    eps1 = sdp.epsilon
    assert sdp.steps == plan.steps_per_round and 0 < eps1 < plan.epsilon
    _round(sdp, model, loader)
    record = sdp.record()
    assert record.steps == plan.total_steps
    assert eps1 < record.epsilon <= plan.epsilon and record.delta == plan.delta
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # hooks are gone after the round: the model is a plain module again
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    with pytest.raises(ConfigError, match="budget"):
        _round(sdp, model, loader)


def test_a_rebuilt_hospital_continues_the_accounting_from_the_rounds_it_trained() -> None:
    plan = _plan(rounds=2, local_epochs=1)
    model = dp.dp_compatible(create_model("mlp", input_shape=(6,), num_classes=2))
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    first = dp.SampleDP(plan, seed=2)
    _round(first, model, loader)
    assert first.epsilon == pytest.approx(plan.epsilon_after(1))
    second = dp.SampleDP(plan, rounds_done=1, seed=3)  # e.g. a new simulation worker
    assert second.epsilon == pytest.approx(first.epsilon)
    _round(second, model, loader)
    assert second.epsilon == pytest.approx(plan.epsilon_after(2))
    assert plan.epsilon_after(2) <= plan.epsilon and plan.epsilon_after(0) == 0.0
    with pytest.raises(ConfigError, match="budget"):
        _round(dp.SampleDP(plan, rounds_done=2), model, loader)


def test_wrap_refuses_a_loader_the_plan_was_not_made_for() -> None:
    sdp = dp.SampleDP(_plan(), seed=0)
    model = dp.dp_compatible(create_model("mlp", input_shape=(6,), num_classes=2))
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ConfigError, match="64 examples"):
        sdp.wrap(model, opt, DataLoader(_data(n=80), batch_size=16))
    with pytest.raises(ConfigError, match="batches of 16"):
        sdp.wrap(model, opt, DataLoader(_data(), batch_size=32))


def test_wrap_refuses_a_model_with_batchnorm() -> None:
    sdp = dp.SampleDP(_plan(), seed=0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="Opacus-compatible"):
        sdp.wrap(model, torch.optim.Adam(model.parameters()), DataLoader(_data(), batch_size=16))


def test_dp_sgd_noise_is_secretly_seeded_by_default() -> None:
    """Two hospitals with identical data, model and plan end with different weights."""
    plan = _plan()
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = dp.dp_compatible(create_model("mlp", input_shape=(6,), num_classes=2))
        _round(dp.SampleDP(plan), model, DataLoader(_data(), batch_size=16))
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert not torch.equal(weights[0], weights[1])


def test_run_record_takes_the_largest_epsilon() -> None:
    recs = [dp.DPRecord("sample", "dp-sgd", e, 1e-3, 1.1, 10, 4.0) for e in (1.5, 3.9, 2.0)]
    summary = dp.run_record(recs)
    assert summary["epsilon"] == 3.9 and summary["delta"] == 1e-3
    assert summary["per_hospital"] == [1.5, 3.9, 2.0]
    with pytest.raises(ValueError):
        dp.run_record([])


# -- client-level -------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [1e-3, 0.5, 3.0, 250.0])
def test_clipping_bounds_the_l2_norm(norm: float) -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal(1000)
    v *= norm / np.linalg.norm(v)
    clipped, before = dp.clip_update(v, max_norm=1.0)
    assert before == pytest.approx(norm)
    assert np.linalg.norm(clipped) <= 1.0 + 1e-12
    if norm <= 1.0:
        np.testing.assert_array_equal(clipped, v)
    else:  # same direction
        assert np.dot(clipped, v) / (np.linalg.norm(clipped) * norm) == pytest.approx(1.0)


def test_clip_update_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        dp.clip_update(np.array([1.0, np.nan]), max_norm=1.0)
    with pytest.raises(ValueError):
        dp.clip_update(np.ones(3), max_norm=0.0)


@pytest.mark.parametrize("mechanism", ["gaussian", "discrete-gaussian"])
def test_distributed_noise_sums_to_the_planned_variance(mechanism: str) -> None:
    """Each of K hospitals adds its share; the sum's variance is (σΔ)².

    Tolerance: the sample variance of P = 200,000 values has relative standard error
    sqrt(2 / P) = 0.32 %; we accept 2 % (over 6 standard errors).
    """
    size, hospitals = 200_000, 5
    extra = {"lattice": 2.0**-10, "dimension": size} if mechanism == "discrete-gaussian" else {}
    plan = dp.plan_client_dp(
        epsilon=8.0,
        delta=1e-2,
        max_norm=1.0,
        hospitals=hospitals,
        rounds=3,
        mechanism=mechanism,
        **extra,  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(42)
    shares = [dp.noise_share(size, plan=plan, rng=rng) for _ in range(hospitals)]
    total = np.sum(shares, axis=0)
    assert np.var(total) == pytest.approx(plan.total_std**2, rel=0.02)
    assert np.var(shares[0]) == pytest.approx(plan.total_std**2 / hospitals, rel=0.02)
    assert abs(np.mean(total)) < 4 * plan.total_std / math.sqrt(size)
    if mechanism == "discrete-gaussian":  # every value on the grid
        units = total / plan.lattice  # type: ignore[operator]
        np.testing.assert_array_equal(units, np.round(units))


def test_colluders_make_each_share_larger() -> None:
    base = dict(epsilon=4.0, delta=1e-2, max_norm=1.0, hospitals=10, rounds=5)
    honest = dp.plan_client_dp(**base)  # type: ignore[arg-type]
    wary = dp.plan_client_dp(**base, colluders=4)  # type: ignore[arg-type]
    assert honest.total_std == pytest.approx(wary.total_std)
    assert wary.share_std == pytest.approx(honest.share_std * math.sqrt(10 / 6))
    with pytest.raises(ConfigError, match="colluders"):
        dp.plan_client_dp(**base, colluders=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("mechanism", ["gaussian", "discrete-gaussian"])
def test_client_accountant_spends_the_target_over_the_planned_rounds(mechanism: str) -> None:
    extra = {"lattice": 2.0**-12, "dimension": 5000} if mechanism == "discrete-gaussian" else {}
    plan = dp.plan_client_dp(
        epsilon=3.0,
        delta=1e-3,
        max_norm=1.0,
        hospitals=20,
        rounds=4,
        mechanism=mechanism,
        **extra,  # type: ignore[arg-type]
    )
    acct = dp.ClientDPAccountant(plan)
    for _ in range(plan.rounds):
        acct.step(aggregated=20)
    assert plan.epsilon - dp.EPSILON_TOLERANCE - 1e-9 <= acct.epsilon <= plan.epsilon
    assert list(acct.per_round) == sorted(acct.per_round)
    # a round with dropouts carries less noise and costs more
    short = dp.ClientDPAccountant(plan)
    for _ in range(plan.rounds):
        short.step(aggregated=12)
    assert short.epsilon > acct.epsilon


def test_client_plan_refuses_unreachable_or_invalid_targets() -> None:
    base = dict(delta=1e-3, max_norm=1.0, hospitals=5, rounds=10)
    with pytest.raises(ConfigError, match="cannot reach"):
        dp.plan_client_dp(epsilon=1e-4, **base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="below 1/5"):
        dp.plan_client_dp(epsilon=4.0, **{**base, "delta": 0.3})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="power of two"):
        dp.plan_client_dp(
            epsilon=4.0,
            mechanism="discrete-gaussian",
            lattice=0.3,
            dimension=10,
            **base,  # type: ignore[arg-type]
        )
    with pytest.raises(ConfigError, match="sampling"):
        dp.plan_client_dp(
            epsilon=4.0,
            mechanism="discrete-gaussian",
            lattice=2.0**-8,
            dimension=10,
            sample_rate=0.5,
            **base,  # type: ignore[arg-type]
        )


def test_privatize_update_clips_the_delta_and_lands_on_the_grid() -> None:
    size = 4000
    plan = dp.plan_client_dp(
        epsilon=4.0,
        delta=1e-2,
        max_norm=0.5,
        hospitals=3,
        rounds=2,
        mechanism="discrete-gaussian",
        lattice=2.0**-16,
        dimension=size,
    )
    rng = np.random.default_rng(0)
    glob = rng.standard_normal(size)
    local = glob + 10.0 * rng.standard_normal(size)  # a huge update: clipped
    out = dp.privatize_update(local, glob, plan=plan, rng=rng)
    units = out / plan.lattice  # type: ignore[operator]
    np.testing.assert_array_equal(units, np.round(units))
    # the signal left is the clipped delta: its projection on the true direction is <= C
    direction = (local - glob) / np.linalg.norm(local - glob)
    assert np.dot(out, direction) == pytest.approx(plan.max_norm, abs=6 * plan.share_std)
    with pytest.raises(ValueError, match="shape"):
        dp.privatize_update(local, glob[:-1], plan=plan, rng=rng)


def test_discrete_gaussian_has_the_right_variance() -> None:
    """For σ >= 1 the discrete Gaussian's variance is σ² within 1e-6 relative
    (Canonne et al. 2020, Fact 18); sample tolerance 2 % at 200,000 draws."""
    s = dp.discrete_gaussian(200_000, sigma=3.0, rng=np.random.default_rng(1))
    assert s.dtype == np.int64
    assert np.var(s) == pytest.approx(9.0, rel=0.02)
    assert abs(np.mean(s)) < 0.05


def test_discrete_gaussian_updates_cross_secagg_exactly() -> None:
    """On secagg's own grid (γ = 1 / scale, weight 1) the fixed-point quantization is exact:
    the unmasked FedAvg mean equals the mean of the noisy updates to float precision, so
    the server's integer sum is exactly what the accounting covers."""
    from fedcrypt.protection.secagg import (
        RoundConfig,
        SecAggParams,
        SecAggServer,
        new_consortium,
        run_round,
    )

    size, ids = 500, (1, 2, 3)
    params = SecAggParams(clip=16.0, max_examples=1)
    plan = dp.plan_client_dp(
        epsilon=8.0,
        delta=1e-1,
        max_norm=1.0,
        hospitals=len(ids),
        rounds=2,
        mechanism="discrete-gaussian",
        lattice=1.0 / params.resolved_scale,
        dimension=size,
    )
    assert plan.value_bound() <= params.clip
    rng = np.random.default_rng(7)
    glob = rng.standard_normal(size)
    noisy = {
        i: dp.privatize_update(glob + rng.standard_normal(size), glob, plan=plan, rng=rng)
        for i in ids
    }
    hospitals, registry = new_consortium(ids, params=params)
    server = SecAggServer(
        RoundConfig(round=1, hospital_ids=ids, vector_size=size, params=params),
        registry=registry,
    )
    report = run_round(server, hospitals, {i: (v, 1) for i, v in noisy.items()})
    assert report.result is not None and report.result.total_examples == 3
    expected = np.mean([noisy[i] for i in ids], axis=0)
    np.testing.assert_allclose(report.result.mean, expected, rtol=0, atol=1e-12)
