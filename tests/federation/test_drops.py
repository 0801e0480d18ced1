"""``--drop ID@ROUND[:STAGE]``: parsing, validation, and when a hospital is offline."""

from __future__ import annotations

import pytest

from fedcrypt.exceptions import ConfigError
from fedcrypt.federation.drops import Drop, check_drops, is_offline, parse_drop

SECAGG = ("advertise", "share", "masked_input", "unmask")


def test_parse() -> None:
    assert parse_drop("2@1:masked_input") == Drop(2, 1, "masked_input")
    assert parse_drop(" 0 @ 3 ") == Drop(0, 3, None)
    assert str(Drop(2, 1, "share")) == "2@1:share"
    for bad in ("2", "a@1", "1@0", "1@2:"):
        with pytest.raises(ConfigError, match="--drop"):
            parse_drop(bad)


def test_check_names_unknown_stage_hospital_round() -> None:
    check_drops([Drop(1, 2, "evaluate")], stages=("train",), hospitals=3, rounds=2)
    with pytest.raises(ConfigError, match="unknown stage 'share'"):
        check_drops([Drop(1, 1, "share")], stages=("train",), hospitals=3, rounds=2)
    with pytest.raises(ConfigError, match=r"outside 0\.\.2"):
        check_drops([Drop(3, 1)], stages=("train",), hospitals=3, rounds=2)
    with pytest.raises(ConfigError, match="only 2 rounds"):
        check_drops([Drop(0, 3)], stages=("train",), hospitals=3, rounds=2)


def test_offline_from_the_stage_to_the_end_of_the_round() -> None:
    drops = [Drop(2, 1, "masked_input")]
    kw = {"hospital": 2, "server_round": 1, "stages": SECAGG}
    assert not is_offline(drops, stage="advertise", **kw)  # type: ignore[arg-type]
    assert not is_offline(drops, stage="share", **kw)  # type: ignore[arg-type]
    assert is_offline(drops, stage="masked_input", **kw)  # type: ignore[arg-type]
    assert is_offline(drops, stage="unmask", **kw)  # type: ignore[arg-type]
    assert is_offline(drops, stage="evaluate", **kw)  # type: ignore[arg-type]
    assert not is_offline(drops, hospital=2, server_round=2, stage="share", stages=SECAGG)
    assert not is_offline(drops, hospital=1, server_round=1, stage="unmask", stages=SECAGG)
    whole = [Drop(0, 2)]
    assert is_offline(whole, hospital=0, server_round=2, stage="train", stages=("train",))
    assert is_offline(whole, hospital=0, server_round=2, stage="evaluate", stages=("train",))
