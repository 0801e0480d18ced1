"""Error bounds of one HE aggregation, per value of the decrypted FedAvg mean, per tensor kind.

Per tensor kind (``fedcrypt.protection.flatten.TensorSpec.kind``), for an aggregate of
``K`` updates over ``Σ n_i`` examples (see :func:`value_bounds`):

============== ============================================ ==============================
kind           bfv-packed (``packed``, ``compact``)          ckks-float (``fast``, ...)
============== ============================================ ==============================
weight, bias,  ``K δ_b / Σ n_i``, ``δ_b`` the step of the    ``E_slot / Σ n_i`` (same for
bn_mean, float value's block (64 values of one tensor):      every kind)
               ``2^-scale_bits`` in the calibration round,
               ``2^(ceil(log2 m_b) + margin + shift)`` after
               (``m_b`` the block's max ``|g|`` in the global
               model); about ``K 2^-17 m_b`` for ``packed``
bn_var         as above, and never negative: each            as above, clamped at 0
               hospital's integers are ``SR(y) >= 0``        (clamping a value whose true
               for ``y >= 0``, so their sum is too           FedAvg is ``>= 0`` never
                                                             increases its error)
integer        0: exact (sent as whole integers in slots     ``E_slot / Σ n_i`` (``≪ 0.5``)
               of their own); ``unflatten`` then rounds the
               mean as plain FedAvg does
============== ============================================ ==============================

Both assume that no value was clipped (``|x| <= 2^margin 2^ceil(log2 m_b)``; counted in
``BFVHospital.last_clipped``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcrypt.protection.he.params import HEPreset
from fedcrypt.protection.he.quantize import QuantPlan, calibrate

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
    ``δ = 2^-scale_bits``. Calibrated rounds: ``δ_b = 2^(ceil(log2 m_b) + margin) 2^growth M
    / (2^(w-1) - 1 - K_max)`` (rounded up to a float32) with ``m_b <= max_abs`` the global model's
    block maximum and ``M`` the reference aggregate's example count
    (:func:`~fedcrypt.protection.he.quantize.calibrate`). The bound returned is the larger
    of the two (valid in any round), and assumes no value was clipped (``|x| <= 2^margin
    m_b``; see ``BFVHospital.last_clipped``). Per value and per tensor kind:
    :func:`value_bounds`.

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
        cap = max(1, m) << preset.growth_bits
        mant, exp = math.frexp(max_abs)
        clip = math.ldexp(1.0, (exp - 1 if mant == 0.5 else exp) + preset.margin_bits)
        step = float(np.nextafter(np.float32(clip * cap / room), np.float32(np.inf)))
        return max(wide, k * step / n_total)
    n = preset.poly_modulus_degree
    log_term = math.log(2.0) * (1 - BOUND_FAILURE_LOG2)  # ln(2/p), p = 2^BOUND_FAILURE_LOG2
    scaled = k * n / 2 + NOISE_COEFF_MAX * math.sqrt(2.0 * k * n * log_term)
    fft = 2.0 * math.log2(n) * math.sqrt(n / 2) * 2.0**-53 * max_abs
    return math.ldexp(scaled, -preset.scale_bits) / n_total + fft


def ckks_slot_error(preset: HEPreset, *, num_hospitals: int, max_abs: float) -> float:
    """Bound on each decrypted slot of a sum of ``K`` fresh CKKS ciphertexts (sum units).

    ``(K N/2 + B sqrt(2 K N ln(2/p))) / Δ + 2 log2(N) sqrt(N/2) 2^-53 max_abs`` with
    ``B = 21``, ``p = 2^-64`` (see :func:`error_bound`); ``max_abs`` bounds the summed
    slots' magnitude.
    """
    n = preset.poly_modulus_degree
    k = max(1, int(num_hospitals))
    log_term = math.log(2.0) * (1 - BOUND_FAILURE_LOG2)
    scaled = k * n / 2 + NOISE_COEFF_MAX * math.sqrt(2.0 * k * n * log_term)
    fft = 2.0 * math.log2(n) * math.sqrt(n / 2) * 2.0**-53 * max_abs
    return math.ldexp(scaled, -preset.scale_bits) + fft


def value_bounds(
    preset: HEPreset,
    plan: QuantPlan,
    *,
    num_hospitals: int,
    total_examples: int,
    reference: NDArray[np.floating] | None = None,
    reference_examples: int | None = None,
    max_abs: float | None = None,
) -> NDArray[np.float64]:
    """Bound on ``|decrypted mean - exact FedAvg mean|`` for every value, shape ``(P,)``.

    Parameters
    ----------
    preset : HEPreset
        The parameters.
    plan : QuantPlan
        The update's plan (``QuantPlan.of(layout)``).
    num_hospitals : int
        ``K``.
    total_examples : int
        ``Σ n_i``.
    reference : numpy.ndarray, optional
        bfv-packed: the global model the round was calibrated on (float64 ``(P,)``);
        ``None`` for the calibration round.
    reference_examples : int, optional
        ``M``, that model's example count (default: ``total_examples``).
    max_abs : float, optional
        ckks-float: the largest ``|n_i x|`` of any update (default: ``total_examples``
        times 1000; it enters only the FFT term).

    Raises
    ------
    ValueError
        If ``num_hospitals`` < 1 or ``total_examples`` < ``num_hospitals``.
    """
    k, n_total = int(num_hospitals), int(total_examples)
    if k < 1 or n_total < k:
        raise ValueError("need num_hospitals >= 1 and total_examples >= num_hospitals")
    out = np.empty(plan.size, dtype=np.float64)
    if not preset.is_packed:
        peak = 1000.0 * n_total if max_abs is None else float(max_abs) * k
        out[:] = ckks_slot_error(preset, num_hospitals=k, max_abs=peak) / n_total
        return out
    qidx = plan.quantized_index
    if reference is None:
        out[qidx] = k * math.ldexp(1.0, -preset.scale_bits) / n_total
    else:
        ref = np.asarray(reference, dtype=np.float64)
        cal = calibrate(
            ref[qidx],
            block_lengths=plan.block_lengths,
            reference_examples=n_total if reference_examples is None else reference_examples,
            packing=preset.packing(),
            margin_bits=preset.margin_bits,
            growth_bits=preset.growth_bits,
            max_hospitals=preset.max_hospitals,
        )
        out[qidx] = k * np.asarray(cal.steps.per_value(qidx.size)) / n_total
    out[plan.exact_index] = 0.0
    return out


@dataclass(frozen=True)
class TensorBound:
    """The error bound of one tensor of an aggregation.

    Attributes
    ----------
    name : str
        ``state_dict`` name.
    kind : str
        :attr:`fedcrypt.protection.flatten.TensorSpec.kind`.
    bound : float
        Largest per-value bound over the tensor (absolute, in the tensor's units).
    exact : bool
        Whether the tensor is aggregated exactly (bfv-packed integer buffers).
    non_negative : bool
        Whether the decoded values are guaranteed ``>= 0`` (``running_var``).
    """

    name: str
    kind: str
    bound: float
    exact: bool
    non_negative: bool


def tensor_bounds(preset: HEPreset, layout: Any, **kwargs: Any) -> list[TensorBound]:
    """:func:`value_bounds` summarized per tensor of ``layout`` (same keyword arguments)."""
    plan = QuantPlan.of(layout)
    bounds = value_bounds(preset, plan, **kwargs)
    out = []
    for spec in layout.tensors:
        b = bounds[spec.offset : spec.offset + spec.numel]
        kind = spec.kind
        out.append(
            TensorBound(
                name=spec.name,
                kind=kind,
                bound=float(b.max()),
                exact=preset.is_packed and kind == "integer",
                non_negative=kind == "bn_var",
            )
        )
    return out
