"""Gradient inversion (Geiping et al. 2020): recovers an image from its gradient, not from noise."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcrypt.privacy.image_metrics import similarity
from fedcrypt.privacy.inversion import (
    InversionNet,
    gradient_from_update,
    invert_gradients,
    local_sgd_step,
    parameter_vector,
)
from fedcrypt.tasks.data import load_dataset

#: A 28x28 reconstruction above 18 dB PSNR shows the image's structure; a constant grey
#: image scores about 10-11 dB against a BreastMNIST image.
RECOGNISABLE_DB = 18.0


@pytest.fixture(scope="module")
def victim(shared_data: Path) -> tuple[InversionNet, torch.Tensor, torch.Tensor, np.ndarray]:
    ds = load_dataset("breastmnist", data_dir=shared_data)
    x = torch.from_numpy(ds.train.x[5:6])
    y = torch.from_numpy(ds.train.y[5:6])
    torch.manual_seed(0)
    model = InversionNet(1, 28, 2)
    w0 = parameter_vector(model)
    local = local_sgd_step(copy.deepcopy(model), x, y, lr=0.01)
    return model, x, y, gradient_from_update(w0, local, lr=0.01)


def test_update_reveals_the_exact_gradient(victim: tuple) -> None:  # type: ignore[type-arg]
    model, x, y, grad = victim
    m = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    true = np.concatenate([p.grad.double().reshape(-1).numpy() for p in m.parameters()])
    np.testing.assert_allclose(grad, true, rtol=1e-3, atol=1e-6)


def test_inversion_of_a_real_gradient_recovers_a_recognisable_image(victim: tuple) -> None:  # type: ignore[type-arg]
    model, x, y, grad = victim
    res = invert_gradients(model, grad, labels=y, image_shape=(1, 28, 28), iterations=150)
    assert res.images.shape == (1, 1, 28, 28)
    assert similarity(x.numpy(), res.images).psnr > RECOGNISABLE_DB


def test_inversion_of_noise_recovers_nothing(victim: tuple) -> None:  # type: ignore[type-arg]
    model, x, y, grad = victim
    noise = np.random.default_rng(0).standard_normal(grad.size)
    res = invert_gradients(model, noise, labels=y, image_shape=(1, 28, 28), iterations=150)
    assert similarity(x.numpy(), res.images).psnr < RECOGNISABLE_DB - 5


def test_inversion_rejects_a_gradient_of_the_wrong_size(victim: tuple) -> None:  # type: ignore[type-arg]
    model, _x, y, grad = victim
    with pytest.raises(ValueError, match="parameters"):
        invert_gradients(model, grad[:-1], labels=y, image_shape=(1, 28, 28), iterations=1)


def test_similarity_matches_reconstructions_to_images() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((3, 1, 28, 28))
    noisy = np.clip(truth + 0.01 * rng.standard_normal(truth.shape), 0, 1)
    sim = similarity(truth, noisy[[2, 0, 1]])
    assert sim.order == (1, 2, 0)
    assert sim.psnr > 35 and sim.ssim > 0.95
    worse = similarity(truth, rng.random((3, 1, 28, 28)))
    assert worse.psnr < 12 and worse.ssim < 0.2
    with pytest.raises(ValueError):
        similarity(truth, truth[:2])
