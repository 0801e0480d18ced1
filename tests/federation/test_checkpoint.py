"""Checkpoints: written atomically, read back exactly, refused when malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcrypt.config import RunConfig
from fedcrypt.exceptions import ConfigError
from fedcrypt.federation.checkpoint import read_checkpoint, write_checkpoint
from fedcrypt.report.records import RoundRecord


def _history(n: int) -> list[RoundRecord]:
    return [
        RoundRecord(round=i, loss=0.5 / i, auc=0.9, contributors=[0, 2], dropped={"1": "gone"})
        for i in range(1, n + 1)
    ]


def test_round_trip_and_replacement(tmp_path: Path) -> None:
    cfg = RunConfig.build(rounds=4, protection="plain", drop=["1@2"])
    write_checkpoint(
        tmp_path, config=cfg, server_round=1, aggregates={1: b"a1"}, history=_history(1), info={}
    )
    write_checkpoint(
        tmp_path,
        config=cfg,
        server_round=2,
        aggregates={2: b"a2"},
        history=_history(2),
        info={"parameters": 7},
    )
    ck = read_checkpoint(tmp_path)
    assert (ck.round, ck.aggregates, ck.info) == (2, {2: b"a2"}, {"parameters": 7})
    assert ck.config == cfg
    assert [r.round for r in ck.history] == [1, 2]
    assert ck.history[1].contributors == [0, 2] and ck.history[1].dropped == {"1": "gone"}
    assert not (tmp_path / "checkpoint" / "aggregate-1.bin").exists()  # superseded
    assert not list((tmp_path / "checkpoint").glob(".*"))  # no temporary files left


def test_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        read_checkpoint(tmp_path)
    cfg = RunConfig.build()
    write_checkpoint(
        tmp_path, config=cfg, server_round=1, aggregates={1: b"x"}, history=_history(1), info={}
    )
    state = tmp_path / "checkpoint" / "state.json"
    data = json.loads(state.read_text())
    data["round"] = 5
    state.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="does not match"):
        read_checkpoint(tmp_path)
    state.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_checkpoint(tmp_path)
