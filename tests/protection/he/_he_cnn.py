"""A small real federation for HE tests: the project's CNN, PneumoniaMNIST, three hospitals.

Each hospital holds ``PER_HOSPITAL`` training images of ``../shared/data/
pneumoniamnist.npz``; a round is ``STEPS`` Adam steps of batch 16 with balanced class
weights (as ``--class-weight balanced``), seeded by round and hospital so that two
trajectories (plain and HE) train identically from identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedcrypt.protection.flatten import Layout, flatten, unflatten
from fedcrypt.tasks.models import create_model

PER_HOSPITAL = 160
COUNTS = (160, 140, 120)
STEPS = 3
TEST_IMAGES = 160


@dataclass
class Federation:
    """The data and the model layout; :meth:`train` and :meth:`loss` on flat vectors."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    layout: Layout
    initial: np.ndarray

    @classmethod
    def load(cls, data_dir: Path) -> Federation:
        with np.load(data_dir / "pneumoniamnist.npz") as z:
            rng = np.random.default_rng(0)
            idx = rng.permutation(len(z["train_labels"]))[: 3 * PER_HOSPITAL]
            x = z["train_images"][idx].astype(np.float32)[:, None] / 255.0
            y = z["train_labels"].reshape(-1)[idx].astype(np.int64)
            xt = z["test_images"][:TEST_IMAGES].astype(np.float32)[:, None] / 255.0
            yt = z["test_labels"].reshape(-1)[:TEST_IMAGES].astype(np.int64)
        torch.manual_seed(0)
        model = create_model("cnn", input_shape=(1, 28, 28), num_classes=2)
        state = model.state_dict()
        return cls(
            torch.from_numpy(x),
            torch.from_numpy(y),
            torch.from_numpy(xt),
            torch.from_numpy(yt),
            Layout.of(state),
            flatten(state),
        )

    def model(self, vec: np.ndarray) -> torch.nn.Module:
        m = create_model("cnn", input_shape=(1, 28, 28), num_classes=2)
        m.load_state_dict(unflatten(vec, self.layout))
        return m

    def train(self, vec: np.ndarray, hospital: int, round: int) -> np.ndarray:
        """``STEPS`` Adam steps from ``vec`` on the hospital's images; the new weights."""
        torch.manual_seed(1000 * round + hospital)
        m = self.model(vec)
        m.train()
        lo = hospital * PER_HOSPITAL
        n = COUNTS[hospital]
        xs, ys = self.x[lo : lo + n], self.y[lo : lo + n]
        counts = torch.bincount(ys, minlength=2).clamp(min=1).float()
        weight = len(ys) / (2 * counts)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1000 * round + hospital)
        for _ in range(STEPS):
            idx = torch.randint(0, n, (16,), generator=gen)
            loss = torch.nn.functional.cross_entropy(m(xs[idx]), ys[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return flatten(m.state_dict())

    @torch.no_grad()
    def evaluate(self, vec: np.ndarray) -> tuple[float, float]:
        """Mean test cross-entropy and ROC AUC (class 1 = pneumonia) of the model ``vec``."""
        from fedcrypt.training.metrics import roc_auc

        m = self.model(vec)
        m.eval()
        logits = m(self.x_test)
        loss = float(torch.nn.functional.cross_entropy(logits, self.y_test))
        p = torch.softmax(logits, dim=1)[:, 1].numpy()
        return loss, float(roc_auc(self.y_test.numpy(), p))
