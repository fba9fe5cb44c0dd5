"""live_dashboard.py and notifier.JournalWatcher over journals from a REAL engine run (issue 15's last point).

The engine runs in paper mode against paper_exchange.py on 127.0.0.1 with scripted probabilities (the
live-engine tests' helpers, tests/live_support.py) for a few bars and stops cleanly; the dashboard then
serves its logs/ and state/ folders and is read in real Chromium with tests/test_dashboard.py's helpers.
Meanwhile a JournalWatcher follows the same journals into tests/test_notifier.py's stub webhook server.
Expected figures are computed from the journals by DESIGN.md §3's field meanings, not by the dashboard.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from selenium.webdriver.support.ui import WebDriverWait

import notifier
from live_fixtures import start_dashboard, stop
from live_support import SYMBOL, busy_probabilities, engine_cmd, exchange, journal, make_market, run, write_model_dir
from test_dashboard import GREY, WAIT, browser, candles, clock_shown, expected_gauges, gauges, js, shown  # noqa: F401
from test_notifier import Stub, config

BARS = 10                                     # closed bars the engine runs for (--max-bars)
EXITS = {"tp", "sl", "time_exit", "kill_exit", "external"}   # DESIGN.md §3 trades events that close a position


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory: pytest.TempPathFactory):
    """The engine's working folder after a clean paper run, and the stub that the watcher sent to."""
    root = tmp_path_factory.mktemp("engine_run")
    market = make_market(root / "market")
    cwd = root / "run"
    cwd.mkdir()
    model = write_model_dir(cwd, **{"strategy.max_holding_bars": "2", "strategy.daily_loss_limit": "0.9"})
    probs = busy_probabilities(cwd / "p.csv")
    stub = Stub()
    watcher = notifier.JournalWatcher(notifier.Notifier(config(stub, cooldown_sec=0.0, cooldowns={})),
                                      cwd / "logs", cwd / "state", offline_sec=3600.0)
    watcher.start(0.1)  # before the engine: its journals are new files, read from their start
    try:
        with exchange(market) as ex:
            rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", str(BARS)),
                          cwd, timeout=120)
        assert rc == 0, out[-4000:]
        watcher.poll()
    finally:
        watcher.stop()
        stub.close()
    yield cwd, stub


def test_page_over_a_real_engine_run_shows_its_bars_trades_probabilities_and_mode(engine_run, browser) -> None:
    cwd, _ = engine_run
    signals, trades = journal(cwd, "signals"), journal(cwd, "trades")
    markers = sum(1 for t in trades if (t["event"] == "filled" and t["kind"] == "entry") or t["event"] in EXITS)
    assert len(signals) == BARS and markers >= 2, (len(signals), [t["event"] for t in trades])
    proc, url = start_dashboard(cwd, "--log-dir", str(cwd / "logs"), "--state-dir", str(cwd / "state"),
                                "--model-dir", str(cwd / "models_v9"), "--refresh-sec", "1")
    try:
        browser.get(url)
        WebDriverWait(browser, WAIT).until(lambda d: candles(d) == len(signals) and len(gauges(d)) == 4)
        assert gauges(browser) == expected_gauges(signals[-1])
        assert js(browser, "document.querySelectorAll('#candles .scatterlayer .point').length") == markers
        banner = js(browser, "document.getElementById('mode-banner').innerText")
        assert banner.startswith("PAPER") and "LIVE" not in banner
    finally:
        stop(proc)


def test_page_says_stopped_when_and_why_after_the_real_engine_s_clean_stop(engine_run, browser) -> None:
    """--max-bars reached: exit 0, and the engine's last heartbeat says so (`exit_code`, `stop_reason`); the page
    shows STOPPED with its time and reason, not ENGINE OFFLINE, once the heartbeat is past the offline limit."""
    cwd, _ = engine_run
    beat = json.loads((cwd / "state" / f"heartbeat_{SYMBOL}.json").read_text())
    assert (beat["exit_code"], beat["stop_reason"]) == (0, f"--max-bars {BARS} reached"), beat
    shutdown = journal(cwd, "events")[-1]
    assert (shutdown["event"], shutdown["exit_code"], shutdown["reason"]) == ("shutdown", 0, beat["stop_reason"])
    proc, url = start_dashboard(cwd, "--log-dir", str(cwd / "logs"), "--state-dir", str(cwd / "state"),
                                "--model-dir", str(cwd / "models_v9"), "--refresh-sec", "0.5",
                                "--notify-offline-sec", "0.5")
    try:
        browser.get(url)
        when = clock_shown(datetime.fromtimestamp(beat["ts"] / 1000, timezone.utc), datetime.now(timezone.utc))
        expected = (f"STOPPED {when} (--max-bars {BARS} reached)", GREY)
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "engine-state") == expected)
        assert "OFFLINE" not in js(browser, "document.getElementById('engine-status').innerText")
    finally:
        stop(proc)


def test_notifier_sends_the_real_engine_s_startup_and_shutdown_once(engine_run) -> None:
    cwd, stub = engine_run
    kinds = [e["event"] for e in journal(cwd, "events")]
    assert kinds.count("startup") == 1 and kinds.count("shutdown") == 1, kinds
    titles = [e["title"].split(": ")[-1] for e in stub.discord_embeds()]
    assert titles.count("started") == 1 and titles.count("stopped") == 1, titles
    text = stub.telegram_text()
    assert text.count(": started\n") == 1 and text.count(": stopped\n") == 1, text
