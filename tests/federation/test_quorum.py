"""Runs that survive: quorum with dropouts, client sampling, checkpoint and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import AggregationError
from fedcrypt.federation.simulation import run_simulation

pytestmark = pytest.mark.slow


def _weights(run_dir: Path) -> np.ndarray:
    state = torch.load(run_dir / "model.pt", weights_only=True)
    return np.concatenate([t.double().reshape(-1).numpy() for t in state.values()])


def test_a_dropped_hospital_rejoins_with_a_quorum(tmp_path: Path) -> None:
    cfg = RunConfig.build(protection="he", clients=3, rounds=3, drop=["1@2"], min_hospitals=2)
    record = run_simulation(cfg, run_dir=tmp_path / "run")
    assert [r.clients for r in record.rounds] == [3, 2, 3]
    assert record.rounds[1].contributors == [0, 2]
    assert "offline" in record.rounds[1].dropped["1"]
    assert record.rounds[1].evaluated == 2  # offline for the whole round
    assert record.rounds[2].evaluated == 3  # caught up from round 2's aggregate


def test_below_the_quorum_the_run_fails_loudly(tmp_path: Path) -> None:
    cfg = RunConfig.build(protection="plain", clients=3, rounds=1, drop=["1@1"])
    with pytest.raises(AggregationError, match=r"only 2 of 3 hospitals .* quorum is 3"):
        run_simulation(cfg, run_dir=tmp_path / "run")


def test_fraction_samples_hospitals_per_round(tmp_path: Path) -> None:
    cfg = RunConfig.build(
        protection="plain", clients=10, rounds=2, fraction=0.5, local_epochs=1, seed=3
    )
    record = run_simulation(cfg, run_dir=tmp_path / "run")
    assert [r.clients for r in record.rounds] == [5, 5]
    assert record.rounds[0].contributors != record.rounds[1].contributors  # seeded, per round
    assert all(r.evaluated == 10 for r in record.rounds)


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    base = RunConfig.build(protection="plain", clients=3, rounds=4, local_epochs=1, seed=5)
    whole = run_simulation(base, run_dir=tmp_path / "whole")
    run_simulation(base.model_copy(update={"rounds": 2}), run_dir=tmp_path / "part")
    resumed = run_simulation(base, run_dir=tmp_path / "part", resume=True)
    assert [r.round for r in resumed.rounds] == [1, 2, 3, 4]
    np.testing.assert_array_equal(_weights(tmp_path / "part"), _weights(tmp_path / "whole"))
    assert resumed.rounds[-1].auc == whole.rounds[-1].auc
