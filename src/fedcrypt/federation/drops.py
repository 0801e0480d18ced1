"""Simulated dropouts: ``--drop ID@ROUND[:STAGE]`` takes hospital ID offline at that point.

For tests and demonstrations of dropout tolerance. Hospital ``ID`` stops answering at
``STAGE`` of round ``ROUND`` (default: the round's first stage) and stays offline for the
rest of that round, evaluation included; it rejoins the next round from the aggregate.
Stages are the protection mode's own (``train`` for ``plain``/``he``; ``advertise``,
``share``, ``masked_input``, ... for ``secagg``), then ``evaluate``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedcrypt.exceptions import ConfigError

EVALUATE = "evaluate"
_SPEC = re.compile(r"^\s*(\d+)\s*@\s*(\d+)\s*(?::\s*([a-z_]+)\s*)?$")


class HospitalOffline(RuntimeError):  # noqa: N818 - it is a simulated condition, not a bug
    """Raised inside a hospital's handler to simulate it going offline (``--drop``)."""


@dataclass(frozen=True)
class Drop:
    """One simulated dropout.

    Attributes
    ----------
    hospital : int
        Hospital index.
    round : int
        1-based round.
    stage : str or None
        Stage it stops answering at; None for the round's first stage.
    """

    hospital: int
    round: int
    stage: str | None = None

    def __str__(self) -> str:
        return f"{self.hospital}@{self.round}" + (f":{self.stage}" if self.stage else "")


def parse_drop(spec: str) -> Drop:
    """Parse ``ID@ROUND[:STAGE]``.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If ``spec`` is malformed or the round is 0.
    """
    m = _SPEC.match(str(spec))
    if m is None:
        raise ConfigError(f"--drop {spec!r}: expected ID@ROUND[:STAGE], e.g. 2@1:masked_input")
    rnd = int(m.group(2))
    if rnd < 1:
        raise ConfigError(f"--drop {spec!r}: rounds count from 1")
    return Drop(hospital=int(m.group(1)), round=rnd, stage=m.group(3))


def check_drops(
    drops: Iterable[Drop], *, stages: Sequence[str], hospitals: int, rounds: int
) -> None:
    """Refuse drops naming an unknown stage, hospital or round.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        Naming the offending ``--drop``.
    """
    known = (*stages, EVALUATE)
    for d in drops:
        if d.stage is not None and d.stage not in known:
            raise ConfigError(f"--drop {d}: unknown stage {d.stage!r}; stages: {', '.join(known)}")
        if not 0 <= d.hospital < hospitals:
            raise ConfigError(f"--drop {d}: hospital {d.hospital} is outside 0..{hospitals - 1}")
        if d.round > rounds:
            raise ConfigError(f"--drop {d}: the run has only {rounds} rounds")


def is_offline(
    drops: Iterable[Drop], *, hospital: int, server_round: int, stage: str, stages: Sequence[str]
) -> bool:
    """Whether ``hospital`` is offline at ``stage`` of ``server_round``."""
    order = (*stages, EVALUATE)
    at = order.index(stage) if stage in order else 0
    for d in drops:
        if d.hospital != hospital or d.round != server_round:
            continue
        start = 0 if d.stage is None else order.index(d.stage)
        if at >= start:
            return True
    return False
