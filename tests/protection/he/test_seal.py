"""The SEAL layer: seeded ciphertexts, their wire form, seed expansion, key reloading."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from fedcrypt.exceptions import KeyMaterialError
from fedcrypt.protection.he.seal import (
    MIX,
    SEED_BYTES,
    BFVContext,
    CKKSContext,
    Sealed,
    WordFormat,
    public_word_format,
    seal_frame,
    seal_payload,
)


@pytest.fixture(scope="module")
def bfv() -> BFVContext:
    return BFVContext.generate(4096, (60, 49), 45)


def _signed(u: np.ndarray, t: int) -> np.ndarray:
    v = u.astype(np.int64)
    return np.where(v > t // 2, v - t, v)


def test_seeded_ciphertext_is_half_a_full_one(bfv: BFVContext) -> None:
    """c0 in 7.5 bytes per coefficient plus a 64-byte seed: 30,784 bytes at N=4096."""
    fmt = bfv.word_format
    assert fmt.widths == (60,)
    sealed = bfv.encrypt(np.zeros((1, 4096), dtype=np.int64))
    assert len(fmt.pack(sealed.c0)) + sealed.seeds.size == 30_720 + SEED_BYTES
    assert sealed.seeds.shape == (1, 1, SEED_BYTES)


def test_sums_decrypt_exactly(bfv: BFVContext) -> None:
    """The server's sum (c0 modulo q in NumPy, seeds kept) decrypts to the slot sums."""
    rng = np.random.default_rng(0)
    t = bfv.plain_modulus
    rows = [rng.integers(-(2**40), 2**40, (3, 4096)) for _ in range(4)]
    sealed = [bfv.encrypt(r) for r in rows]
    pub = bfv.public().word_format
    acc = pub.unpack(pub.pack(sealed[0].c0), 3)
    for s in sealed[1:]:
        pub.add(acc, pub.unpack(pub.pack(s.c0), 3))
    total = Sealed(acc, np.concatenate([s.seeds for s in sealed]))
    np.testing.assert_array_equal(_signed(bfv.decrypt(total), t), sum(rows))


def test_noise_budget_lasts_for_64_hospitals(bfv: BFVContext) -> None:
    vals = np.arange(4096, dtype=np.int64) - 2048
    one = bfv.encrypt(vals[None, :])
    fmt = bfv.word_format
    acc = one.c0.copy()
    seeds = [one.seeds]
    for _ in range(63):
        s = bfv.encrypt(vals[None, :])
        fmt.add(acc, s.c0)
        seeds.append(s.seeds)
    total = Sealed(acc, np.concatenate(seeds))
    assert bfv.noise_budget(total, 0) >= 2
    np.testing.assert_array_equal(_signed(bfv.decrypt(total), bfv.plain_modulus)[0], vals * 64)


def test_every_flipped_byte_changes_the_decryption(bfv: BFVContext) -> None:
    """The mixed storage spreads any flipped stored bit over the coefficient's high bits:
    a flip is never absorbed by the noise (or the coefficient leaves its range)."""
    rows = np.random.default_rng(1).integers(0, 1000, (1, 4096))
    sealed = bfv.encrypt(rows)
    fmt = bfv.word_format
    data = fmt.pack(sealed.c0)
    positions = np.random.default_rng(2).choice(len(data), 60, replace=False).tolist()
    positions += [0, 1, 6, 7, 7 * 4096, len(data) - 1]  # low bytes, the nibble bytes
    for pos in positions:
        for flip in (0x01, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= flip
            try:
                words = fmt.unpack(bytes(bad), 1)
            except ValueError:
                continue  # out of range: refused before decryption
            got = _signed(bfv.decrypt(Sealed(words, sealed.seeds)), bfv.plain_modulus)
            assert not np.array_equal(got, rows), f"flip {flip:#x} at byte {pos} went unnoticed"


def test_word_format_rejects_out_of_range_and_bad_lengths() -> None:
    fmt = WordFormat(8, (1152921504606830593, 1099510890497))
    assert fmt.widths == (60, 40)
    assert fmt.poly_bytes == 8 * 60 // 8 + 8 * 5
    words = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], dtype=np.uint64)
    assert np.array_equal(fmt.unpack(fmt.pack(words), 1), words)
    with pytest.raises(ValueError, match="bytes"):
        fmt.unpack(fmt.pack(words)[:-1], 1)
    # a stored word that unmixes to >= q is refused, naming the ciphertext
    q = fmt.moduli[1]
    bad = words.copy()
    bad[0, 8] = q  # not reduced
    with pytest.raises(ValueError, match="ciphertext 0"):
        fmt.unpack(fmt.pack(bad), 1)
    assert MIX % 2 == 1


def test_keys_reload_and_public_context(bfv: BFVContext) -> None:
    again = BFVContext(bfv.params_bytes, secret_key=bfv.secret_key_bytes())
    assert again.secret_material() == bfv.secret_material()
    sealed = bfv.encrypt(np.ones((1, 4096), dtype=np.int64))
    np.testing.assert_array_equal(again.decrypt(sealed), np.ones((1, 4096)))
    pub = bfv.public()
    assert not pub.is_private()
    with pytest.raises(KeyMaterialError):
        pub.decrypt(sealed)
    with pytest.raises(KeyMaterialError):
        pub.encrypt(np.zeros((1, 4096), dtype=np.int64))
    with pytest.raises(KeyMaterialError):
        pub.secret_material()
    with pytest.raises(KeyMaterialError):
        BFVContext(b"not parameters")
    other = BFVContext.generate(4096, (60, 49), 45)
    with pytest.raises(KeyMaterialError):
        BFVContext(bfv.params_bytes, secret_key=b"garbage")
    # a key of other parameters does not load
    small = BFVContext.generate(2048, (54,), 20)
    with pytest.raises(KeyMaterialError):
        BFVContext(other.params_bytes, secret_key=small.secret_key_bytes())


def test_seal_frames() -> None:
    header, payload = seal_payload(
        seal_frame(b"\x5e\xa1\x10\x04\x03\x02\x00\x00" + bytes(8), b"xyz")
    )
    assert payload == b"xyz" and header[5] == 0
    for bad in (b"", b"\x00" * 20):
        with pytest.raises(ValueError):
            seal_payload(bad)


def test_ckks_seeded_round_trip() -> None:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        4096,
        coeff_mod_bit_sizes=[60, 49],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ck = CKKSContext(ctx, scale_bits=26)
    x = np.random.default_rng(3).normal(0, 1, (2, 2048))
    sealed = ck.encrypt(x)
    a = ck.encrypt(x)
    fmt = public_word_format(ctx)
    assert fmt == ck.word_format
    acc = sealed.c0.copy()
    fmt.add(acc, a.c0)
    got = ck.decrypt(Sealed(acc, np.concatenate([sealed.seeds, a.seeds])))
    np.testing.assert_allclose(got, 2 * x, atol=1e-4)
    assert len(fmt.pack(sealed.c0)) / 2 + SEED_BYTES < 31_000  # vs 65,659 unseeded
    public = ts.context_from(ctx.serialize(save_secret_key=False))
    with pytest.raises(KeyMaterialError):
        CKKSContext(public, scale_bits=26).decrypt(sealed)
