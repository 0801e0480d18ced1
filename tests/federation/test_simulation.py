"""End-to-end runs on Flower's simulation engine: ckks equals plain FedAvg."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcrypt.config import RunConfig
from fedcrypt.federation.simulation import run_simulation
from fedcrypt.protection.he.bounds import error_bound
from fedcrypt.protection.he.keys import write_key_files
from fedcrypt.protection.he.params import DEFAULT_PRESET, get_preset

pytestmark = pytest.mark.slow


def _weights(run_dir: Path) -> np.ndarray:
    state = torch.load(run_dir / "model.pt", weights_only=True)
    return np.concatenate([t.double().reshape(-1).numpy() for t in state.values()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One plain and one ckks run of the embedded job, same seed, one round."""
    base = tmp_path_factory.mktemp("runs")
    keys = base / "keys"
    write_key_files(keys, preset=DEFAULT_PRESET)
    out = {}
    for scheme in ("plain", "he"):
        cfg = RunConfig.build(protection=scheme, rounds=1, clients=3, seed=7)
        run_simulation(cfg, run_dir=base / scheme, keys_dir=keys if scheme == "he" else None)
        out[scheme] = base / scheme
    return out


def test_ckks_global_weights_equal_plain_fedavg_within_the_ckks_bound(
    runs: dict[str, Path],
) -> None:
    """|w_ckks - w_plain| <= CKKS bound + float32 rounding.

    Both runs start from the same weights and train identically (same seed), so their
    local updates are bit-identical; the only difference is the encrypted sum. The CKKS
    error on each value of the decrypted mean is at most ``error_bound`` (encoding
    rounding K*N/2 plus encryption noise, divided by the scale 2^scale_bits and by the
    total example count; see fedcrypt.protection.he.ckks.error_bound). ``model.pt`` stores
    float32, which adds up to half an ulp: 2^-24 * |w|. We take max_abs = 4 * max|w|
    as a generous bound on the hospitals' local weights.
    """
    plain, ckks = _weights(runs["plain"]), _weights(runs["he"])
    assert plain.shape == ckks.shape and plain.size > 1000
    max_abs = 4 * float(np.abs(plain).max())
    bound = error_bound(get_preset(DEFAULT_PRESET), num_hospitals=3, max_abs=max_abs)
    tolerance = bound + 2.0**-23 * np.abs(plain)
    diff = np.abs(ckks - plain)
    assert np.all(diff <= tolerance), f"max diff {diff.max():.3e}, bound {bound:.3e}"
    assert not np.array_equal(ckks, plain) or bound < 2.0**-24  # CKKS really was in the loop


def test_ckks_and_plain_metrics_agree(runs: dict[str, Path]) -> None:
    m = {s: json.loads((p / "metrics.json").read_text()) for s, p in runs.items()}
    for key in ("accuracy", "auc"):
        assert abs(m["he"]["final"][key] - m["plain"]["final"][key]) <= 0.005
    assert m["plain"]["final"]["auc"] > 0.9


def test_run_directory_holds_the_report(runs: dict[str, Path]) -> None:
    run = runs["he"]
    for name in ("metrics.json", "report.md", "roc.png", "rounds.png", "model.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["protection"] == "he"
    (rnd,) = metrics["rounds"]
    for key in (
        "round",
        "loss",
        "accuracy",
        "auc",
        "seconds",
        "bytes_up_per_client",
        "encrypt_seconds",
        "aggregate_seconds",
        "decrypt_seconds",
    ):
        assert key in rnd and rnd[key] is not None, key
    # ckks ciphertexts are much larger than the float64 plain payload
    plain_rnd = json.loads((runs["plain"] / "metrics.json").read_text())["rounds"][0]
    assert rnd["bytes_up_per_client"] > 2 * plain_rnd["bytes_up_per_client"]
    assert rnd["encrypt_seconds"] > 0 and math.isfinite(rnd["auc"])
    assert len(metrics["roc"]["fpr"]) == len(metrics["roc"]["tpr"]) > 2
    assert "![ROC curve" in (run / "report.md").read_text()
