"""watchdog.py against real child processes: tests/standin_engine.py plays the engine (heartbeat, exit codes,
hangs, ignored SIGTERM) until live_trading_v2.py lands. Short timings; delays are checked as lower bounds from
the watchdog's log and the stand-in's event file; every wait is on a condition with a generous timeout."""
from __future__ import annotations

import configparser
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from live_support import complete_lines

ROOT = Path(__file__).resolve().parents[1]
WATCHDOG = ROOT / "watchdog.py"
STANDIN = ROOT / "tests" / "standin_engine.py"
SYM = "TESTUSDT"
SLACK = 0.05  # times written by two processes: the heartbeat lands just before its event line

ENV = {k: v for k, v in os.environ.items()
       if k not in ("DISCORD_WEBHOOK_URL", "TELEGRAM_BOT_TOKEN", "TELEGRAM_CHAT_ID")}  # alerts only when a test asks


def watchdog_cmd(workdir: Path, runs: str, *flags: str, standin: tuple[str, ...] = (),
                 script: Path = WATCHDOG) -> list[str]:
    """The watchdog supervising the stand-in with behaviours `runs` (see tests/standin_engine.py)."""
    return [sys.executable, str(script), "--symbol", SYM, "--workdir", str(workdir), "--poll-sec", "0.05",
            "--engine-cmd", json.dumps([sys.executable, str(STANDIN)]), *flags,
            "--", "--runs", runs, "--events", str(workdir / "events.jsonl"), *standin]


def run_watchdog(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV)


