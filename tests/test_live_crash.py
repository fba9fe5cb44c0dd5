"""Crash test: SIGKILL the trading engine at seeded moments (10 kills) and restart it; after every restart's
reconciliation there are no orphan orders, no unprotected positions and no duplicated orders."""
from __future__ import annotations

from live_support import crash_test, make_market


def test_ten_seeded_kills_leave_no_orphans_unprotected_or_duplicates(tmp_path):
    market = make_market(tmp_path / "market")
    counts = crash_test(market, tmp_path / "run", kills=10, seed=13)
    assert counts["kills"] == 10 and counts["audits"] == 11
    assert counts["fills"] > 0, "the engine traded between kills"
    assert (counts["orphans"], counts["unprotected"], counts["duplicates"]) == (0, 0, 0), counts
