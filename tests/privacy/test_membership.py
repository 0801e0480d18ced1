"""Membership inference: the attacks separate memorised members and see nothing in non-members."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from fedcrypt.privacy.membership import (
    attack_auc,
    example_losses,
    lira_offline_scores,
    logit_confidence,
    loss_threshold_scores,
)


@functools.lru_cache(maxsize=4)
def _memorised_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP fitted to 60 examples with *random* labels: pure memorisation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(360, 20, generator=g)
    y = torch.randint(0, 2, (360,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:60]), y[:60]).backward()
        opt.step()
    return model, x, y


def test_loss_attack_detects_memorised_members() -> None:
    model, x, y = _memorised_model()
    scores = loss_threshold_scores(example_losses(model, x, y))
    assert attack_auc(scores[:60], scores[60:]) > 0.9


def test_loss_attack_auc_is_chance_between_non_members() -> None:
    """Two disjoint sets of non-members (150 each): AUC 0.5 ± 0.12.

    Under the null the AUC's standard deviation is sqrt((n1 + n2 + 1) / (12 n1 n2)) =
    0.033 for n1 = n2 = 150; 0.12 is over 3.5 standard deviations.
    """
    model, x, y = _memorised_model()
    scores = loss_threshold_scores(example_losses(model, x, y))
    assert abs(attack_auc(scores[60:210], scores[210:360]) - 0.5) < 0.12


def test_lira_scores_members_above_their_out_distribution() -> None:
    model, x, y = _memorised_model()
    target = logit_confidence(model, x, y)
    shadows = np.stack([logit_confidence(_memorised_model(s)[0], x, y) for s in (1, 2)])
    # the shadows trained on other seeds' data: OUT for every example here; with two
    # shadows (pooled variance) LiRA is weaker than with many, but far above chance
    scores = lira_offline_scores(target, shadows)
    assert scores.shape == (360,)
    assert attack_auc(scores[:60], scores[60:]) > 0.75
    with pytest.raises(ValueError, match="shadow"):
        lira_offline_scores(target, shadows[:, :10])


def test_logit_confidence_matches_its_definition() -> None:
    model, x, y = _memorised_model()
    p = torch.softmax(model(x[:10]).double(), dim=1).gather(1, y[:10, None]).squeeze(1)
    expected = torch.log(p) - torch.log1p(-p)
    np.testing.assert_allclose(
        logit_confidence(model, x[:10], y[:10]), expected.detach(), rtol=1e-6
    )


def test_attack_auc_needs_both_sides() -> None:
    with pytest.raises(ValueError):
        attack_auc(np.array([]), np.array([1.0]))
