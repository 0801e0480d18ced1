"""How close a reconstruction is to the true images: PSNR and SSIM (scikit-image)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Similarity:
    """Mean similarity of reconstructions to the true images, best one-to-one matching.

    Attributes
    ----------
    psnr : float
        Peak signal-to-noise ratio in dB (data range 1), mean over images; higher is a
        closer copy (above ~20 dB a 28x28 image is recognisable; a constant grey image
        scores ~10 dB).
    ssim : float
        Structural similarity (Wang et al., IEEE TIP 2004) in ``[-1, 1]``, mean over images.
    order : tuple of int
        ``order[i]``: the reconstruction matched to true image ``i``.
    """

    psnr: float
    ssim: float
    order: tuple[int, ...]


def _psnr(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def _ssim(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    from skimage.metrics import structural_similarity

    # images are [C, H, W]; SSIM per channel, averaged
    return float(
        np.mean([structural_similarity(a[c], b[c], data_range=1.0) for c in range(a.shape[0])])
    )


def similarity(truth: NDArray[np.floating], guess: NDArray[np.floating]) -> Similarity:
    """PSNR and SSIM of ``guess`` against ``truth``, matching images one to one.

    The attacker's reconstructions come in no particular order (images with the same
    label are interchangeable), so each true image is matched to one reconstruction by
    the assignment that maximises the total PSNR (``scipy.optimize.linear_sum_assignment``).

    Parameters
    ----------
    truth, guess : numpy.ndarray
        ``[B, C, H, W]`` images with values in ``[0, 1]``.

    Returns
    -------
    Similarity

    Raises
    ------
    ValueError
        If the shapes differ or are not 4-D.
    """
    from scipy.optimize import linear_sum_assignment

    t = np.clip(np.asarray(truth, dtype=np.float64), 0.0, 1.0)
    g = np.clip(np.asarray(guess, dtype=np.float64), 0.0, 1.0)
    if t.shape != g.shape or t.ndim != 4:
        raise ValueError(f"truth {t.shape} and guess {g.shape} must both be [B, C, H, W]")
    n = t.shape[0]
    psnr = np.array([[_psnr(t[i], g[j]) for j in range(n)] for i in range(n)])
    finite = np.where(np.isinf(psnr), 1e6, psnr)
    rows, cols = linear_sum_assignment(-finite)
    order = tuple(int(c) for _, c in sorted(zip(rows, cols, strict=True)))
    return Similarity(
        psnr=float(np.mean([psnr[i, order[i]] for i in range(n)])),
        ssim=float(np.mean([_ssim(t[i], g[order[i]]) for i in range(n)])),
        order=order,
    )
