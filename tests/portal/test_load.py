"""The bounded load test: 20 hospitals upload at once; nothing is lost, memory stays bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcrypt.portal.loadtest import run_load_test

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_twenty_hospitals_upload_at_once(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    db_url = None if database == "sqlite" else str(request.getfixturevalue("fresh_postgres"))
    result = run_load_test(
        tmp_path, hospitals=20, values=1 << 20, db_url=db_url, aggregate_batch_mb=8
    )
    assert result.database == database
    assert result.stored == 20 and result.lost == 0
    assert result.aggregated_updates == 20 and result.aggregate_exact
    # 160 MiB arrive at once; the server streams them to disk and adds them one at a time
    # to the running aggregate: its peak depends on one update's size, not on 20 of them
    bound = 8 * result.update_bytes + (32 << 20)
    assert result.peak_growth_bytes < bound < result.total_bytes, result.summary()