def start_watchdog(cmd: list[str], workdir: Path) -> subprocess.Popen:
    """The watchdog as a terminal would start it: SIGINT at its default even when this test run inherited it
    ignored (a background launch), since the watchdog rightly keeps an inherited ignore (nohup, `&`)."""
    out = (workdir / "watchdog.out").open("w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def log_lines(workdir: Path) -> list[tuple[float, str]]:
    """(UTC seconds, message) per line of logs/watchdog_<SYM>.log."""
    path = workdir / "logs" / f"watchdog_{SYM}.log"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        stamp, _, rest = line.partition(" ")
        when = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
        out.append((when.timestamp(), rest.partition(" ")[2]))
    return out


def logged(workdir: Path, text: str) -> list[float]:
    """Times of the log lines containing `text`."""
    return [t for t, msg in log_lines(workdir) if text in msg]


def events(workdir: Path, kind: str | None = None) -> list[dict]:
    path = workdir / "events.jsonl"
    rows = complete_lines(path)
    return [r for r in rows if kind is None or r["event"] == kind]


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(autouse=True)
def no_stray_engines(tmp_path):
    """A failing test must not leave a stand-in engine running (it lives in its own session)."""
    yield
    for path in tmp_path.rglob("events.jsonl"):
        for start in events(path.parent, "start"):
            if alive(start["pid"]):
                os.kill(start["pid"], signal.SIGKILL)


def test_crash_loop_backs_off_doubling_to_the_cap_then_gives_up_with_exit_1(tmp_path):
    cmd = watchdog_cmd(tmp_path, "exit:1", "--backoff-base", "0.3", "--backoff-max", "0.5", "--max-restarts", "3")
    done = run_watchdog(cmd)
    assert done.returncode == 1, done.stderr
    starts = logged(tmp_path, "engine started (pid")
    crashes = logged(tmp_path, "engine exited with code 1 (crash)")
    assert len(starts) == 4 and len(crashes) == 4
    assert [e["pid"] for e in events(tmp_path, "start")] == [
        int(msg.split("pid ")[1].rstrip(")")) for _, msg in log_lines(tmp_path) if "engine started (pid" in msg]
    stated = [float(msg.split(" in ")[-1].rstrip(" s")) for _, msg in log_lines(tmp_path) if "this hour in" in msg]
    assert stated == [0.3, 0.5, 0.5]
    for crashed, restarted, delay in zip(crashes, starts[1:], stated):
        assert restarted - crashed >= delay
    assert "giving up" in [msg for _, msg in log_lines(tmp_path) if "code 1" in msg][-1]
    assert len(logged(tmp_path, "ALERT [critical] engine keeps failing")) == 1
    rows = [json.loads(line) for line in (tmp_path / "logs" / f"watchdog_{SYM}.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["restart"] * 3 + ["gave_up"]   # the dashboard sees it stopped supervising
    assert rows[-1]["cause"].startswith("crash, exit 1: 3 restarts within") and rows[-1]["exit_code"] == 1


def test_restarts_older_than_the_window_no_longer_count_toward_the_limit(tmp_path):
    cmd = watchdog_cmd(tmp_path, "exit:1,exit:1,exit:1,exit:0", "--max-restarts", "1", "--restart-window", "0.25",
                       "--backoff-base", "0.3", "--backoff-max", "0.3")
    done = run_watchdog(cmd)
    assert done.returncode == 0, done.stderr
    assert len(logged(tmp_path, "restart 1 of 1 this hour")) == 3
    assert not logged(tmp_path, "giving up")


def test_an_exchange_unreachable_at_startup_is_restarted_with_backoff_and_named(tmp_path):
    """Exit 5 (the exchange could not be reached at startup: a machine whose network is still coming up) is
    restarted like a crash, not given up on like a failed reconciliation (4)."""
    done = run_watchdog(watchdog_cmd(tmp_path, "exit:5,exit:0", "--backoff-base", "0.1"))
    assert done.returncode == 0, done.stderr
    assert len(logged(tmp_path, "engine started (pid")) == 2
    assert logged(tmp_path, "engine exited with code 5 (the exchange could not be reached at startup): restart 1")


def test_each_restart_is_journalled_with_its_cause_and_backoff_for_the_dashboard(tmp_path):
    """A crash, a kill by signal and a stale heartbeat: one `logs/watchdog_<SYM>.jsonl` line each, written before
    the restart it announces; a clean exit adds none."""
    cmd = watchdog_cmd(tmp_path, "exit:1,signal:9,hang,exit:0", "--stale-sec", "0.5", "--backoff-base", "0.1")
    done = run_watchdog(cmd)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "logs" / f"watchdog_{SYM}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r["cause"], r["exit_code"], r["backoff_s"], r["restart"]) for r in rows] == [
        ("restart", "crash, exit 1", 1, 0.1, 1), ("restart", "killed by signal 9", -9, 0.2, 2),
        ("restart", "heartbeat stale", 0, 0.4, 3)]
    assert all(r["symbol"] == SYM and r["max_restarts"] == 5 for r in rows)
    starts = [e["t"] for e in events(tmp_path, "start")]
    assert len(starts) == 4
    for row, restarted in zip(rows, starts[1:]):
        assert row["ts"] / 1000 <= restarted + SLACK
        assert dt.datetime.fromisoformat(row["time"].replace("Z", "+00:00")).timestamp() == row["ts"] // 1000


@pytest.mark.parametrize("code", [0, 2, 3, 4])
def test_clean_and_no_restart_exit_codes_are_not_restarted(tmp_path, code):
    done = run_watchdog(watchdog_cmd(tmp_path, f"exit:{code},run", "--backoff-base", "0.1"))
    assert done.returncode == code, done.stderr
    assert len(logged(tmp_path, "engine started (pid")) == 1
    assert len(events(tmp_path, "start")) == 1
    assert len(logged(tmp_path, f"engine exited with code {code} (")) == 1
    assert logged(tmp_path, "not restarting")
    journal = tmp_path / "logs" / f"watchdog_{SYM}.jsonl"
    rows = complete_lines(journal)
    assert [(r["event"], r["exit_code"]) for r in rows] == ([("not_restarted", code)] if code else [])
    if code:
        alert = [msg for _, msg in log_lines(tmp_path) if "ALERT [critical]" in msg]
        assert len(alert) == 1
        assert "open positions: 1" in alert[0]
        assert "stops last verified: 20" in alert[0]


def test_hung_engine_gets_graceful_stop_then_kill_then_restart(tmp_path):
    cmd = watchdog_cmd(tmp_path, "hang,exit:0", "--stale-sec", "0.5", "--grace-sec", "0.5", "--backoff-base", "0.1",
                       standin=("--on-term", "ignore"))
    done = run_watchdog(cmd)
    assert done.returncode == 0, done.stderr
    first = events(tmp_path, "start")[0]["pid"]
    last_beat = max(e["t"] for e in events(tmp_path, "beat") if e["pid"] == first)
    [stale] = logged(tmp_path, "heartbeat stale: no new heartbeat for")
    [term_sent] = logged(tmp_path, "graceful stop of engine pid")
    [ignored] = [e["t"] for e in events(tmp_path, "term-ignored")]
    [killed] = logged(tmp_path, f"killing engine pid {first}")
    starts = logged(tmp_path, "engine started (pid")
    assert stale - last_beat >= 0.5 - SLACK
    assert term_sent <= ignored + SLACK <= killed + SLACK
    assert killed - term_sent >= 0.5
    assert len(starts) == 2 and starts[1] > killed
    assert not alive(first)
    assert [e["run"] for e in events(tmp_path, "exit")] == [1]


def test_flattening_engine_with_a_live_heartbeat_is_never_hard_killed(tmp_path):
    cmd = watchdog_cmd(tmp_path, "flatten:1.5", "--grace-sec", "0.3", standin=("--on-term", "ignore"))
    proc = start_watchdog(cmd, tmp_path)
    wait_for(lambda: events(tmp_path, "beat"), "the first flattening heartbeat")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    [ignored] = events(tmp_path, "term-ignored")
    [finished] = events(tmp_path, "exit")
    assert finished["code"] == 0 and finished["t"] - ignored["t"] >= 1.5  # outlived --grace-sec 0.3 by far
    assert logged(tmp_path, "is flattening (heartbeat")
    assert not logged(tmp_path, "killing engine")


def test_flattening_engine_is_killed_only_after_its_heartbeat_is_stale_past_the_settle_bound(tmp_path):
    cmd = watchdog_cmd(tmp_path, "flatten-hang,exit:0", "--stale-sec", "0.4", "--grace-sec", "0.2",
                       "--settle-stale-sec", "1.5", "--backoff-base", "0.1", standin=("--on-term", "ignore"))
    done = run_watchdog(cmd)
    assert done.returncode == 0, done.stderr
    first = events(tmp_path, "start")[0]["pid"]
    last_beat = max(e["t"] for e in events(tmp_path, "beat") if e["pid"] == first)
    [protected] = logged(tmp_path, f"engine pid {first} is flattening")
    [killed] = logged(tmp_path, f"killing engine pid {first}")
    assert protected < killed
    assert killed - last_beat >= 1.5 - SLACK
    assert len(logged(tmp_path, "engine started (pid")) == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_watchdog_stops_the_engine_gracefully_and_exits_0(tmp_path, sig):
    proc = start_watchdog(watchdog_cmd(tmp_path, "run"), tmp_path)
    wait_for(lambda: events(tmp_path, "beat"), "the engine's first heartbeat")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    [term] = events(tmp_path, "term")
    assert not alive(term["pid"])
    assert len(events(tmp_path, "start")) == 1
    assert logged(tmp_path, "after the watchdog was asked to stop")
    assert not logged(tmp_path, "killing engine")


def test_second_watchdog_for_the_same_symbol_refuses(tmp_path):
    first = start_watchdog(watchdog_cmd(tmp_path, "run"), tmp_path)
    try:
        wait_for(lambda: events(tmp_path, "beat"), "the first watchdog's engine")
        second = run_watchdog(watchdog_cmd(tmp_path, "run"))
        assert second.returncode == 2
        assert f"another watchdog for {SYM} is running (pid {first.pid}" in second.stderr
        assert len(events(tmp_path, "start")) == 1
        assert not logged(tmp_path, "refusing")  # the running watchdog stays the log's only writer
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


def test_refuses_beside_a_live_engine_it_does_not_own_but_not_beside_a_dead_one(tmp_path):
    heartbeat = tmp_path / "state" / f"heartbeat_{SYM}.json"
    heartbeat.parent.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        heartbeat.write_text(json.dumps({"ts": int(time.time() * 1000), "pid": other.pid, "phase": "trading",
                                         "open_positions": 1, "last_stop_check": None, "model": "x"}))
        refused = run_watchdog(watchdog_cmd(tmp_path, "exit:0"))
        assert refused.returncode == 2
        assert f"already running without this watchdog (pid {other.pid}" in refused.stderr
        assert not events(tmp_path)
    finally:
        other.kill()
        other.wait()
    assert run_watchdog(watchdog_cmd(tmp_path, "exit:0")).returncode == 0
    assert len(events(tmp_path, "start")) == 1


def test_configured_alerts_without_notifier_are_logged_with_a_warning(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(WATCHDOG, alone / "watchdog.py")  # a folder without notifier.py
    secret = "http://127.0.0.1:9/api/webhooks/secret-token"
    done = run_watchdog(watchdog_cmd(tmp_path, "exit:4", "--discord-webhook", secret, script=alone / "watchdog.py"))
    assert done.returncode == 4
    assert logged(tmp_path, "notifier.py cannot be imported")
    [alert] = [msg for _, msg in log_lines(tmp_path) if "ALERT [critical]" in msg]
    assert "open positions: 1" in alert and "stops last verified: 20" in alert
    assert "secret-token" not in (tmp_path / "logs" / f"watchdog_{SYM}.log").read_text() + done.stderr


def test_missing_engine_is_refused_with_a_clear_message(tmp_path):
    shutil.copy(WATCHDOG, tmp_path / "watchdog.py")  # a folder without live_trading_v2.py
    done = run_watchdog([sys.executable, str(tmp_path / "watchdog.py"), "--symbol", SYM, "--workdir", str(tmp_path)])
    assert done.returncode == 2
    assert f"the engine {tmp_path / 'live_trading_v2.py'} is missing" in done.stderr
    assert not (tmp_path / "logs").exists()


STUB_NOTIFIER = '''
import json
from dataclasses import dataclass, field
@dataclass
class NotifierConfig:
    discord_webhook: str = ""
    telegram_token: str = ""
    telegram_chat_id: str = ""
    telegram_api_url: str = ""
    cooldowns: dict = field(default_factory=dict)
    @classmethod
    def from_env(cls, **overrides):
        return cls(**overrides)
class Notifier:
    def __init__(self, cfg):
        self.path = cfg.telegram_api_url
        self.write("config", cfg.discord_webhook, cfg.telegram_token, cfg.telegram_chat_id, cfg.cooldowns)
    def write(self, *row):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\\n")
    def send(self, event):
        self.write("send", event)
        return True
    def close(self, timeout=5.0):
        self.write("close", timeout)
'''


def test_configured_alerts_go_through_notifier_with_positions_and_stop_check(tmp_path):
    """Pins the library call the watchdog makes (notifier.py's docstring) with a recording stand-in notifier."""
    folder = tmp_path / "with_notifier"
    folder.mkdir()
    shutil.copy(WATCHDOG, folder / "watchdog.py")
    (folder / "notifier.py").write_text(STUB_NOTIFIER)
    calls = tmp_path / "calls.jsonl"
    done = run_watchdog(watchdog_cmd(tmp_path, "exit:3", "--telegram-token", "tok", "--telegram-chat-id", "42",
                                     "--telegram-api-url", str(calls), script=folder / "watchdog.py"))
    assert done.returncode == 3, done.stderr
    rows = [json.loads(line) for line in calls.read_text().splitlines()]
    assert rows[0] == ["config", "", "tok", "42", {"watchdog": 0.0}]
    [send] = [r[1] for r in rows if r[0] == "send"]
    assert send["event"] == "watchdog" and send["level"] == "critical" and send["symbol"] == SYM
    message = send["message"]
    assert "exited with code 3" in message and "open positions: 1" in message and "stops last verified: 20" in message
    assert rows[-1][0] == "close"


def write_launchers(tmp_path: Path, *flags: str, passthrough: tuple[str, ...],
                    symbol: str = "BTCUSDT") -> dict[str, Path]:
    out = tmp_path / "launchers"
    done = run_watchdog([sys.executable, str(WATCHDOG), "--write-launchers", "--launcher-dir", str(out),
                         "--symbol", symbol, *flags, "--", *passthrough])
    assert done.returncode == 0, done.stderr
    return {p.suffix: p for p in out.iterdir()}


def test_bat_and_systemd_unit_run_the_watchdog_from_this_checkout(tmp_path):
    files = write_launchers(tmp_path, "--stale-sec", "90", "--discord-webhook", "http://127.0.0.1:9/secret-hook",
                            passthrough=("--keys-file", "keys.json", "--live"))
    assert set(files) == {".bat", ".sh", ".service"}
    args = ["--symbol", "BTCUSDT", "--stale-sec", "90.0", "--", "--keys-file", "keys.json", "--live"]
    bat = files[".bat"].read_text().splitlines()
    assert f'cd /d "{ROOT}"' in bat
    [run] = [line for line in bat if "watchdog.py" in line and not line.startswith("rem ")]
    assert shlex.split(run) == [sys.executable, "watchdog.py", *args]
    assert not [line for line in bat if line.strip().lower().startswith(("goto", ":"))]  # no bare loop
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str
    unit.read(files[".service"])
    service = unit["Service"]
    assert service["WorkingDirectory"] == str(ROOT)
    assert shlex.split(service["ExecStart"]) == [sys.executable, str(WATCHDOG), *args]
    assert service["Restart"] == "on-failure" and float(service["RestartSec"]) >= 5
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "3", "4"}
    assert service["KillMode"] == "control-group"  # a dead watchdog's engine still gets SIGTERM first
    assert not any("secret-hook" in p.read_text() for p in files.values())


def test_generated_sh_runs_the_watchdog(tmp_path):
    work = tmp_path / "work"
    files = write_launchers(tmp_path, "--workdir", str(work), "--poll-sec", "0.05",
                            "--engine-cmd", json.dumps([sys.executable, str(STANDIN)]),
                            passthrough=("--runs", "exit:0", "--events", str(work / "events.jsonl")), symbol=SYM)
    done = subprocess.run([str(files[".sh"])], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=ENV)
    assert done.returncode == 0, done.stderr
    assert [e["behaviour"] for e in events(work, "start")] == ["exit:0"]
    assert len(logged(work, "engine started (pid")) == 1
