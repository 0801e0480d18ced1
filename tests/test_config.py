"""Run configuration: defaults, validation errors, and the Flower run_config round trip."""

from __future__ import annotations

import pytest

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError


def test_defaults_are_the_embedded_he_job() -> None:
    cfg = RunConfig.build()
    assert (cfg.dataset, cfg.protection, cfg.clients) == ("wdbc", "he", 3)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"clients": 0}, "clients"),
        ({"protection": "rsa"}, "protection"),
        ({"partition": "random"}, "partition"),
        ({"rounds": -1}, "rounds"),
        ({"unknown": 1}, "unknown"),
        ({"drop": ["1@x"]}, "drop"),
        ({"clients": 2, "min_hospitals": 3}, "min-hospitals"),
    ],
)
def test_invalid_values_raise_one_line_config_errors(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        RunConfig.build(**values)
    assert "\n" not in str(info.value)


def test_flower_run_config_round_trip() -> None:
    cfg = RunConfig.build(dataset="breastmnist", data_dir="/data", model="cnn", rounds=2)
    flat = cfg.to_flower()
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())
    assert RunConfig.from_flower({**flat, "server-key": "/k/server.key"}) == cfg


def test_ckks_is_a_deprecated_alias_of_he() -> None:
    with pytest.warns(FutureWarning, match="deprecated"):
        cfg = RunConfig.build(protection="ckks")
    assert cfg.protection == "he"


def test_encrypt_layers_only_with_a_layer_selecting_mode() -> None:
    from fedcrypt.federation.simulation import prepare_run

    with pytest.raises(ConfigError, match="encrypt-layers"):
        prepare_run(RunConfig.build(protection="plain", encrypt_layers="last"))


def test_drop_specs_round_trip_through_flower() -> None:
    cfg = RunConfig.build(drop=["1@2", "0@1:masked_input"], protection="secagg")
    assert RunConfig.from_flower(cfg.to_flower()).drop == ("1@2", "0@1:masked_input")
