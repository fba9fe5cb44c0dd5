"""live_dashboard.py in a real browser (Debian chromium + chromedriver via selenium) over DESIGN §3 files,
the incremental journal reader it shares with the notifier, and the server's bind/auth rules.

The app runs as a real child process on a free 127.0.0.1 port; the page is read the way a trader reads
it (candles drawn, marker points, gauge numbers, banner text), and a full-page screenshot is saved in
pytest's temporary folder (`<basetemp>/dashboard_artifacts/dashboard.png`).
"""
from __future__ import annotations

import base64
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

import live_dashboard
from journal_tail import JournalTail
from live_fixtures import BAR, append, equity_record, signal_record, stamp, start_dashboard, stop, write_live_fixture, \
    write_state

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 90  # seconds a page may take on a loaded 2-core machine; the waits end as soon as the page is right
PROBS = ("p_exec_long", "p_exec_short", "p_dir_long", "p_dir_short")


# ---------------------------------------------------------------- the incremental reader
def test_reader_returns_only_appended_lines_and_holds_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "signals_X.jsonl"
    tail = JournalTail(path)
    assert tail.read_new() == []  # not created yet
    append(path, [{"i": 0}, {"i": 1}], torn='{"i": 2, "half')
    assert [r["i"] for r in tail.read_new()] == [0, 1]
    assert tail.read_new() == []  # the torn tail is not parsed, not skipped
    with open(path, "a") as fh:
        fh.write('": 1}\n{"i": 3}\n')
    assert [(r["i"], r.get("half")) for r in tail.read_new()] == [(2, 1), (3, None)]
    assert tail.bad_lines == 0


def test_reader_follows_rotation_without_losing_the_old_file_s_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "events_X.jsonl"
    append(path, [{"i": 0}])
    tail = JournalTail(path)
    assert [r["i"] for r in tail.read_new()] == [0]
    append(path, [{"i": 1}])  # written after our last read, then the file is rotated away
    path.rename(tmp_path / "events_X.jsonl.1")
    append(path, [{"i": 2}])
    assert [r["i"] for r in tail.read_new()] == [1, 2]
    append(path, [{"i": 3}])
    assert [r["i"] for r in tail.read_new()] == [3]


def test_reader_starts_again_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "equity_X.jsonl"
    append(path, [{"i": i} for i in range(5)])
    tail = JournalTail(path)
    assert len(tail.read_new()) == 5
    with open(path, "w") as fh:
        fh.write('{"i": 9}\n')
    assert [r["i"] for r in tail.read_new()] == [9]


def test_reader_skips_a_corrupt_line_naming_file_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "trades_X.jsonl"
    path.write_text('{"i": 0}\nnot json\n[1, 2]\n{"i": 3}\n')
    with caplog.at_level(logging.WARNING, logger="journal_tail"):
        assert [r["i"] for r in JournalTail(path).read_new()] == [0, 3]
    text = caplog.text
    assert f"{path} line 2:" in text and f"{path} line 3:" in text and f"{path} line 1:" not in text


def test_reader_from_end_sees_only_later_lines_and_new_files_from_their_start(tmp_path: Path) -> None:
    old, new = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    append(old, [{"i": 0}, {"i": 1}], torn='{"i": 2')
    tail_old, tail_new = JournalTail(old, from_end=True), JournalTail(new, from_end=True)
    with open(old, "a") as fh:
        fh.write('}\n{"i": 3}\n')
    append(new, [{"i": 7}])
    assert [r["i"] for r in tail_old.read_new()] == [2, 3]  # the line torn at start-up is new when completed
    assert [r["i"] for r in tail_new.read_new()] == [7]


# ---------------------------------------------------------------- bind and auth
def test_non_loopback_host_without_auth_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="live_dashboard"):
        code = live_dashboard.main(["--host", "0.0.0.0", "--port", "0", "--log-dir", str(tmp_path)])
    assert code == 2 and "refusing to serve on non-loopback host 0.0.0.0 without --auth" in caplog.text
    assert live_dashboard.is_loopback("127.0.0.1") and live_dashboard.is_loopback("::1")
    assert not live_dashboard.is_loopback("0.0.0.0") and not live_dashboard.is_loopback("192.168.1.5")


# ---------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    """A fixture engine folder and the dashboard over it; Dash's HOST/PORT variables must be ignored."""
    root = tmp_path_factory.mktemp("engine")
    fx = write_live_fixture(root, mode="paper", bars=60)
    proc, url = start_dashboard(root, "--refresh-sec", "1", env={"HOST": "0.0.0.0", "PORT": "1"})
    yield fx, url
    stop(proc)


def js(driver: webdriver.Chrome, script: str):
    return driver.execute_script("return " + script)


def candles(driver: webdriver.Chrome) -> int:
    return js(driver, "document.querySelectorAll('#candles g.trace.boxes path.box').length")


def gauges(driver: webdriver.Chrome) -> list[str]:
    return js(driver, "Array.from(document.querySelectorAll('[id^=gauge-] text.number')).map(e => e.textContent)")


