"""Tests for CKKS presets and the 128-bit security check."""

from __future__ import annotations

import pytest

from fedcrypt.exceptions import ConfigError, InsecureParametersError
from fedcrypt.protection.he.params import (
    DEFAULT_PRESET,
    HE_STANDARD_128,
    PRESETS,
    HEPreset,
    check_security,
    get_preset,
)


def test_table_matches_he_standard() -> None:
    assert HE_STANDARD_128 == {
        1024: 27,
        2048: 54,
        4096: 109,
        8192: 218,
        16384: 438,
        32768: 881,
    }


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_secure(name: str) -> None:
    p = PRESETS[name]
    check_security(p.poly_modulus_degree, p.coeff_mod_bit_sizes)
    assert p.capacity_bits > 0
    assert get_preset(name) is p


def test_required_presets_exist() -> None:
    assert DEFAULT_PRESET in PRESETS
    heavy = PRESETS["paper-heavy"]
    assert heavy.poly_modulus_degree == 32768
    assert heavy.coeff_mod_bit_sizes == (60, *([40] * 8), 60)
    assert heavy.scale_bits == 40
    nv = PRESETS["nvflare"]
    assert (nv.poly_modulus_degree, nv.coeff_mod_bit_sizes, nv.scale_bits) == (
        8192,
        (60, 40, 40),
        40,
    )
    assert "paper-light" in PRESETS


@pytest.mark.parametrize(
    ("n", "bits"), [(4096, [60, 50]), (8192, [60, 60, 60, 40]), (2048, [30, 30]), (1024, [28])]
)
def test_insecure_refused(n: int, bits: list[int]) -> None:
    with pytest.raises(InsecureParametersError, match="128-bit"):
        check_security(n, bits)


def test_boundaries_accepted() -> None:
    check_security(4096, [60, 49])
    check_security(8192, [60, 60, 60, 38])
    check_security(32768, [60] * 14 + [41])


def test_bad_degree_and_primes() -> None:
    with pytest.raises(InsecureParametersError):
        check_security(3000, [40])
    with pytest.raises(ConfigError, match="60"):
        check_security(16384, [61, 40])
    with pytest.raises(ConfigError):
        check_security(4096, [])


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_preset("nope")
    for name in PRESETS:
        assert name in str(info.value)


def test_custom_preset() -> None:
    p = get_preset("custom:8192:60,40,40:40")
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits) == (8192, (60, 40, 40), 40)
    with pytest.raises(InsecureParametersError):
        get_preset("custom:4096:60,60:40")
    with pytest.raises(ConfigError):
        get_preset("custom:4096:60,49:58")  # no room for values


def test_dict_round_trip() -> None:
    for p in PRESETS.values():
        assert HEPreset.from_dict(p.to_dict()) == p
    bad = PRESETS["fast"].to_dict() | {"coeff_mod_bit_sizes": [60, 60]}
    with pytest.raises(InsecureParametersError):
        HEPreset.from_dict(bad)
    with pytest.raises(ConfigError):
        HEPreset.from_dict({"name": "x"})


def test_default_is_packed_bfv() -> None:
    p = PRESETS[DEFAULT_PRESET]
    assert p.is_packed and p.encoding == "bfv-packed"
    assert p.slots == p.poly_modulus_degree  # BFV batching: N slots
    packing = p.packing()
    assert packing.fields * packing.field_bits <= p.plain_modulus_bits - 1
    assert p.calibration_packing().fields == 1
    assert p.max_weighted_abs > 1e6  # calibration round range per hospital


def test_bfv_preset_validation() -> None:
    base = PRESETS[DEFAULT_PRESET].to_dict()
    with pytest.raises(ConfigError):
        HEPreset.from_dict(base | {"plain_modulus_bits": 60})  # not below the data prime
    with pytest.raises(ConfigError):
        HEPreset.from_dict(base | {"fields_per_slot": 5})  # 8-bit fields: no room
    with pytest.raises(ConfigError):
        HEPreset.from_dict(base | {"encoding": "bgv"})
    with pytest.raises(InsecureParametersError):
        HEPreset.from_dict(base | {"coeff_mod_bit_sizes": [60, 50]})
