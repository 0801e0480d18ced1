"""The capability table agrees with the protection registry's own claims (DESIGN.md §2)."""

from __future__ import annotations

from fedcrypt.privacy.capabilities import CAPABILITIES, PARTIES, capability_rows
from fedcrypt.protection.registry import SCHEMES


def test_every_mode_has_a_row_per_party() -> None:
    for name in SCHEMES:
        assert {c.party for c in CAPABILITIES if c.mode == name} == set(PARTIES), name


def test_server_rows_match_what_each_scheme_says_the_server_sees() -> None:
    for name, scheme in SCHEMES.items():
        (row,) = [c for c in CAPABILITIES if c.mode == name and c.party == "server"]
        assert row.individual_update.startswith("yes") == scheme.server_sees_updates, name
        assert row.aggregate.startswith("yes") == scheme.server_sees_aggregate, name


def test_rows_are_json_ready() -> None:
    rows = capability_rows()
    assert len(rows) == len(CAPABILITIES)
    assert all(
        set(r) == {"mode", "party", "individual_update", "aggregate", "membership"} for r in rows
    )