def expected_gauges(rec: dict) -> list[str]:
    return [f"{rec[p]:.3f}" for p in PROBS]


def test_page_shows_candles_markers_gauges_and_mode(browser: webdriver.Chrome, live,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    fx, url = live
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":1")
    browser.get(url)
    WebDriverWait(browser, WAIT).until(lambda d: candles(d) == len(fx.signals) and len(gauges(d)) == 4)
    assert gauges(browser) == expected_gauges(fx.signals[-1])
    banner = js(browser, "document.getElementById('mode-banner').innerText")
    assert banner.startswith("PAPER") and "LIVE" not in banner
    assert js(browser, "document.querySelectorAll('#candles .scatterlayer .point').length") == fx.markers
    # price lines: the open position's TP and SL and the one resting entry
    assert js(browser, "document.querySelectorAll('#candles .shapelayer path').length") == 3
    names = js(browser, "Array.from(document.querySelectorAll('#candles .legendtext')).map(e => e.textContent)")
    assert {"chop maker entry", "breakout taker entry", "TP exit", "SL exit", "time exit", "kill-switch exit"} <= set(names)
    assert "phase trading" in js(browser, "document.getElementById('engine-status').innerText")
    assert js(browser, "document.querySelectorAll('#closed-table tbody tr').length") == 4
    drift = js(browser, "[...document.querySelectorAll('#drift-table tbody tr')].map(r => r.innerText)")
    assert [r.split()[0] for r in drift] == ["ret_5", "ob_imbalance", "vol_20"]   # furthest above its level first
    assert drift[0].split()[1:] == ["0.12", "0.05"], drift
    ages = js(browser, "[...document.querySelectorAll('#positions-table tbody td')].map(c => c.innerText)"
                       ".filter(t => t.endsWith(' min'))")
    # a position's age runs on the journal's market clock: it cannot exceed the journalled span
    placed = js(browser, "[...document.querySelectorAll('#orders-table tbody td')].map(c => c.innerText)")
    assert any(t.startswith(fx.signals[0]["bar_time"][:10]) for t in placed), placed   # a time, not a bar index
    assert len(ages) == 1 and 0 < float(ages[0].split()[0]) <= len(fx.signals) * BAR.total_seconds() / 60, ages
    href = js(browser, "document.getElementById('model-report-link').href")
    assert "Training report BTCUSDT" in requests.get(href, timeout=30).text
    assert requests.get(f"{url}/model/ETHUSDT/report.html", timeout=30).status_code == 404
    for _ in range(2):  # the page reflows at the new size; measure again
        browser.set_window_size(1400, js(browser, "document.documentElement.scrollHeight") + 40)
    WebDriverWait(browser, WAIT).until(lambda d: candles(d) == len(fx.signals))
    out = tmp_path_factory.getbasetemp() / "dashboard_artifacts"
    out.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(out / "dashboard.png"))
    browser.set_window_size(1400, 1000)


def test_new_bar_appears_after_refresh_and_a_torn_line_is_ignored(browser: webdriver.Chrome, live) -> None:
    fx, url = live
    if not browser.current_url.startswith(url):
        browser.get(url)
    WebDriverWait(browser, WAIT).until(lambda d: candles(d) >= len(fx.signals))
    n = len(fx.signals)
    new, torn = signal_record(n, fx.symbol, fx.mode), signal_record(n + 1, fx.symbol, fx.mode)
    torn_text = json.dumps(torn)
    append(fx.journal("signals"), [new], torn=torn_text[:40])
    WebDriverWait(browser, WAIT).until(lambda d: candles(d) == n + 1 and gauges(d) == expected_gauges(new))
    # A later refresh (it shows a new heartbeat record) still does not draw the torn bar...
    append(fx.journal("equity"), [dict(equity_record(n, fx), api_errors=77)])
    WebDriverWait(browser, WAIT).until(lambda d: "API errors 77" in js(d, "document.body.innerText"))
    assert candles(browser) == n + 1 and gauges(browser) == expected_gauges(new)
    # ...and once the engine finishes the line it appears whole.
    with open(fx.journal("signals"), "a") as fh:
        fh.write(torn_text[40:] + "\n")
    WebDriverWait(browser, WAIT).until(lambda d: candles(d) == n + 2 and gauges(d) == expected_gauges(torn))
    fx.signals += [new, torn]


RED, GREY = "rgb(192, 0, 0)", "rgb(90, 98, 104)"   # #c00000 (alarm), #5a6268 (a clean stop)


def shown(driver: webdriver.Chrome, element_id: str) -> tuple[str, str] | None:
    """(text, computed colour) of an element of the status line, None when absent."""
    found = js(driver, f"(e => e && [e.textContent.trim(), getComputedStyle(e).color])"
                       f"(document.getElementById('{element_id}'))")
    return tuple(found) if found else None


def clock_shown(t: datetime, now: datetime) -> str:
    """How the status line prints a UTC time: 'HH:MM UTC' on its own day, with the date before on a later one."""
    return t.strftime("%H:%M UTC" if t.date() == now.date() else "%Y-%m-%d %H:%M UTC")


