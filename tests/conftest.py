"""Shared fixtures: the real recordings in ../shared/realdata and small temporary data folders."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The folder of real recordings; a missing folder fails loudly instead of skipping tests."""
    if not (REALDATA / "README.md").is_file():
        pytest.fail(f"real recordings not found at {REALDATA}: these tests need ../shared/realdata "
                    "beside the project (it is there in CI and in the developers' checkout)")
    return REALDATA


@pytest.fixture(autouse=True)
def root_logging_restored():
    """A CLI `main()` called in-process may attach a handler to the stream the test captures (`logging.basicConfig`
    on capsys's stderr); once that stream is closed, every later log line of the session would print a
    '--- Logging error ---' traceback. Each test leaves the root logger's handlers and level as it found them."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


MISSING_DAY = "2026-01-03"


@pytest.fixture(scope="session")
def missing_day_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Issue 17's reproduction: a 7-day simulated folder (thin market: few trades, 30 s book steps, 20 levels,
    so it is quick) with the Trade and Orderbook files of MISSING_DAY removed."""
    import market_sim

    params = market_sim.MarketParams()._replace(hawkes_mu=0.02)
    folder = market_sim.simulate_run(days=7, seed=5, out=tmp_path_factory.mktemp("gap"), levels=20,
                                     book_interval="30s", params=params, progress=False).folder
    for path in [*folder.glob(f"Trade/*{MISSING_DAY}*"), *folder.glob(f"Orderbook/{MISSING_DAY}_*")]:
        path.unlink()
    return folder
