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
        ({"protection": "plain", "encrypt_layers": "last"}, "encrypt-layers"),
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