def restart(t: datetime, fx, cause: str, exit_code: int, backoff_s: float, event: str = "restart") -> dict:
    """A `logs/watchdog_<SYM>.jsonl` record as watchdog.Supervisor.record writes it."""
    return dict(stamp(t, fx.symbol, ""), event=event, cause=cause, exit_code=exit_code, backoff_s=backoff_s,
                restart=1, max_restarts=5)


def test_status_tells_a_clean_stop_from_a_failed_exit_and_a_dead_engine_and_counts_watchdog_restarts(
        browser: webdriver.Chrome, tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def at(t: datetime) -> str:
        return clock_shown(t, now)

    def ms(t: datetime) -> int:
        return int(t.timestamp() * 1000)

    fx = write_live_fixture(tmp_path)
    stopped = now - timedelta(minutes=10)   # far older than the 120 s offline limit
    write_state(fx, ms(stopped), phase="stopping", exit_code=0, stop_reason="signal SIGINT")
    last = midnight + (now - midnight) / 2
    append(fx.journal("watchdog"), [restart(midnight - timedelta(hours=1), fx, "crash, exit 1", 1, 5.0),
                                    restart(midnight + (now - midnight) / 4, fx, "crash, exit 1", 1, 5.0),
                                    restart(last, fx, "killed by signal 9", -9, 10.0)])
    proc, url = start_dashboard(tmp_path, "--refresh-sec", "0.5")
    try:
        browser.get(url)
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "engine-state") is not None)
        assert shown(browser, "engine-state") == (f"STOPPED {at(stopped)} (signal SIGINT)", GREY)
        line = js(browser, "document.getElementById('engine-status').innerText")
        assert "OFFLINE" not in line and "phase stopping | STOPPED" in line, line
        assert shown(browser, "heartbeat")[1] != RED
        assert shown(browser, "watchdog")[0] == f"| watchdog restarts today: 2; last {at(last)}: killed by signal 9 " \
                                                "(backoff 10 s)"
        write_state(fx, ms(stopped), phase="stopping", exit_code=1, stop_reason="crash: RuntimeError: boom")
        failed = (f"ENGINE EXITED {at(stopped)} with code 1 (crash: RuntimeError: boom)", RED)
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "engine-state") == failed)
        write_state(fx, ms(stopped), phase="trading")   # a running engine's heartbeat, gone stale: killed or hung
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "engine-state") == ("ENGINE OFFLINE", RED))
        assert shown(browser, "heartbeat")[1] == RED
        append(fx.journal("watchdog"), [restart(now, fx, "heartbeat stale", 0, 20.0)])
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "watchdog")[0].startswith(
            f"| watchdog restarts today: 3; last {at(now)}: heartbeat stale (backoff 20 s)"))
        append(fx.journal("watchdog"), [restart(now, fx, "crash, exit 1: 5 restarts within 3600 s", 1, 0.0, "gave_up")])
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "watchdog") == (
            f"| WATCHDOG GAVE UP {at(now)}: crash, exit 1: 5 restarts within 3600 s", RED))
        write_state(fx, ms(now) + 1000, phase="trading")   # started again by hand: beating since, no longer alarming
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "watchdog")[0].startswith("| watchdog restarts today: 3"))
    finally:
        stop(proc)


def test_empty_log_folder_says_no_engine_running_behind_basic_auth(browser: webdriver.Chrome, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "pw").write_text("s3cret-pass\n")
    proc, url = start_dashboard(tmp_path, "--auth", f"trader:{tmp_path / 'pw'}")
    try:
        assert requests.get(url, timeout=30).status_code == 401
        bad = requests.get(url, auth=("trader", "s3cret-pasS"), timeout=30)
        assert bad.status_code == 401 and bad.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(url, auth=("trader2", "s3cret-pass"), timeout=30).status_code == 401
        assert requests.get(url, auth=("trader", "s3cret-pass"), timeout=30).status_code == 200
        token = base64.b64encode(b"trader:s3cret-pass").decode()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        try:
            browser.get(url)
            WebDriverWait(browser, WAIT).until(lambda d: js(d, "document.getElementById('no-engine') !== null"))
            text = js(browser, "document.body.innerText")
            assert "No engine running" in text and "Traceback" not in text and "Error" not in text
            assert js(browser, "document.getElementById('mode-banner').innerText") == "NO ENGINE RUNNING"
        finally:
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
    finally:
        stop(proc)
    assert "Traceback" not in (tmp_path / "dashboard_stderr.log").read_text()


def test_table_cells_print_money_in_full_and_small_numbers_to_four_digits() -> None:
    """An equity of 10,000 is not '1e+04': cells of 1000 and more print with thousands and cents."""
    assert [live_dashboard.fmt(v) for v in (10000.0, -10234.567, 999.87654, 0.000123456, float("nan"), 7, None, True)] == [
        "10,000.00", "-10,234.57", "999.9", "0.0001235", "-", "7", "-", "yes"]
