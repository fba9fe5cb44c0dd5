"""watchdog.py supervising the REAL engine (issue 16's last test): live_trading_v2.py in paper mode against
paper_exchange.py on 127.0.0.1 with scripted probabilities (tests/live_support.py), lockstep clock.

Mid-trade the engine is hung (SIGSTOP: every thread, heartbeat included, stops); the watchdog must find the
heartbeat stale, stop it (SIGTERM, then the kill after --grace-sec) and start a new engine, which reconciles
the position it finds and leaves no position without a stop. The exchange is checked over REST with the
real pybit client, with the new engine frozen meanwhile so the two queries see one moment.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from pybit.unified_trading import HTTP

from live_support import ROOT, SYMBOL, busy_probabilities, engine_cmd, exchange, journal, make_market, \
    reconciled_count, wait_for, write_model_dir
from test_watchdog import ENV, alive

STALE_SEC = 15  # three missed 5 s heartbeats; a loaded 2-core machine still beats well inside it
GRACE_SEC = 20  # the engine's graceful stop (cancel resting entries, save, close streams) on a loaded machine


def started_pids(cwd: Path) -> list[int]:
    """The pids of the watchdog log's `engine started (pid N)` lines, in order."""
    path = cwd / "logs" / f"watchdog_{SYMBOL}.log"
    return [int(m) for m in re.findall(r"engine started \(pid (\d+)\)", path.read_text())] if path.exists() else []


def positions(http: HTTP) -> dict[int, float]:
    """positionIdx -> size of every open position, from GET /v5/position/list."""
    rows = http.get_positions(category="linear", symbol=SYMBOL)["result"]["list"]
    return {int(r["positionIdx"]): float(r["size"]) for r in rows if float(r["size"]) > 0}


def stop_cover(http: HTTP) -> dict[int, float]:
    """positionIdx -> quantity of open reduce-only stop orders, from GET /v5/order/realtime (conditional), summed
    exactly (Decimal: 30.016 + 43.565 as floats is 73.58099999999999, short of a 73.581 position)."""
    rows = http.get_open_orders(category="linear", symbol=SYMBOL, orderFilter="StopOrder", limit=50)["result"]["list"]
    cover: dict[int, Decimal] = {}
    for o in rows:
        if o["reduceOnly"] and "Stop" in o["stopOrderType"]:
            cover[int(o["positionIdx"])] = cover.get(int(o["positionIdx"]), Decimal(0)) + Decimal(o["qty"])
    return {idx: float(qty) for idx, qty in cover.items()}


def send(pid: int, sig: int) -> None:
    if alive(pid):
        os.kill(pid, sig)


def hung_holding(pid: int, http: HTTP) -> dict[int, float]:
    """SIGSTOP the engine while a position is open: the open positions it was hung with, else {} (resumed)."""
    if not positions(http):
        return {}
    send(pid, signal.SIGSTOP)  # the lockstep market waits for it: nothing moves until it is gone
    held = positions(http)
    if not held:
        send(pid, signal.SIGCONT)
    return held


def test_watchdog_kills_a_hung_engine_mid_trade_and_its_restart_reconciles_with_every_position_stopped(tmp_path):
    market = make_market(tmp_path / "market")
    cwd = tmp_path / "run"
    cwd.mkdir()
    model = write_model_dir(cwd, **{"strategy.daily_loss_limit": "0.9"})
    probs = busy_probabilities(cwd / "p.csv")
    with exchange(market) as ex:
        http = HTTP(api_key="paper", api_secret="paper")
        http.endpoint = ex.url
        engine_args = engine_cmd(ex.url, model, market, "--probabilities", str(probs))[4:]  # after --symbol SYM
        cmd = [sys.executable, str(ROOT / "watchdog.py"), "--symbol", SYMBOL, "--workdir", str(cwd),
               "--stale-sec", str(STALE_SEC), "--grace-sec", str(GRACE_SEC), "--backoff-base", "0.5", "--poll-sec", "0.1",
               "--", *engine_args]
        with open(cwd / "watchdog.out", "w") as out:
            watchdog = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**ENV, "PYTHONPATH": str(ROOT)})
        try:
            wait_for(lambda: reconciled_count(cwd) >= 1 or watchdog.poll() is not None, 120, "first reconciliation")
            assert watchdog.poll() is None, (cwd / "watchdog.out").read_text()[-3000:]
            first = started_pids(cwd)[0]
            held: dict[int, float] = {}
            wait_for(lambda: held.update(hung_holding(first, http)) or held, 120, "the engine hung mid-trade")
            before = reconciled_count(cwd)

            wait_for(lambda: len(started_pids(cwd)) >= 2, 60, "the watchdog's restart")
            wait_for(lambda: reconciled_count(cwd) > before, 120, "the restarted engine's reconciliation")
            second = started_pids(cwd)[1]
            send(second, signal.SIGSTOP)  # freeze the new engine: both REST queries see one moment
            try:
                now, cover = positions(http), stop_cover(http)
            finally:
                send(second, signal.SIGCONT)
            log = (cwd / "logs" / f"watchdog_{SYMBOL}.log").read_text()
            assert "heartbeat stale" in log and f"killing engine pid {first}" in log, log
            assert not alive(first)
            startup = [e for e in journal(cwd, "events") if e["event"] == "reconciled"][before]
            assert startup["message"].startswith("startup")
            assert {int(k): v for k, v in startup["positions"].items() if v > 0} == held, (startup, held)
            assert startup["external"] == [], "the restarted engine must know the position as its own"
            unprotected = {idx: (size, cover.get(idx, 0.0)) for idx, size in now.items() if cover.get(idx, 0.0) < size}
            assert not unprotected, f"positions not covered by stop orders (idx: size, stop qty): {unprotected}"

            watchdog.send_signal(signal.SIGTERM)
            assert watchdog.wait(60) == 0, (cwd / "watchdog.out").read_text()[-3000:]
            assert not alive(second)
            assert len(started_pids(cwd)) == 2, log
        finally:
            if watchdog.poll() is None:
                watchdog.kill()
                watchdog.wait()
            for pid in started_pids(cwd):
                send(pid, signal.SIGCONT)
                send(pid, signal.SIGKILL)
    events = [e["event"] for e in journal(cwd, "events")]
    assert events.count("startup") == 2 and events.count("shutdown") == 1, events
