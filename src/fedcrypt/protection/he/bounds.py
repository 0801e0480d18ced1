"""Error bounds of one HE aggregation, per value of the decrypted FedAvg mean."""

from __future__ import annotations

import math

from fedcrypt.protection.he.params import HEPreset

#: SEAL samples fresh noise from a centred binomial distribution with σ = 3.2 (SEAL ≥ 3.6;
#: earlier versions: a normal clipped at 6σ = 19.2); every coefficient is at most 21.
NOISE_COEFF_MAX = 21.0
#: Per-slot failure probability used in the high-probability error bound (2^-64 per slot
#: keeps the union over any model below 2^-40).
BOUND_FAILURE_LOG2 = -64


def error_bound(
    preset: HEPreset,
    *,
    num_hospitals: int,
    max_abs: float,
    total_examples: int | None = None,
    reference_examples: int | None = None,
) -> float:
    """Absolute error bound on each value of the decrypted FedAvg mean (one aggregation).

    **ckks-float** (Cheon et al. 2017, "Homomorphic Encryption for Arithmetic of
    Approximate Numbers"; SEAL's noise distribution). Hospital ``i`` encodes ``n_i x_i``
    as ``m_i = round(Δ · FFT⁻¹(n_i x_i))``: each of the ``N`` coefficients is rounded by at
    most 1/2, so a slot (an evaluation at a root of unity, ``|ζ| = 1``) is off by at most
    ``N/2``. Symmetric encryption adds a fresh error polynomial whose ``N`` coefficients
    are independent, centred and bounded by ``B = 21``; over the ``K`` summed ciphertexts
    the slot error is a sum of ``K N`` such terms, which by Hoeffding exceeds
    ``B sqrt(2 K N ln(2/p))`` with probability below ``p = 2^-64``. Adding ciphertexts
    adds errors (depth 0), so the sum is off by at most ``E = (K N/2 + B sqrt(2 K N
    ln(2/p))) / Δ`` and the mean (divided by ``n = Σ n_i >= K``) by ``E / n``, plus the
    double-precision FFTs' ``2 log2(N) sqrt(N/2) 2^-53 max_abs``.

    **bfv-packed**. BFV decrypts sums exactly (while the noise budget lasts), so the only
    error is quantization: each hospital's stochastic rounding is off by less than one
    step ``δ``, and the mean by less than ``K δ / n``. Calibration round:
    ``δ = 2^-scale_bits``. Calibrated rounds: ``δ_b = 2^(ceil(log2 m_b) + margin +
    shift)`` with ``m_b <= max_abs`` the global model's block maximum and ``shift`` the
    smallest integer with ``2^growth M 2^-shift <= 2^(w-1) - 1 - K_max``, ``M`` the
    reference aggregate's example count (:func:`~fedcrypt.protection.he.quantize.calibrate`).
    The bound returned is the larger of the two (valid in any round), and assumes no
    value was clipped
    (``|x| <= 2^margin · m_b``; see ``CKKSHospital.last_clipped``).

    Parameters
    ----------
    preset : HEPreset
        The parameters.
    num_hospitals : int
        ``K``, updates in the aggregate.
    max_abs : float
        Largest ``|value|`` in any hospital's (unweighted) update.
    total_examples : int, optional
        ``n = Σ n_i``; if omitted the worst case ``K`` (one example per hospital).
    reference_examples : int, optional
        ``M`` (bfv-packed): the previous aggregate's example count; defaults to
        ``total_examples`` (the same hospitals as last round).

    Returns
    -------
    float
        Bound on ``|decrypted mean - exact FedAvg mean|`` per value.

    Raises
    ------
    ValueError
        If ``num_hospitals`` < 1, ``max_abs`` < 0 or ``total_examples`` < ``num_hospitals``.
    """
    if num_hospitals < 1:
        raise ValueError(f"num_hospitals must be >= 1, got {num_hospitals}")
    if not max_abs >= 0:
        raise ValueError(f"max_abs must be >= 0, got {max_abs}")
    n_total = num_hospitals if total_examples is None else int(total_examples)
    if n_total < num_hospitals:
        raise ValueError("total_examples must be >= num_hospitals (each n_i >= 1)")
    k = num_hospitals
    if preset.is_packed:
        wide = k * math.ldexp(1.0, -preset.scale_bits) / n_total
        if max_abs == 0:
            return wide
        m = n_total if reference_examples is None else int(reference_examples)
        room = preset.packing().bound - preset.max_hospitals
        cap = m << preset.growth_bits
        shift = 0
        while math.ldexp(cap, -shift) > room:
            shift += 1
        while shift > -64 and math.ldexp(cap, -(shift - 1)) <= room:
            shift -= 1
        mant, exp = math.frexp(max_abs)
        cl2 = exp - 1 if mant == 0.5 else exp
        step = math.ldexp(1.0, cl2 + preset.margin_bits + shift)
        return max(wide, k * step / n_total)
    n = preset.poly_modulus_degree
    log_term = math.log(2.0) * (1 - BOUND_FAILURE_LOG2)  # ln(2/p), p = 2^BOUND_FAILURE_LOG2
    scaled = k * n / 2 + NOISE_COEFF_MAX * math.sqrt(2.0 * k * n * log_term)
    fft = 2.0 * math.log2(n) * math.sqrt(n / 2) * 2.0**-53 * max_abs
    return math.ldexp(scaled, -preset.scale_bits) / n_total + fft
