"""Integrity inside the ciphertext: reserved slots, keyed check values, round and run binding.

Every ciphertext of a format-2 HE message ends with three reserved slots::

    ..., count, updates, check

``count`` holds the hospital's example count ``n_i`` and ``updates`` the value 1, so the
decrypted aggregate carries ``Σ n_i`` and ``K`` in *every* ciphertext: the hospital
compares them with the (unauthenticated) header, and a server that rescales the model,
drops a hospital from some ciphertexts only, or edits the counts is caught. ``check`` is a
keyed linear function of all the other slots of its ciphertext; being linear, it survives
the server's additions, and the decrypting hospital recomputes it from the decrypted
slots:

* **BFV** (exact, modulo the plaintext prime ``t``): ``check_j = ρ_j · Σ_s r_s S_{j,s} mod t``
  with ``r ∈ Z_t^(N-1)`` and ``ρ_j ∈ Z_t`` derived from the secret key, the run and the
  round. A server that adds any plaintext offset ``δ ≠ 0`` (it can, homomorphically)
  passes only if ``δ_check = ρ_j ⟨r, δ⟩``, with probability ``1/t ≈ 2^-44`` since
  ``r, ρ`` stay encrypted; swapping ciphertexts fails (``ρ_j ≠ ρ_k``); a random
  corruption changes the decryption (see :class:`~fedcrypt.protection.he.seal.WordFormat`)
  and fails with the same probability.
* **CKKS** (approximate): ``check_j = Σ_s r_s y_{j,s} + κ_j`` with secret signs
  ``r_s = ±1/sqrt(S-1)`` and a secret offset ``κ_j`` with ``2^8 <= |κ_j| < 2^9``; the
  decrypted check must match ``Σ_s r_s Y_{j,s} + K κ_j`` within a tolerance derived from
  the scheme's error bound (:func:`float_tolerance`). A replayed or corrupted aggregate
  misses by about ``2^8`` or far more.

``r``, ``ρ`` and ``κ`` are derived with HKDF-SHA256 (RFC 5869) from the shared secret key,
the key context's fingerprint, the run id and the round number, and expanded with AES-256
in counter mode (NIST SP 800-38A): an aggregate of another round or run fails the check,
so a replayed older aggregate is refused even if its header is edited. The same binding
enters the AES-SIV associated data of the packed presets' step table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedcrypt.exceptions import ConfigError, IntegrityError, ReplayError

#: Format version of HE protected messages (header field ``format``). Version 1 (no
#: field) had no integrity slots, no round binding and full ciphertexts.
FORMAT = 2
#: Reserved slots at the end of every ciphertext: count, updates, check.
RESERVED = 3
#: Largest run id accepted (characters).
MAX_RUN_ID = 128
#: Hoeffding factor ``sqrt(2 ln(2/p))`` for the CKKS check tolerance, ``p = 2^-64``.
_HOEFFDING = math.sqrt(2.0 * 65.0 * math.log(2.0))
#: CKKS check offsets lie in ``±[2^8, 2^9)`` (value units).
KAPPA_BITS = 8


def derive(secret: bytes, *parts: str | bytes | int, length: int = 32) -> bytes:
    """HKDF-SHA256 of the secret-key material, with ``parts`` (length-prefixed) as ``info``."""
    info = bytearray(b"fedcrypt")
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        info += len(raw).to_bytes(4, "big") + raw
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=bytes(info)).derive(
        secret
    )


def keystream(key: bytes, nbytes: int) -> bytes:
    """``nbytes`` pseudo-random bytes: AES-256-CTR under ``key`` (zero IV) over zeros."""
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(nbytes)) + enc.finalize()


def check_run_id(run_id: str) -> str:
    """Validate a run id: at most :data:`MAX_RUN_ID` printable characters.

    Raises
    ------
    ConfigError
        If it is not a string or is too long or not printable.
    """
    if not isinstance(run_id, str) or len(run_id) > MAX_RUN_ID or not run_id.isprintable():
        raise ConfigError(
            f"run id must be a printable string of at most {MAX_RUN_ID} characters, got "
            f"{run_id!r:.40}"
        )
    return run_id


@dataclass
class RoundState:
    """What a hospital knows about where it is: run, round, label, rounding seed.

    Attributes
    ----------
    run_id : str
        The run or federation identity bound into every message ("" until set).
    round : int
        The round ``protect`` writes and ``unprotect`` accepts at most (0 until set).
    hospital : str or None
        This hospital's label (named in errors; with ``seed``, its rounding stream).
    seed : int or None
        Seed of reproducible stochastic rounding (None: fresh randomness).
    bound : bool
        Whether :meth:`set` was called (only then are rounds and runs enforced).
    last_round : int
        The highest round of an aggregate this hospital decrypted in this run.
    """

    run_id: str = ""
    round: int = 0
    hospital: str | None = None
    seed: int | None = None
    bound: bool = False
    last_round: int = field(default=-1)

    def set(
        self, run_id: str, round: int, *, hospital: str | None = None, seed: int | None = None
    ) -> None:
        """Bind the next messages to ``run_id`` and ``round`` (see the hospitals' ``set_round``).

        Raises
        ------
        ConfigError
            If the run id or round is invalid, or ``seed`` is given without ``hospital``.
        """
        check_run_id(run_id)
        if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < 2**31:
            raise ConfigError(f"round must be an integer in [0, 2^31), got {round!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if seed is not None and hospital is None:
            raise ConfigError(
                "a seeded rounding stream needs the hospital label, or every hospital "
                "would round with the same noise"
            )
        if hospital is not None and (not isinstance(hospital, str) or len(hospital) > 128):
            raise ConfigError("hospital label must be a string of at most 128 characters")
        if run_id != self.run_id:
            self.last_round = -1
        self.run_id, self.round, self.hospital, self.seed = run_id, round, hospital, seed
        self.bound = True

    def header_fields(self) -> dict[str, object]:
        """The binding as header fields of an upload."""
        out: dict[str, object] = {"run": self.run_id, "round": self.round}
        if self.hospital is not None:
            out["hospital"] = self.hospital
        return out

    def accept(self, run_id: str, round: int, *, expect_round: int | None) -> None:
        """Refuse an aggregate of another run, a future round, or a round older than one
        this hospital already decrypted (a replay); ``expect_round`` demands one round.

        Raises
        ------
        ReplayError
            Naming the rounds.
        """
        if expect_round is not None and round != expect_round:
            raise ReplayError(
                f"replay refused: the aggregate is from round {round}, expected round "
                f"{expect_round} (replayed or out of order)",
                round=round,
            )
        if not self.bound:
            return
        if run_id != self.run_id:
            raise ReplayError(
                f"replay refused (round {round}): the aggregate belongs to run {run_id!r}, "
                f"this hospital is in run {self.run_id!r}",
                round=round,
            )
        if round > self.round:
            raise ReplayError(
                f"replay refused: the aggregate claims round {round}, but this hospital is in "
                f"round {self.round}",
                round=round,
            )
        if round < self.last_round:
            raise ReplayError(
                f"replay refused (round {round}): an older aggregate was replayed (this "
                f"hospital already decrypted round {self.last_round})",
                round=round,
            )

    def accepted(self, round: int) -> None:
        """Record that the aggregate of ``round`` decrypted and verified."""
        self.last_round = max(self.last_round, round)

    def rng(self, secret: bytes, fingerprint: str) -> np.random.Generator:
        """The stochastic-rounding generator of this protect call.

        With a seed: PCG64 seeded from HKDF(secret key; fingerprint, run, round, hospital,
        seed), so a run repeats exactly and the server (without the secret key) cannot
        predict the noise. Without: 128 fresh bits from the OS.
        """
        if self.seed is None:
            return np.random.default_rng()
        key = derive(
            secret,
            "rounding/v2",
            fingerprint,
            self.run_id,
            self.round,
            self.hospital or "",
            self.seed,
        )
        return np.random.default_rng(int.from_bytes(key, "big"))


def _pieces(x: NDArray[np.uint64], pieces: int, width: int) -> list[NDArray[np.uint64]]:
    mask = np.uint64((1 << width) - 1)
    return [(x >> np.uint64(width * p)) & mask for p in range(pieces)]


def _piece_shape(t: int) -> tuple[int, int]:
    """Two pieces of at most 23 bits for ``t < 2^46``, else three of at most 20."""
    bits = t.bit_length()
    pieces = 2 if bits <= 46 else 3
    return pieces, -(-bits // pieces)


def split_mul(
    a: NDArray[np.uint64],
    b: NDArray[np.uint64],
    t: int,
    *,
    b_pieces: list[NDArray[np.uint64]] | None = None,
) -> list[int]:
    """Row-wise ``Σ_s a[j, s] b[s] mod t`` exactly, for ``a, b < t < 2^60``, rows < 2^16.

    Splits both factors into two (``t < 2^46``) or three pieces of at most 23 (20) bits so
    that every partial sum stays below ``2^64``; the pieces are recombined in Python
    integers, one per row. ``b_pieces`` may hold ``b``'s pieces, precomputed.
    """
    pieces, width = _piece_shape(t)
    a_parts = _pieces(a, pieces, width)
    b_parts = b_pieces if b_pieces is not None else _pieces(b, pieces, width)
    total = [0] * a.shape[0]
    for shift in range(2 * pieces - 1):
        acc = None
        for p in range(pieces):
            q = shift - p
            if 0 <= q < pieces:
                term = a_parts[p] @ b_parts[q]
                acc = term if acc is None else acc + term
        assert acc is not None
        scale = pow(2, width * shift, t)
        total = [(x + (int(v) % t) * scale) % t for x, v in zip(total, acc.tolist(), strict=True)]
    return total


class ModularCheck:
    """The BFV check values of one (run, round): ``ρ_j ⟨r, S_j⟩ mod t``.

    Parameters
    ----------
    key : bytes
        32 bytes from :func:`derive`.
    plain_modulus : int
        ``t``, below ``2^60``.
    slots : int
        Slots per ciphertext ``N``.
    ciphertexts : int
        ``C``.
    """

    def __init__(self, key: bytes, *, plain_modulus: int, slots: int, ciphertexts: int) -> None:
        if plain_modulus >= 1 << 60 or slots > 1 << 15:
            raise ValueError("the check arithmetic needs t < 2^60 and N <= 32768")
        self._t = int(plain_modulus)
        raw = np.frombuffer(keystream(key, 8 * (slots - 1 + ciphertexts)), dtype="<u8")
        # r over all N slots, 0 at the check slot itself (so rows are used whole)
        self._r = np.zeros(slots, dtype=np.uint64)
        self._r[: slots - 1] = raw[: slots - 1] % np.uint64(self._t)
        self._r_pieces = _pieces(self._r, *_piece_shape(self._t))
        self._rho = [int(v) % self._t or 1 for v in raw[slots - 1 :].tolist()]

    def tags(self, rows: NDArray[np.uint64]) -> list[int]:
        """Check values of ``rows`` (uint64 ``(C, N)``, reduced modulo ``t``; the last
        column, the check slot, is ignored)."""
        dots = split_mul(rows, self._r, self._t, b_pieces=self._r_pieces)
        return [(rho * d) % self._t for rho, d in zip(self._rho, dots, strict=True)]


class FloatCheck:
    """The CKKS check values of one (run, round): ``Σ_s r_s y_s + κ_j``.

    Parameters
    ----------
    key : bytes
        32 bytes from :func:`derive`.
    slots : int
        Slots per ciphertext ``S`` (``N/2``).
    ciphertexts : int
        ``C``.
    """

    def __init__(self, key: bytes, *, slots: int, ciphertexts: int) -> None:
        raw = np.frombuffer(keystream(key, (slots - 1) + 8 * ciphertexts), dtype=np.uint8)
        signs = np.where(raw[: slots - 1] & 1, 1.0, -1.0)
        self._r = signs / math.sqrt(slots - 1)
        k = np.frombuffer(raw[slots - 1 :].tobytes(), dtype="<u8")
        frac = (k >> np.uint64(12)).astype(np.float64) / float(1 << 52)  # [0, 1)
        sign = np.where(k & np.uint64(1), 1.0, -1.0)
        self.kappa = sign * np.ldexp(1.0 + frac, KAPPA_BITS)

    @property
    def weights(self) -> NDArray[np.float64]:
        """``r``, shape ``(S-1,)``: unit norm."""
        return self._r

    def tags(self, rows: NDArray[np.float64], *, updates: int = 1) -> NDArray[np.float64]:
        """``rows @ r + updates · κ`` (rows ``(C, S-1)``)."""
        return rows @ self._r + updates * self.kappa


def float_tolerance(slot_error: float, max_abs: float, slots: int) -> float:
    """How far a decrypted CKKS check may honestly miss its recomputed value.

    ``slot_error`` bounds each decrypted slot's error ``e_s`` (the sum, before dividing
    by the example count). The check slot carries its own ``e_c``, the recomputed value
    ``Σ r_s e_s``; since the secret signs are independent of the noise and ``||r||_2 =
    1``, Hoeffding bounds the latter by ``slot_error · sqrt(2 ln(2/p))`` with ``p =
    2^-64``. Double-precision rounding of the two dot products adds ``2 S 2^-53
    max_abs``.
    """
    return slot_error * (1.0 + _HOEFFDING) + 2.0 * slots * 2.0**-53 * max(max_abs, 1.0) + 2.0**-30


def integrity_error(
    message: str, *, round: int | None, hospital: str | None = None
) -> IntegrityError:
    """An :class:`IntegrityError` whose message names the round (and hospital, if known)."""
    where = f"round {round}" if round is not None else "unbound round"
    if hospital:
        where += f", hospital {hospital!r}"
    return IntegrityError(
        f"integrity check failed ({where}): {message}", round=round, hospital=hospital
    )
